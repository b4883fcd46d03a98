"""Diversity of a build's kept images against its source: which capture conditions (domain, pose)
a probe fitted on the procedural world's own labels reads in them, and what share fall in a
condition the source, or the image's own identity in the source, never shows.

    uv run python benchmarks/diversity.py --build-dir outputs/demo [--json]

The source is the train split of the sources the build's `DIR/config.yaml` names (or `--config`
with `--set`); the probe is fitted afresh (seconds) and its held-out accuracy is printed beside
every figure (`eval.experiment.diversity`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.storage import resolve  # noqa: E402


def _distribution(shares: dict[str, float]) -> str:
    return ", ".join(f"{label} {100 * share:.1f}%" for label, share in sorted(shares.items(), key=lambda kv: -kv[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build-dir", required=True, help="a finished build (its shards and config); path or URI")
    parser.add_argument("--config", type=Path, default=None, help="the build's config (default: DIR/config.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--max-images", type=int, default=2000, help="per side, a fixed subsample beyond it")
    parser.add_argument("--probe-images", type=int, default=300, help="world images per domain the probe fits on")
    parser.add_argument("--min-share", type=float, default=0.05,
                        help="a condition the source shows in fewer of its images counts as not shown")
    parser.add_argument("--min-confidence", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0, help="of the probe's world images")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON only")
    args = parser.parse_args()
    from eval.experiment.diversity import build_condition_coverage, fit_condition_probe

    config = None
    if args.config is not None or args.overrides:
        from core.settings.run import load_run_config

        config = load_run_config(args.config, args.overrides)
    probe = fit_condition_probe(args.seed, args.probe_images)
    found = build_condition_coverage(resolve(args.build_dir), probe, config, args.max_images,
                                     min_share=args.min_share, min_confidence=args.min_confidence)
    if args.json:
        print(json.dumps(found, indent=1, sort_keys=True))
        return 0
    print(f"{found['generated_images']} kept images vs {found['source_images']} source training images "
          f"(source domains as labelled: {found['source_domains'] or 'not a synthetic source'})")
    print(f"  in a condition the source lacks:           {100 * found['coverage_beyond_source']:5.1f}%")
    if found.get("coverage_beyond_identity") is not None:
        print(f"  in a condition its identity's source lacks: {100 * found['coverage_beyond_identity']:5.1f}% "
              f"(of {found['identity_images']} with source images)")
    print(f"  distinct conditions: kept {found['distinct_conditions']}, source {found['source_distinct_conditions']}")
    for name, entry in found["conditions"].items():
        beyond = entry.get("beyond_identity")
        print(f"{name} (probe {100 * entry['probe_accuracy']:.1f}% right on held-out world images, "
              f"chance {100 * entry['chance']:.1f}%)")
        print(f"  kept:   {_distribution(entry['generated'])}")
        print(f"  source: {_distribution(entry['source'])} -> shows {', '.join(entry['source_shows'])}")
        print(f"  beyond source {100 * entry['beyond_source']:.1f}%"
              + (f", beyond identity {100 * beyond:.1f}%" if beyond is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
