"""The build's progress and cost figures: per-identity ETA, GPU-seconds, the plan's projection."""

from __future__ import annotations

from factory.build import identity_cost
from factory.output.report import BuildSummary, PlanClock
from core.settings.run import load_run_config


def test_plan_clock_reports_rate_and_eta() -> None:
    clock = PlanClock(total=4, started=0.0)
    assert clock.tick(now=60.0) == "0:01:00 elapsed, 60 identities/h, ETA 0:03:00"  # one a minute
    assert clock.tick(now=90.0) == "0:01:30 elapsed, 80 identities/h, ETA 0:01:30"


def test_identity_cost_counts_gpu_seconds_per_actor_share() -> None:
    config = load_run_config(overrides=["caption.num_gpus=1", "generation.num_gpus=1", "filter.num_gpus=0.25"])
    row = {"timings": [("reference_set", 10.0), ("fine_tune", 20.0), ("sample", 30.0)], "caption_seconds": 4.0,
           "filter_seconds": 8.0}
    seconds, gpu_seconds = identity_cost(row, config, use_gpus=True)
    assert seconds == {"caption": 4.0, "reference_set": 10, "fine_tune": 20, "sample": 30, "filter": 8.0}
    assert gpu_seconds == 4 + 10 + 20 + 30 + 8 * 0.25
    assert identity_cost(row, config, use_gpus=False)[1] == 0.0


def test_plan_projection_scales_the_measured_rate_to_the_plan() -> None:
    summary = BuildSummary(out_dir="x", identities_planned=5183, identities_processed=3, identities_failed=1, gpus=True)
    summary.add_identity_cost(500.0, 400.0)
    summary.add_identity_cost(500.0, 400.0)
    assert summary.plan_projection() == "5183 planned identities ~ 575.89 GPU-hours at the measured 400.0 GPU-s per identity"
    assert BuildSummary(out_dir="x", identities_planned=3).plan_projection() is None
