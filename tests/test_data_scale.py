"""The data-scale study (the paper's Table 8, `experiment.data_scale`) without training: its
config, the nested subsets of the main build's shard rows, the pre-training sets written once
(100 % being the build itself), the chains it plans and its section of the report."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

from core.config import ConfigError
from core.settings.run import REPO_ROOT, RunConfig, load_run_config
from core.shards import SHARD_SCHEMA, encode_image
from core.storage import resolve
from eval.experiment.builds import MAIN_BUILD, build_configs
from eval.experiment.chains import plan_chains, pretraining_sets
from eval.experiment.report import results_markdown, scale_markdown, scale_table, write_scale_plots
from eval.experiment.run import RUN_COLUMNS
from eval.experiment.scale import (FULL_SCALE_ARM, IDENTITIES, IMAGES, identity_subset, image_subset, kept_count,
                                   plan_scale_runs, scale_subset)
from eval.experiment.stats import summarize
from trainers.pretrain.shards import inspect_shards, read_shard_table, write_table_shards

# Images per identity of the synthetic build: uneven, as a filter leaves them.
IMAGES_PER_IDENTITY = {"demo/3": 9, "demo/7": 4, "demo/11": 1, "demo/12": 7, "demo/20": 12, "demo/21": 5}


def _build_rows() -> pa.Table:
    """A build's kept rows in `SHARD_SCHEMA`, as the factory writes them (indices with gaps where
    the filter dropped samples)."""
    pixel = encode_image(Image.new("RGB", (4, 8), (90, 40, 10)))
    rows = []
    for identity, count in IMAGES_PER_IDENTITY.items():
        source, pid = identity.split("/")
        for index in range(0, 2 * count, 2):
            rows.append({"image": {"bytes": pixel, "path": f"{pid}_{index:03d}.jpg"}, "pid": 0, "source": source,
                         "source_pid": int(pid), "identity": identity, "prompt": "a photo of zwx person",
                         "seed": 1000 + index, "score": 0.9, "index": index})
    return pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)


@pytest.fixture(scope="module")
def build_table(tmp_path_factory: pytest.TempPathFactory) -> pa.Table:
    """The rows back from real shards (dense pids, several files), as the study reads them."""
    folder = tmp_path_factory.mktemp("build")
    write_table_shards(_build_rows(), folder, rows_per_shard=7)
    return read_shard_table(folder)


def _keys(table: pa.Table) -> set[tuple[str, int]]:
    return set(zip(table.column("identity").to_pylist(), table.column("index").to_pylist()))


def _shuffled(table: pa.Table, seed: int) -> pa.Table:
    return table.take(pa.array(np.random.default_rng(seed).permutation(table.num_rows)))


def _scale_config(scale: str, arms: str = "[random, source, generated, source+generated]",
                  seeds: str = "[0, 1, 2]", baseline: str = "source") -> RunConfig:
    return load_run_config(REPO_ROOT / "configs" / "evidence.yaml",
                           [f"experiment.data_scale={scale}", f"experiment.arms={arms}", f"experiment.seeds={seeds}",
                            f"experiment.baseline={baseline}", "experiment.ablations={}"])


def test_the_config_refuses_bad_percents_and_repeats_by_name() -> None:
    assert load_run_config(None).experiment.data_scale is None
    paper = load_run_config(None, ["experiment.data_scale={}"]).experiment.data_scale
    assert paper.images == paper.identities == [12.5, 25, 50, 100] and paper.seeds == [0]
    with pytest.raises(ConfigError, match=r"experiment.data_scale.images'[\s\S]*\[0.5, 101.0\] outside 1..100"):
        load_run_config(None, ["experiment.data_scale={images: [0.5, 50, 101]}"])
    with pytest.raises(ConfigError, match=r"experiment.data_scale.identities'[\s\S]*identities percents repeat: \[25.0\]"):
        load_run_config(None, ["experiment.data_scale={identities: [25, 50, 25.0]}"])
    with pytest.raises(ConfigError, match=r"experiment.data_scale.seeds'[\s\S]*seeds repeat: \[3\]"):
        load_run_config(None, ["experiment.data_scale={seeds: [3, 3]}"])
    with pytest.raises(ConfigError, match="both images and identities are empty"):
        load_run_config(None, ["experiment.data_scale={images: [], identities: []}"])
    with pytest.raises(ConfigError, match="experiment.data_scale.typo"):
        load_run_config(None, ["experiment.data_scale={typo: [10]}"])


def test_image_subsets_keep_a_share_of_every_identity_nested_and_order_free(build_table: pa.Table) -> None:
    assert [kept_count(8, p) for p in (12.5, 25, 30, 50, 100)] == [1, 2, 2, 4, 8]
    assert kept_count(5, 30) == 2 and kept_count(1, 12.5) == 1  # half up; never an identity without images
    for seed in (0, 1):
        smaller: set = set()
        for percent in (12.5, 25, 50, 100):
            subset = image_subset(build_table, percent, seed)
            counts = pd.Series(subset.column("identity").to_pylist()).value_counts().to_dict()
            assert counts == {i: kept_count(n, percent) for i, n in IMAGES_PER_IDENTITY.items()}
            assert smaller <= _keys(subset), f"seed {seed}: {percent} % does not hold the smaller share"
            smaller = _keys(subset)
            assert subset.equals(image_subset(_shuffled(build_table, int(percent)), percent, seed))
        assert smaller == _keys(build_table)
    assert _keys(image_subset(build_table, 25, 0)) != _keys(image_subset(build_table, 25, 1)), "a seed draws anew"


def test_identity_subsets_keep_whole_identities_nested_and_order_free(build_table: pa.Table) -> None:
    drawn = {}
    for seed in (0, 1):
        smaller: set = set()
        for percent in (12.5, 25, 50, 100):
            subset = scale_subset(build_table, IDENTITIES, percent, seed)
            kept = set(subset.column("identity").to_pylist())
            assert len(kept) == kept_count(len(IMAGES_PER_IDENTITY), percent)
            assert subset.num_rows == sum(IMAGES_PER_IDENTITY[i] for i in kept), "every image of a kept identity"
            assert smaller <= kept
            smaller = drawn[seed, percent] = kept
            assert subset.equals(identity_subset(_shuffled(build_table, 7), percent, seed))
    assert any(drawn[0, p] != drawn[1, p] for p in (12.5, 25, 50))
    with pytest.raises(ValueError, match="1..100"):
        scale_subset(build_table, IMAGES, 0.5, 0)


def test_each_point_is_written_once_and_100_percent_is_the_build(tmp_path: Path) -> None:
    config = _scale_config("{images: [25, 100], identities: [50, 100], seeds: [0]}", arms="[random, generated]",
                           baseline="random")
    out = resolve(tmp_path / "exp")
    build = out / "builds" / MAIN_BUILD
    write_table_shards(_build_rows(), build, rows_per_shard=5)
    markers = {MAIN_BUILD: {"digest": "b1", "images": 38}}
    lines: list[str] = []
    data, digests = pretraining_sets(config, out, markers, lines.append)
    assert data[MAIN_BUILD] == build.uri
    assert set(data) == {MAIN_BUILD, "scale-images-25-seed-0", "scale-ids-50-seed-0"}, "100 % writes no copy"
    assert sorted(f.name for f in Path(out.path, "data").iterdir()) == ["scale-ids-50-seed-0", "scale-images-25-seed-0"]
    images = inspect_shards(data["scale-images-25-seed-0"])
    assert images.num_classes == 6 and images.num_rows == sum(kept_count(n, 25) for n in IMAGES_PER_IDENTITY.values())
    ids = inspect_shards(data["scale-ids-50-seed-0"])  # pids dense again over the identities kept
    assert ids.num_classes == 3 and ids.num_rows < sum(IMAGES_PER_IDENTITY.values())
    assert len(lines) == 2

    # A rerun writes nothing; another build (another digest) rewrites every set.
    written = {f: f.stat().st_mtime_ns for f in Path(out.path, "data").rglob("*.parquet")}
    again, same = pretraining_sets(config, out, markers, lines.append)
    assert (again, same) == (data, digests) and len(lines) == 2
    assert {f: f.stat().st_mtime_ns for f in Path(out.path, "data").rglob("*.parquet")} == written
    _, other = pretraining_sets(config, out, {MAIN_BUILD: {"digest": "b2", "images": 38}}, lines.append)
    assert len(lines) == 4 and other["scale-ids-50-seed-0"] != digests["scale-ids-50-seed-0"]

    chains = {c.key: c for c in plan_chains(config, data)}
    assert chains["gen-img-25%/seed-0"].data == data["scale-images-25-seed-0"]
    assert chains["gen-ids-50%/seed-0"].data == data["scale-ids-50-seed-0"]
    assert chains["generated/seed-0"].group == "main" and chains["generated/seed-0"].data == build.uri
    assert not any("100" in key for key in chains), "100 % of both axes is the generated arm's chain"


def test_the_planned_chains_and_their_names() -> None:
    scale = "{images: [50, 12.5, 100], identities: [25, 100], seeds: [0, 5]}"
    config = _scale_config(scale)
    runs = plan_scale_runs(config.experiment)
    assert [(r.label, r.seed, r.arm) for r in runs if r.kind == IMAGES] == [
        ("images 12.5 %", 0, "gen-img-12.5%"), ("images 12.5 %", 5, "gen-img-12.5%"),
        ("images 50 %", 0, "gen-img-50%"), ("images 50 %", 5, "gen-img-50%"),
        ("images 100 %", 0, "generated"), ("images 100 %", 5, FULL_SCALE_ARM)]
    data = {MAIN_BUILD: "m", "source": "s", "source+main": "sm", **{r.data_name: r.data_name for r in runs if r.data_name}}
    chains = plan_chains(config, data)
    scale_chains = [c for c in chains if c.group == "scale"]
    assert sorted(c.key for c in scale_chains) == sorted(
        [f"{arm}/seed-{s}" for arm in ("gen-img-12.5%", "gen-img-50%", "gen-ids-25%") for s in (0, 5)]
        + ["gen-100%/seed-5"])
    assert len({c.key for c in chains}) == len(chains), "one chain per arm x seed"
    by_key = {c.key: c for c in chains}
    assert by_key["gen-ids-25%/seed-5"].data == "scale-ids-25-seed-5" and by_key["gen-100%/seed-5"].data == "m"
    assert by_key["generated/seed-0"].group == "main"

    # Without the generated arm the study still gets its build, and 100 % a chain of its own per seed.
    alone = _scale_config(scale, arms="[random, source]", seeds="[0]")
    assert set(build_configs(alone, "test")) == {MAIN_BUILD}
    hundred = {r.arm for r in plan_scale_runs(alone.experiment) if r.percent == 100}
    assert hundred == {FULL_SCALE_ARM}
    assert {c.key for c in plan_chains(alone, data) if c.arm == FULL_SCALE_ARM} == {"gen-100%/seed-0", "gen-100%/seed-5"}
    without = config.model_copy(update={"experiment": config.experiment.model_copy(update={"data_scale": None})})
    assert plan_chains(without, data) == [c for c in chains if c.group != "scale"], "no study, no chains"


def _runs(rows: list[dict]) -> pd.DataFrame:
    cell = {"dataset": "bench", "method": "agw", "status": "done", "reason": None}
    return pd.DataFrame([{**cell, **row} for row in rows], columns=list(RUN_COLUMNS))


def test_the_table_8_section_from_a_runs_frame(tmp_path: Path) -> None:
    config = _scale_config("{images: [50, 100], identities: [50, 100], seeds: [0, 1]}", seeds="[0, 2]")
    points = plan_scale_runs(config.experiment)
    # 100 %: the generated arm at seed 0 (its seed 2 is not the study's), gen-100% at seed 1.
    rows = []
    for setting, shift in (("fs10", 0.0), ("fs30", 10.0)):
        rows += [
            {"arm": "gen-img-50%", "group": "scale", "seed": 0, "setting": setting, "mAP": 20.0 + shift, "rank1": 30.0,
             "pretrain_images": 20, "pretrain_ids": 6},
            {"arm": "gen-img-50%", "group": "scale", "seed": 1, "setting": setting, "mAP": 22.0 + shift, "rank1": 34.0,
             "pretrain_images": 20, "pretrain_ids": 6},
            {"arm": "gen-ids-50%", "group": "scale", "seed": 0, "setting": setting, "mAP": 25.0 + shift, "rank1": 35.0,
             "pretrain_images": 17, "pretrain_ids": 3},
            {"arm": "gen-ids-50%", "group": "scale", "seed": 1, "setting": setting, "status": "error",
             "reason": "boom", "pretrain_images": 26, "pretrain_ids": 3},
            {"arm": "generated", "group": "main", "seed": 0, "setting": setting, "mAP": 30.0 + shift, "rank1": 40.0,
             "pretrain_images": 38, "pretrain_ids": 6},
            {"arm": "generated", "group": "main", "seed": 2, "setting": setting, "mAP": 90.0, "rank1": 90.0,
             "pretrain_images": 38, "pretrain_ids": 6},
            {"arm": FULL_SCALE_ARM, "group": "scale", "seed": 1, "setting": setting, "mAP": 32.0 + shift,
             "rank1": 44.0, "pretrain_images": 38, "pretrain_ids": 6},
        ]
    runs = _runs(rows)
    table = scale_table(runs, points)
    assert list(zip(table["kind"], table["percent"]))[::2] == [(IMAGES, 50), (IMAGES, 100), (IDENTITIES, 50),
                                                               (IDENTITIES, 100)]
    full = table[(table["kind"] == IMAGES) & (table["percent"] == 100) & (table["setting"] == "fs10")].iloc[0]
    assert full["mAP_mean"] == 31.0 and full["seeds"] == 2 and full["arms"] == "gen-100%,generated"
    text = scale_markdown(table, [0, 1])
    lines = text.splitlines()
    assert lines[0] == "## Data scale (Table 8 layout)"
    header = next(line for line in lines if line.startswith("| pre-training data"))
    assert header.count("AGW bench") == 2
    assert "| images 50 % | 20 | 6 | 21.0 ± 1.4 / 32.0 ± 2.8 | 31.0 ± 1.4 / 32.0 ± 2.8 |" in lines
    assert "| identities 50 % | 17-26 | 3 | 25.0 / 35.0 (1 of 2 seeds) | 35.0 / 35.0 (1 of 2 seeds) |" in lines
    assert "| identities 100 % | 38 | 6 | 31.0 ± 1.4 / 42.0 ± 2.8 | 41.0 ± 1.4 / 42.0 ± 2.8 |" in lines
    assert not math.isnan(table["mAP_mean"].max()) and "90.0" not in text, "the generated arm's other seeds stay out"

    # The arms also sit in the per-setting tables, marked as the study's.
    summary = summarize(runs, "generated")
    assert "| gen-img-50% (scale) |" in results_markdown(summary, "generated", {}, {})
    (plot,) = write_scale_plots(table, tmp_path / "plots")
    assert plot.name == "scale_bench_agw.png" and plot.stat().st_size > 0
