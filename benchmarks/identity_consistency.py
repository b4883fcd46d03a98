"""Identity consistency of DI: Re-ID filter pass rate of images generated after per-identity
fine-tuning vs. images from the un-fine-tuned base model, with the same prompts and seeds.

    uv run python benchmarks/identity_consistency.py --build-dir outputs/demo

Uses the filter model a build trained (DIR/filter_models/<source>) and the preset's recipe; runs
the stages in-process (no Ray) over the first `--identities` identities.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from factory.run_config import load_run_config  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build-dir", type=Path, required=True, help="a finished build (for its filter model)")
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--identities", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from factory.build import load_sources, resolve_models
    from factory.sequences import plan_identities, read_sequences
    from factory.stages.caption import CaptionStage
    from factory.stages.filter import FilterModelSpec, FilterStage
    from factory.stages.generate import GenerationStage

    config = resolve_models(load_run_config(args.config, args.overrides))
    datasets = load_sources(config)
    plan = plan_identities(datasets, config.sequences)[: args.identities]
    table, _ = read_sequences(plan, config.sequences, config.generation.seed)
    models = {d.name: FilterModelSpec.load(args.build_dir / "filter_models" / d.name) for d in datasets}

    caption = CaptionStage(config.caption)
    caption.setup()
    captioned = caption.process_batch(table)
    filtering = FilterStage(config.filter.model_copy(update={"kind": "reid"}), models)
    filtering.setup()

    results = {}
    for label, steps in (("base model (no fine-tune)", 0), ("fine-tuned (DI)", config.generation.train_steps)):
        generation = config.generation.model_copy(update={"train_steps": steps})
        stage = GenerationStage(generation, config.output, num_threads=1)
        stage.setup()
        rows = filtering.process_batch(stage.process_batch(captioned)).to_pylist()
        scores = [s for row in rows for s in row["scores"]]
        kept = sum(k for row in rows for k in row["kept"])
        results[label] = (kept / len(scores), statistics.mean(scores), len(scores))

    print(f"{len(plan)} identities, {config.generation.samples_per_identity} samples each, "
          f"same prompts and seeds; Re-ID filter threshold {config.filter.threshold}")
    for label, (rate, mean, n) in results.items():
        print(f"  {label:<28} pass rate {100 * rate:5.1f}%   mean score {mean:.3f}   (n={n})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
