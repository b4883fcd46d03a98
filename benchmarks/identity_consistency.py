"""Identity consistency of DI: Re-ID filter pass rate of images generated after per-identity
fine-tuning vs. images from the un-fine-tuned base model, with the same prompts and seeds.

    uv run python benchmarks/identity_consistency.py --build-dir outputs/demo

Uses the filter model a build trained (DIR/filter_models/<source>) and the preset's recipe; runs
the stages in-process (no Ray) over the first `--identities` identities
(`eval.experiment.consistency.identity_consistency`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from core.storage import resolve  # noqa: E402
from core.settings.run import load_run_config  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build-dir", required=True, help="a finished build (for its filter model); path or URI")
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--identities", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from eval.experiment.consistency import consistency_gain, identity_consistency

    config = load_run_config(args.config, args.overrides)
    rates = identity_consistency(config, resolve(args.build_dir) / "filter_models", args.identities)
    print(f"{args.identities} identities at most, {config.generation.samples_per_identity} samples each, "
          f"same prompts and seeds; Re-ID filter threshold {config.filter.threshold}")
    for label, rate in (("base model (no fine-tune)", rates["base_model"]), ("fine-tuned (DI)", rates["fine_tuned"])):
        print(f"  {label:<28} pass rate {100 * rate.rate:5.1f}%   mean score {rate.mean_score:.3f}   "
              f"(n={rate.samples})")
    gain = consistency_gain(rates)
    print(f"  gain (fine-tuned - base)     {100 * gain.mean:+5.1f} points, 95 % {gain.method} interval over "
          f"{gain.identities} identities [{100 * gain.low:+.1f}, {100 * gain.high:+.1f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
