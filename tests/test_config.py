"""Typed configuration: presets, inheritance, --set overrides, errors that name key and file."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.config import ConfigError, load_config, save_config
from core.settings.run import REPO_ROOT, RunConfig, load_run_config
from core.settings.reid import ReidTrainConfig


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_presets_load_and_validate() -> None:
    demo = load_run_config(REPO_ROOT / "configs" / "demo.yaml")
    paper = load_run_config(REPO_ROOT / "configs" / "paper.yaml")
    # the embedded default's models are the committed folders of the workshop, loaded in place
    assert (demo.generation.base_model, demo.caption.model, demo.filter.clip_model) == (
        "demo/weights/text-to-image", "demo/weights/captioner", "demo/weights/clip")
    assert paper.generation.base_model == "CompVis/stable-diffusion-v1-4"
    assert paper.caption.model == "Salesforce/blip2-opt-2.7b"
    assert paper.generation.resolution == (512, 512)
    assert paper.generation.learning_rate == 2e-6
    assert paper.generation.train_steps == 1000
    assert paper.generation.reference_images == 200
    assert paper.generation.samples_per_identity == 150
    assert paper.output.image_size == (256, 128)


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    preset = write(tmp_path / "bad.yaml", "sources: [{kind: synthetic, root: x}]\ngeneration:\n  trian_steps: 5\n")
    with pytest.raises(ConfigError) as err:
        load_run_config(preset)
    assert "generation.trian_steps" in str(err.value)
    assert str(preset) in str(err.value)


def test_wrong_type_names_key_and_value(tmp_path: Path) -> None:
    preset = write(tmp_path / "bad.yaml", "sources: [{kind: synthetic, root: x}]\ngeneration:\n  learning_rate: fast\n")
    with pytest.raises(ConfigError) as err:
        load_run_config(preset)
    assert "generation.learning_rate" in str(err.value) and "'fast'" in str(err.value)


def test_overrides_are_typed_and_validated(tmp_path: Path) -> None:
    config = load_run_config(None, ["generation.train_steps=7", "caption.concurrency.max=3", "filter.kind=cctf"])
    assert config.generation.train_steps == 7 and config.caption.concurrency.max == 3 and config.filter.kind == "cctf"
    with pytest.raises(ConfigError, match="generation.train_steps"):
        load_run_config(None, ["generation.train_steps=-1"])
    with pytest.raises(ConfigError, match="nonsense"):
        load_run_config(None, ["nonsense.key=1"])
    indexed = load_run_config(None, ["sources.0.root=/data/x", "sources.0.generate.ids=7"])
    assert str(indexed.sources[0].root) == "/data/x" and indexed.sources[0].generate.ids == 7
    with pytest.raises(ConfigError, match="not an index"):
        load_run_config(None, ["sources.5.root=/data/x"])
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        load_run_config(None, ["generation.train_steps"])


def test_base_inheritance_and_cycles(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", "epochs: 5\nbase_lr: 0.1\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\nepochs: 9\n")
    config = load_config(ReidTrainConfig, child)
    assert (config.epochs, config.base_lr) == (9, 0.1)
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(ReidTrainConfig, tmp_path / "a.yaml")


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_run_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(write(tmp_path / "x.yaml", "a: [1, 2\n"))


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    config = load_run_config(None, ["generation.seed=3"])
    path = save_config(config, tmp_path / "config.yaml")
    assert load_config(RunConfig, path) == config


def test_cli_fails_fast_on_unknown_key() -> None:
    """The whole CLI round trip (interpreter start + imports) must reject a typo in seconds,
    before Ray starts or any model loads."""
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "factory.build", "--set", "generation.no_such_key=1"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=60,
    )
    elapsed = time.perf_counter() - start
    assert result.returncode == 2
    assert "generation.no_such_key" in result.stderr and "demo.yaml" in result.stderr
    assert "Traceback" not in result.stderr
    assert elapsed < 20, elapsed  # generous for a loaded 2-core CI box; typically ~2 s


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sources=[{kind: synthetic, root: /tmp/a}, {kind: synthetic, root: /tmp/b}]", r"source names repeat: \['synthetic'\] \(set 'name'\)"),
        ("downstream.seeds=[3, 1, 3]", r"downstream.seeds.*entries repeat: \[3\]"),
        ("experiment.arms=[random, source, random]", r"experiment.arms.*entries repeat: \['random'\]"),
    ],
)
def test_repeated_names_and_entries_are_refused_naming_the_repeat(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_run_config(None, [override])
