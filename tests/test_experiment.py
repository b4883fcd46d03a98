"""The evidence experiment's parts that need no training: its config, the statistics, the
pre-training sets it writes (source-only, source + generated), the build ablation settings and
the command's refusals. The chain end to end is `tests/test_demo_build.py::test_reduced_experiment_*`."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from core.config import ConfigError
from core.datasets.config import SyntheticSpec
from core.datasets.market import load_market1501
from core.datasets.synthetic import generate_synthetic_dataset
from eval.experiment.stats import paired_interval, summarize, t_quantile_975
from factory.build import run_models
from eval.experiment.builds import build_configs
from eval.experiment.chains import plan_chains
from core.settings.run import REPO_ROOT, load_run_config
from factory.stages.caption import CaptionStage, build_prompts
from trainers.pretrain.shards import read_shard_table, records_table, write_table_shards


def test_paired_interval_is_students_t_over_the_seed_differences() -> None:
    mean, low, high = paired_interval([1.0, 2.0, 3.0])
    # mean 2, sd 1, n 3: half width t(0.975, 2) / sqrt(3) = 4.303 / 1.732
    assert mean == 2.0 and high - mean == pytest.approx(4.303 / math.sqrt(3)) and mean - low == pytest.approx(high - mean)
    assert math.isnan(paired_interval([1.5])[1]) and paired_interval([1.5])[0] == 1.5
    assert t_quantile_975(1) == 12.706 and t_quantile_975(100) == 1.96


def test_summary_pairs_each_arm_with_the_baseline_by_seed() -> None:
    cell = {"dataset": "d", "method": "agw", "setting": "fs10", "group": "main", "status": "done",
            "pretrain_images": 10, "pretrain_ids": 2}
    runs = pd.DataFrame([
        {**cell, "arm": "source", "seed": 0, "mAP": 10.0, "rank1": 20.0},
        {**cell, "arm": "source", "seed": 1, "mAP": 14.0, "rank1": 20.0},
        {**cell, "arm": "generated", "seed": 0, "mAP": 11.0, "rank1": 21.0},
        {**cell, "arm": "generated", "seed": 1, "mAP": 17.0, "rank1": 23.0},
        {**cell, "arm": "generated", "seed": 2, "mAP": 90.0, "rank1": 90.0},  # no baseline seed 2: unpaired
        {**cell, "arm": "no-prior", "group": "ablation", "seed": 1, "mAP": 16.0, "rank1": 22.0},
    ])
    summary = summarize(runs, "source").set_index("arm")
    # An ablation is also compared with the method it ablates, at its own seeds (seed 1 here).
    assert summary.at["no-prior", "d_mAP"] == 2.0 and summary.at["no-prior", "dm_mAP"] == -1.0
    assert math.isnan(summary.at["no-prior", "dm_mAP_low"]) and math.isnan(summary.at["generated", "dm_mAP"])
    assert summary.at["source", "mAP_mean"] == 12.0 and math.isnan(summary.at["source", "d_mAP"])
    assert summary.at["generated", "seeds"] == 3 and summary.at["generated", "pairs"] == 2
    assert summary.at["generated", "d_mAP"] == 2.0  # (1 + 3) / 2, seed 2 left out
    assert summary.at["generated", "d_mAP_low"] < 2.0 < summary.at["generated", "d_mAP_high"]


def test_experiment_config_refuses_what_it_cannot_run() -> None:
    with pytest.raises(ConfigError, match="must be KEY.PATH=VALUE under"):
        load_run_config(None, ["experiment.ablations={x: [pretrain.epochs=1]}"])
    with pytest.raises(ConfigError, match="not an arm's name"):
        load_run_config(None, ["experiment.ablations={generated: [generation.train_steps=1]}"])
    with pytest.raises(ConfigError, match="baseline 'source' is neither an arm"):
        load_run_config(None, ["experiment.arms=[random,generated]"])


def test_each_ablation_is_a_build_of_its_own_named_in_its_errors() -> None:
    config = load_run_config(REPO_ROOT / "configs" / "evidence.yaml")
    builds = build_configs(config, "evidence.yaml")
    assert set(builds) == {"main", *config.experiment.ablations}
    assert builds["no-prior"].generation.prior_loss_weight == 0 and builds["main"].generation.prior_loss_weight > 0
    assert builds["category-prompt"].caption.captions == "category"
    assert builds["no-iir"].caption.use_iir is False
    bad = load_run_config(None, ["experiment.ablations={typo: [generation.train_stepz=1]}"])
    with pytest.raises(ConfigError, match=r"experiment.ablations.typo[\s\S]*unknown key 'generation.train_stepz'"):
        build_configs(bad, "demo.yaml")
    chains = plan_chains(config, {"main": "m", "source": "s", "source+main": "sm",
                                  **{name: name for name in config.experiment.ablations}})
    exp = config.experiment
    assert len(chains) == len(exp.arms) * len(exp.seeds) + len(exp.ablations) * len(exp.ablation_seeds)
    assert {c.data for c in chains if c.arm in ("random", "imagenet")} == {None}


def test_filter_only_ablations_score_the_main_builds_samples_again(tmp_path: Path) -> None:
    """Generating the same images twice would be most of such an ablation's cost."""
    from core.storage import resolve
    from eval.experiment.builds import share_samples

    config = load_run_config(REPO_ROOT / "configs" / "evidence.yaml")
    builds, out = build_configs(config, "evidence.yaml"), resolve(tmp_path)
    shared = {name: share_samples(build, builds["main"], out).generation.replay_from
              for name, build in builds.items() if name != "main"}
    main_uri = (out / "builds" / "main").uri
    assert {name for name, replay in shared.items() if replay == main_uri} == {"no-filter", "clip-filter", "cctf-filter"}
    assert shared["no-prior"] is None and shared["no-iir"] is None and shared["category-prompt"] is None
    # The build's execution settings are not what it generates: a variant may differ in them.
    more_actors = load_run_config(REPO_ROOT / "configs" / "evidence.yaml", ["generation.concurrency.max=4"])
    assert share_samples(more_actors, builds["main"], out).generation.replay_from == main_uri
    assert run_models(share_samples(builds["no-filter"], builds["main"], out)) == {
        "caption.model": config.caption.model}, "a replaying build loads no diffusion model"


def test_ablation_prompts_and_the_models_they_need() -> None:
    config = load_run_config(None)
    assert build_prompts("red coat", config.caption) == ("a photo of zwx person, red coat", "a photo of a person, red coat")
    no_iir = config.caption.model_copy(update={"use_iir": False})
    assert build_prompts("red coat", no_iir) == ("a photo of a person, red coat",) * 2
    category = load_run_config(None, ["caption.captions=category"])
    assert "caption.model" not in run_models(category) and "caption.model" in run_models(config)
    stage = CaptionStage(category.caption)
    stage.setup()  # loads no captioner
    table = pa.table({"identity": ["s/1"], "image_bytes": [[b"not decoded"]]})
    from factory.schema import SEQUENCE_SCHEMA

    full = pa.table({name: table.column(name) if name in table.column_names else pa.nulls(1, SEQUENCE_SCHEMA.field(name).type)
                     for name in SEQUENCE_SCHEMA.names})
    row = stage.process_batch(full).to_pylist()[0]
    assert row["caption"] == "" and row["prompt"] == "a photo of zwx person" and row["reference_prompt"] == "a photo of a person"


def test_source_and_generated_rows_of_one_identity_share_a_label(tmp_path: Path) -> None:
    source = generate_synthetic_dataset(tmp_path / "source", SyntheticSpec(ids=3, cameras=2, seed=4, images_per_camera=2))
    real = records_table(load_market1501(source).train, (32, 16))
    assert real.num_rows > 0 and set(real.column("prompt").to_pylist()) == {""}
    first = real.column("identity")[0].as_py()
    generated = real.filter(pa.compute.equal(real.column("identity"), first)).slice(0, 1)
    generated = generated.set_column(generated.schema.get_field_index("prompt"), "prompt", pa.array(["a photo of zwx"]))
    summary = write_table_shards(pa.concat_tables([real, generated]), tmp_path / "both", rows_per_shard=5)
    assert summary.num_classes == len(set(real.column("identity").to_pylist()))
    both = read_shard_table(tmp_path / "both")
    labels = {(i, p) for i, p in zip(both.column("identity").to_pylist(), both.column("pid").to_pylist())}
    assert len(labels) == summary.num_classes, "one label per identity, real and generated rows alike"
    assert both.num_rows == real.num_rows + 1
    # A rewrite replaces the shard set rather than mixing two.
    write_table_shards(real, tmp_path / "both", rows_per_shard=100)
    assert read_shard_table(tmp_path / "both").num_rows == real.num_rows


def test_cli_refuses_a_bad_ablation_before_any_work(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run(
        [sys.executable, "-m", "eval.experiment", "--out", str(tmp_path / "o"),
         "--set", "experiment.ablations={big: ['generation.resolution=[63,32]']}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "experiment.ablations.big" in result.stderr and "generation.resolution" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "o" / "builds").exists()


def test_a_build_folder_of_another_config_is_refused_not_resumed_over(tmp_path: Path) -> None:
    """A build resumes by identity (done identities are not redone), so a folder started under
    another filter threshold would silently mix two configs."""
    from core.storage import resolve
    from eval.experiment.builds import MARKER, place_build, refuse_changed_builds

    out = resolve(tmp_path)
    before = place_build("main", load_run_config(None, ["filter.threshold=0.5"]), out)
    (before[0] / MARKER).write_json({"digest": before[2], "finished": False})
    refuse_changed_builds({"main": place_build("main", load_run_config(None, ["filter.threshold=0.5"]), out)})
    after = place_build("main", load_run_config(None, ["filter.threshold=0.2"]), out)
    with pytest.raises(ConfigError, match="holds a build of another config"):
        refuse_changed_builds({"main": after})


def test_a_moved_experiment_folder_keeps_its_digests(tmp_path: Path) -> None:
    """Locations under OUT are hashed relative to it: an experiment copied to another path (or
    bucket) reuses its builds and chains instead of being refused or retrained."""
    from core.storage import resolve
    from eval.experiment.builds import (MAIN_BUILD, MARKER, _build_payload, digest, place_build,
                                        refuse_changed_builds, share_filter_models, share_samples)
    from eval.experiment.chains import chain_spec

    config = load_run_config(REPO_ROOT / "configs" / "evidence.yaml")
    builds = build_configs(config, "evidence.yaml")

    def digests(out_dir: Path) -> dict[str, str]:
        out = resolve(out_dir)
        placed = {name: place_build(name, share_samples(share_filter_models(b, builds[MAIN_BUILD], out),
                                                        builds[MAIN_BUILD], out), out) for name, b in builds.items()}
        data = {name: (out / "builds" / name).uri for name in builds} | {"source": (out / "data" / "source").uri,
                                                                          "source+main": (out / "data" / "sm").uri}
        chains = {c.key: chain_spec(c, config, out, "d")["digest"] for c in plan_chains(config, data)}
        return {name: place[2] for name, place in placed.items()} | chains

    first, moved = digests(tmp_path / "exp"), digests(tmp_path / "elsewhere" / "exp")
    assert first == moved and len(set(first.values())) == len(first)
    # Only locations under OUT: a sibling folder sharing its name as a prefix is not OUT.
    a, b = resolve(tmp_path / "exp"), resolve(tmp_path / "other")
    assert digest([f"{a.uri}/x"], a) == digest([f"{b.uri}/x"], b)
    assert digest([f"{a.uri}2/x"], a) != digest([f"{b.uri}2/x"], b)
    # A marker written before digests were relative (the absolute digest) is rewritten, not refused.
    location, placed_config, wanted = place_build(MAIN_BUILD, builds[MAIN_BUILD], a)
    (location / MARKER).write_json({"digest": digest(_build_payload(placed_config)), "finished": True})
    refuse_changed_builds({MAIN_BUILD: (location, placed_config, wanted)})
    assert (location / MARKER).read_json() == {"digest": wanted, "finished": True}
