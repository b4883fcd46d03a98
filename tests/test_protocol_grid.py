"""The unsupervised, da and dg settings under Ray Tune on tiny procedural domains: every table is
written, a rerun trains nothing, and a trial that failed is retried on rerun."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import ray

from core.settings.downstream import DownstreamConfig
from eval.downstream.cells import count_executions, plan_cells
from eval.downstream.runner import run_downstream

TINY_TRAIN = {
    "arch": "resnet18", "image_size": [64, 32], "epochs": 1, "warmup_epochs": 0, "milestones": [],
    "ids_per_batch": 4, "images_per_id": 2, "pad": 2, "loader_workers": 0, "eval_batch_size": 32,
}
FAILING = "campus->mall/cluster_contrast/random/da/seed0"


@pytest.fixture(scope="module")
def ray_cluster():
    context = ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield context
    ray.shutdown()


def _config(root: Path, **overrides: object) -> DownstreamConfig:
    def domain(name: str, seed: int, kind: str) -> dict:
        return {"kind": "synthetic", "root": str(root / name), "name": name,
                "generate": {"ids": 6, "cameras": 2, "seed": seed, "images_per_camera": 2, "domain": kind}}

    return DownstreamConfig.model_validate({
        "datasets": [domain("campus", 1, "campus"), domain("mall", 2, "mall"), domain("station", 3, "station"),
                     domain("unused", 4, "street"), domain("far", 5, "street")],
        "settings": ["supervised", "unsupervised", "da", "dg"], "methods": ["bot"], "inits": ["random"],
        "supervised_datasets": ["campus"],
        "adaptation": [{"source": "campus", "target": "mall"}],
        "generalization": {"sources": ["campus", "mall"], "targets": ["station", "far"], "splits": 3},
        "method_options": {"cluster_contrast": {"eps": 0.7, "min_samples": 2, "k1": 6, "k2": 2}},
        "imagenet_weights": "cache", "train": TINY_TRAIN, "plots": True, **overrides,
    })


def test_protocol_grid_writes_every_table_reruns_nothing_and_retries_a_failed_trial(ray_cluster, tmp_path: Path):
    out = tmp_path / "out"
    first = run_downstream(_config(tmp_path, debug_fail_cells=[FAILING]), out_dir=out)
    assert list(first.errors) == [FAILING] and "injected failure" in first.errors[FAILING]
    assert not (tmp_path / "unused").exists()  # a listed dataset no cell reads is never generated
    config = _config(tmp_path)
    failing = next(c for c in plan_cells(config) if c.key == FAILING)
    tries = count_executions(out, failing)  # Tune retried it max_failures times already
    assert tries == 2

    second = run_downstream(config, out_dir=out)
    assert not second.errors and second.trained == [FAILING]  # only the failed trial ran again
    assert count_executions(out, failing) == tries + 1

    third = run_downstream(config, out_dir=out)
    assert third.trained == [] and all(count_executions(out, c) == (tries + 1 if c == failing else 1)
                                       for c in plan_cells(config))

    frame = pd.read_csv(out / "results.csv")
    assert (frame["status"] == "done").all()
    assert sorted(zip(frame["setting"], frame["dataset"])) == [
        ("da", "campus->mall"), ("dg", "far"), ("dg", "station"), ("supervised", "campus"), ("unsupervised", "campus")]
    row = frame.drop_duplicates("setting").set_index("setting")
    assert row.loc["unsupervised", "before_mAP"] >= 0 and row.loc["da", "direct_mAP"] >= 0
    assert row.loc["dg", "splits"] == 3 and row.loc["dg", "sources"] == "campus+mall"
    markdown = (out / "results.md").read_text()
    assert "- cells: 4 (4 done)" in markdown  # counted by cell: the dg cell has a row per target
    for section in ("Supervised (Table 2 layout)", "Unsupervised (Table 4 layout)",
                    "Domain adaptation (Table 5 layout)", "Domain generalization (Table 6 layout)"):
        assert f"## {section}" in markdown
    assert {"bars_unsupervised.png", "bars_da.png", "bars_dg.png"} <= {p.name for p in (out / "plots").iterdir()}
