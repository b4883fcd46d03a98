"""One cell of each setting without target labels, run directly (no Ray): `unsupervised`, `da` and
`dg` on tiny procedural domains, and their rows in the tables. The Tune grid that schedules them
is tested in tests/test_protocol_grid.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.datasets.registry import load_source
from core.storage import resolve
from core.settings.downstream import DownstreamConfig, Setting
from eval.downstream.cells import Cell
from eval.downstream.generalization import merged_source_records, run_generalization_cell
from eval.downstream.inits import random_init
from eval.downstream.runner import TrialContext, collect_rows
from eval.downstream.tables import results_frame, results_markdown
from eval.downstream.unsupervised import hidden_labels, run_adaptation_cell, run_unsupervised_cell

TINY_TRAIN = {
    "arch": "resnet18", "image_size": [64, 32], "epochs": 1, "warmup_epochs": 0, "milestones": [],
    "ids_per_batch": 4, "images_per_id": 2, "pad": 2, "loader_workers": 0, "eval_batch_size": 32,
}


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> DownstreamConfig:
    root = tmp_path_factory.mktemp("domains")

    def domain(name: str, seed: int, kind: str) -> dict:
        return {"kind": "synthetic", "root": str(root / name), "name": name,
                "generate": {"ids": 6, "cameras": 2, "seed": seed, "images_per_camera": 2, "domain": kind}}

    return DownstreamConfig.model_validate({
        "datasets": [domain("campus", 1, "campus"), domain("mall", 2, "mall"), domain("station", 3, "station")],
        "settings": ["unsupervised", "da", "dg"], "methods": ["bot"], "inits": ["random"],
        "supervised_datasets": ["campus"],
        "adaptation": [{"source": "campus", "target": "mall"}],
        "generalization": {"sources": ["campus", "mall"], "targets": ["station"], "splits": 3},
        "method_options": {"cluster_contrast": {"eps": 0.7, "min_samples": 2, "k1": 6, "k2": 2}},
        "train": TINY_TRAIN,
    })


@pytest.fixture(scope="module")
def datasets(config: DownstreamConfig) -> dict:
    return {d.source_name: load_source(d) for d in config.datasets}


def test_methods_without_labels_never_see_them(datasets: dict) -> None:
    hidden = hidden_labels(datasets["campus"].train)
    assert len(hidden) == len(datasets["campus"].train) and {r.pid for r in hidden} == {0}


def test_unsupervised_cell_reports_the_untrained_reference_and_its_clusters(config, datasets) -> None:
    torch.set_num_threads(1)
    cell = Cell("campus", "cluster_contrast", "random", Setting.parse("unsupervised"), 0)
    result = run_unsupervised_cell(cell, datasets["campus"], config, random_init(), torch.device("cpu"))
    assert result["kind"] == "unsupervised" and 0 <= result["mAP"] <= 1 and 0 <= result["before_mAP"] <= 1
    assert result["train_ids"] is None and result["train_images"] == len(datasets["campus"].train)
    assert result["clusters"] is not None and len(result["history"]) == 1


def test_adaptation_cell_records_source_direct_transfer_and_adapted(config, datasets) -> None:
    cell = Cell("campus->mall", "cluster_contrast", "random", Setting.parse("da"), 0)
    result = run_adaptation_cell(cell, datasets["campus"], datasets["mall"], config, random_init(),
                                 torch.device("cpu"), images={})
    assert (result["source"], result["target"]) == ("campus", "mall")
    for key in ("mAP", "direct_mAP", "source_mAP"):
        assert 0 <= result[key] <= 1
    assert result["epochs"] == 2  # one source epoch, one adaptation epoch


def test_generalization_cell_trains_on_every_source_image_and_tests_each_target_over_splits(config, datasets):
    merged = merged_source_records({name: datasets[name] for name in ("campus", "mall")})
    # every image of both sources, test identities included (the DG protocol trains on whole sources)
    assert len(merged) == sum(1 for name, d in datasets.items() if name != "station"
                              for r in (*d.train, *d.query, *d.gallery) if not r.distractor)
    cell = Cell("campus+mall", "bot", "random", Setting.parse("dg"), 0)
    kinds = {d.source_name: d.kind for d in config.datasets}
    result = run_generalization_cell(cell, datasets, kinds, config, random_init(), torch.device("cpu"), images={})
    target = result["targets"]["station"]
    assert target["splits"] == 3 and len(target["per_split"]) == 3 and target["mAP_std"] >= 0
    assert result["train_ids"] == 4 * 6  # 6 train + 6 test identities in each of the two sources

    # the rows and the tables: one row per target, the Table 6 layout
    from eval.downstream.cells import RESULT_FILE, cell_digest

    out = Path(config.datasets[0].root).parent / "out"
    digest = cell_digest(cell, config, random_init())
    (cell.directory(out) / RESULT_FILE).write_json({**result, "digest": digest})
    context = TrialContext(config, resolve(out), datasets, {"random": random_init()}, digests={cell.key: digest})
    rows = collect_rows([cell], context)
    assert [(r["dataset"], r["setting"]) for r in rows] == [("station", "dg")]
    assert rows[0]["mAP"] == pytest.approx(100 * target["mAP"]) and rows[0]["sources"] == "campus+mall"
    markdown = results_markdown(results_frame(rows), ["bot"], ["dg"])
    assert "Domain generalization (Table 6 layout)" in markdown and "trained on campus+mall" in markdown


def test_a_dg_cell_without_a_result_still_has_a_row_per_target(config, datasets) -> None:
    from eval.downstream.inits import InitWeights

    cell = Cell("campus+mall", "bot", "imagenet", Setting.parse("dg"), 0)
    unavailable = InitWeights("imagenet", False, reason="offline")
    context = TrialContext(config, resolve(Path(config.datasets[0].root).parent / "none"), datasets,
                           {"imagenet": unavailable}, digests={cell.key: "x"})
    rows = collect_rows([cell], context)
    assert [(r["dataset"], r["status"], r["reason"]) for r in rows] == [("station", "unavailable", "offline")]
