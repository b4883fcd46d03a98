"""The evidence experiment's `imagenet` arm: no pre-training, fine-tuned from the downstream
`imagenet` init (timm's weights, or the `downstream.imagenet_standin` file); opted into by a
config, checked before any build or Ray starts, and named as the downstream report names it."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
from safetensors.torch import save_file

from core.config import ConfigError
from core.settings.experiment import ARM_IMAGENET, MAIN_ARMS
from core.settings.run import RunConfig, load_run_config
from core.storage import resolve
from eval.experiment.chains import chain_spec, plan_chains
from eval.experiment.report import arm_label, results_markdown
from eval.experiment.run import RUN_COLUMNS, check_imagenet_arm, run_experiment
from eval.experiment.stats import summarize

DATA = {"main": "file:///x/builds/main", "source": "file:///x/data/source", "source+main": "file:///x/data/sm"}


def _config(*overrides: str) -> RunConfig:
    return load_run_config(None, ["downstream.train.arch=resnet18", *overrides])


def _imagenet_only(*overrides: str) -> RunConfig:
    return _config("experiment.arms=[imagenet]", "experiment.baseline=imagenet", *overrides)


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A resnet18 backbone file, as `demo.imagenet_standin` saves one (untrained: only its fit matters)."""
    path = tmp_path_factory.mktemp("standin") / "backbone.safetensors"
    torch.manual_seed(3)
    save_file(timm.create_model("resnet18", num_classes=0).state_dict(), str(path))
    return path


@pytest.fixture
def no_cached_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty Hugging Face and torch-hub caches and no downloads: timm's real weights cannot be had."""
    for name in ("HF_HUB_CACHE", "TORCH_HOME"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # unset means offline (core.hub)
    return tmp_path / "hf_hub_cache"


def test_configs_opt_into_the_imagenet_arm() -> None:
    default = load_run_config(None)
    assert ARM_IMAGENET not in default.experiment.arms and ARM_IMAGENET not in MAIN_ARMS
    chosen = _config("experiment.arms=[random,imagenet]", "experiment.baseline=imagenet")
    assert chosen.experiment.arms == ["random", "imagenet"] and chosen.experiment.baseline == "imagenet"
    with pytest.raises(ConfigError, match="baseline 'imagenet' is neither an arm"):
        _config("experiment.arms=[random,source]", "experiment.baseline=imagenet")
    with pytest.raises(ConfigError, match="not an arm's name"):
        _config("experiment.ablations={imagenet: [generation.train_steps=1]}")


def test_imagenet_chains_pretrain_nothing_and_fine_tune_from_imagenet() -> None:
    config = _config("experiment.arms=[random,source,imagenet]", "experiment.seeds=[0,1]",
                     "downstream.imagenet_standin=weights/standin.safetensors")
    chains = {c.key: c for c in plan_chains(config, DATA)}
    assert {k for k in chains if k.startswith("imagenet/")} == {"imagenet/seed-0", "imagenet/seed-1"}
    out = resolve("file:///x")
    specs = {key: chain_spec(chain, config, out, "d") for key, chain in chains.items()}
    imagenet = specs["imagenet/seed-1"]
    assert imagenet["data"] is None and imagenet["downstream"]["inits"] == ["imagenet"]
    assert imagenet["downstream"]["seeds"] == [1] and imagenet["out"].endswith("/chains/imagenet/seed-1")
    # The chain reads the stand-in in a Ray worker, whose working directory need not be the driver's.
    assert imagenet["downstream"]["imagenet_standin"] == str(Path("weights/standin.safetensors").resolve())
    assert specs["random/seed-1"]["downstream"]["inits"] == ["random"]
    assert specs["random/seed-1"]["downstream"]["imagenet_standin"] == "weights/standin.safetensors"
    assert specs["source/seed-1"]["downstream"]["inits"] == ["ours"]
    assert imagenet["digest"] != specs["random/seed-1"]["digest"], "the two no-pre-training arms are distinct chains"


def test_the_other_arms_chains_keep_their_digests() -> None:
    """Adding the arm must not make a finished experiment's random / source / generated chains new."""
    out = resolve("file:///x")
    standin = "downstream.imagenet_standin=weights/standin.safetensors"
    without = _config("experiment.arms=[random,source,generated,source+generated]", standin)
    with_it = _config("experiment.arms=[random,source,generated,source+generated,imagenet]", standin)
    before = {c.key: chain_spec(c, without, out, "d") for c in plan_chains(without, DATA)}
    after = {c.key: chain_spec(c, with_it, out, "d") for c in plan_chains(with_it, DATA)}
    assert set(after) - set(before) == {f"imagenet/seed-{s}" for s in with_it.experiment.seeds}
    assert {key: after[key] for key in before} == before


def test_preflight_refuses_an_imagenet_arm_that_would_train_from_nothing(
    no_cached_weights: Path, tmp_path: Path
) -> None:
    config = _imagenet_only("downstream.imagenet_weights=cache")
    assert check_imagenet_arm(_config()) is None  # no arm, nothing resolved
    with pytest.raises(ConfigError, match=r"(?s)downstream.imagenet_standin is not set.*imagenet_weights"):
        check_imagenet_arm(config, hf_cache_dir=no_cached_weights)
    missing = _imagenet_only("downstream.imagenet_weights=cache",
                             f"downstream.imagenet_standin={tmp_path / 'absent.safetensors'}")
    with pytest.raises(ConfigError, match="its init cannot be loaded: downstream.imagenet_standin: "):
        check_imagenet_arm(missing, hf_cache_dir=no_cached_weights)
    # Wired into the command before any build, Ray or output: nothing is written.
    out = tmp_path / "experiment"
    with pytest.raises(ConfigError, match="imagenet_standin"):
        run_experiment(config, out, log=lambda line: None)
    assert not out.exists()


def test_preflight_takes_the_standin_when_timm_weights_are_missing(no_cached_weights: Path, standin: Path) -> None:
    config = _imagenet_only("downstream.imagenet_weights=cache", f"downstream.imagenet_standin={standin}")
    init = check_imagenet_arm(config, hf_cache_dir=no_cached_weights)
    assert init is not None and init.available and init.stand_in and init.state is None
    assert init.digest.startswith("standin-sha256:") and str(standin) in init.source
    wrong_arch = _imagenet_only("downstream.train.arch=resnet34", "downstream.imagenet_weights=cache",
                                f"downstream.imagenet_standin={standin}")
    with pytest.raises(ConfigError, match="its init cannot be loaded: downstream.imagenet_standin: "):
        check_imagenet_arm(wrong_arch, hf_cache_dir=no_cached_weights)


def _runs(arms: dict[str, list[float]]) -> pd.DataFrame:
    cell = {"dataset": "market", "method": "bot", "setting": "supervised", "group": "main", "status": "done",
            "rank1": 50.0, "pretrain_images": None, "pretrain_ids": None, "reason": None}
    rows = [{**cell, "arm": arm, "seed": seed, "mAP": value} for arm, values in arms.items()
            for seed, value in enumerate(values)]
    return pd.DataFrame(rows, columns=list(RUN_COLUMNS))


def test_the_report_names_the_imagenet_arm_and_its_standin(no_cached_weights: Path, standin: Path,
                                                            tmp_path: Path) -> None:
    from eval.experiment.run import _write_report

    assert arm_label("imagenet") == "ImageNet" and arm_label("imagenet", True) == "ImageNet (stand-in)"
    assert arm_label("source", True) == "source"
    summary = summarize(_runs({"imagenet": [10.0, 12.0], "generated": [13.0, 16.0]}), "imagenet")
    real = results_markdown(summary, "imagenet", {}, {})
    assert "| ImageNet | - | 2 | 11.0 ± 1.4 |" in real and "Δ mAP vs ImageNet [95 % CI]" in real
    assert "| generated | - | 2 | 14.5 ± 2.1 | 50.0 ± 0.0 | +3.5 [" in real  # paired with ImageNet by seed

    # The command's report, with the stand-in the config names: rows, baseline, meta and plots.
    config = _imagenet_only("experiment.arms=[imagenet,generated]", "downstream.imagenet_weights=cache",
                            f"downstream.imagenet_standin={standin}")
    init = check_imagenet_arm(config, hf_cache_dir=no_cached_weights)
    out = resolve(tmp_path / "out")
    _write_report(config, out, _runs({"imagenet": [10.0, 12.0], "generated": [13.0, 16.0]}), {}, init)
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "| ImageNet (stand-in) | - | 2 |" in markdown and "Δ mAP vs ImageNet (stand-in)" in markdown
    assert f"stand-in: {standin} (in place of timm's ImageNet weights, unavailable here)" in markdown
    assert set(pd.read_csv(tmp_path / "out" / "results.csv")["arm"]) == {"imagenet", "generated"}
    assert (tmp_path / "out" / "plots" / "map_market_bot.png").is_file()

    from eval.downstream.plots import plt
    from eval.experiment.report import _draw_map_bars

    figure, axis = plt.subplots()
    _draw_map_bars(axis, summary, summary, imagenet_stand_in=True)
    assert [t.get_text() for t in axis.get_xticklabels()] == ["ImageNet (stand-in)", "generated"]
    plt.close(figure)
