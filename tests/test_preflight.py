"""The build's check phase: every value the models or the data cannot take is refused by
`python -m factory.build` in seconds, naming key, value and reason, before Ray starts, a model
loads or anything is written. One row per rule; each row runs the real CLI entry point on the
embedded default (configs/demo.yaml) with one or two `--set` overrides."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from factory.build import main
from core.settings.run import REPO_ROOT, load_run_config

CHECK_SECONDS = 5.0  # the issue's bound for a refusal; typically well under a second here


@pytest.fixture(scope="module")
def demo_ready() -> None:
    """The demo source written once (one-time, not part of what a refusal costs), as the first
    `python -m factory.build` would leave it; the demo models are committed folders (demo/weights)."""
    from core.datasets.registry import load_source

    cwd = os.getcwd()
    os.chdir(REPO_ROOT)
    try:
        config = load_run_config()
        for source in config.sources:
            load_source(source)
    finally:
        os.chdir(cwd)


def _foreign_filter_model(directory: Path, pids: list[int], weights: bool = True) -> Path:
    """A filter_model.json trained on other identities than the demo source's (pids 1000+)."""
    directory.mkdir(parents=True)
    if weights:
        (directory / "model.safetensors").write_bytes(b"")
    meta = {"weights": "model.safetensors", "config": {}, "labels": {str(p): i for i, p in enumerate(pids)}}
    (directory / "filter_model.json").write_text(json.dumps(meta))
    return directory


# (id, overrides, the key named, a phrase of the reason). `{tmp}` is the test's tmp_path.
RULES = [
    # pydantic, at load time
    ("output-size-zero", ["output.image_size=[0,0]"], "output.image_size", "greater than 0"),
    ("resolution-negative", ["generation.resolution=[-8,32]"], "generation.resolution", "greater than 0"),
    # phase 1: the config alone
    ("filter-kind-unregistered", ["filter.kind=sharpness"], "filter.kind",
     "no filter is registered under that name (registered: cctf, clip, reid)"),
    ("threshold-above-reid-range", ["filter.threshold=1.5"], "filter.threshold", "scores in [-1, 1]"),
    ("threshold-below-cctf-range", ["filter.kind=cctf", "filter.threshold=-0.2"], "filter.threshold",
     "scores in [0, 1]"),
    ("clip-without-negatives", ["filter.kind=clip", "filter.clip_negatives=[]"], "filter.clip_negatives",
     "every image scores 1.0"),
    ("prompt-without-iir", ["caption.prompt_template=no-iir-here {caption}"], "caption.prompt_template",
     "must contain {iir}"),
    ("prompt-without-caption", ["caption.prompt_template=a photo of {iir} person"], "caption.prompt_template",
     "must contain {caption}"),
    ("prompt-unknown-field", ["caption.prompt_template='{iir} {caption} {colour}'"], "caption.prompt_template",
     "unknown placeholder(s) {colour}"),
    ("prompt-broken-brace", ["caption.prompt_template=a {iir person {caption}"], "caption.prompt_template",
     "not a valid format string"),
    ("reference-with-iir", ["caption.reference_template='{iir} person, {caption}'"], "caption.reference_template",
     "unknown placeholder(s) {iir}"),
    ("iir-two-words", ["caption.iir_token=zwx qpv"], "caption.iir_token", "one word"),
    ("prior-without-references", ["generation.reference_images=0"], "generation.reference_images",
     "needs an Attribute Reference Set"),
    ("references-below-batch", ["generation.reference_images=1", "generation.train_batch_size=2"],
     "generation.reference_images", "draws generation.train_batch_size=2"),
    ("min-above-max-images", ["sequences.min_images=7"], "sequences.min_images", "every identity would be skipped"),
    ("checkpoint-for-unknown-source", ["filter.reid_checkpoints={market1501: /nowhere}"],
     "filter.reid_checkpoints.market1501", "no source is named 'market1501'"),
    ("fault-injection-malformed", ["generation.debug_fail_identities=[nonsense]"],
     "generation.debug_fail_identities", "not an identity 'SOURCE/PID[:oom|:cuda]'"),
    # phase 2: the model's own files
    ("resolution-not-multiple-of-8", ["generation.resolution=[63,32]"], "generation.resolution",
     "multiples of 8"),
    ("iir-known-to-tokenizers", ["caption.iir_token=person"], "caption.iir_token", "already knows it"),
    # phase 3: the dataset listing
    ("checkpoint-missing", ["filter.reid_checkpoints={synthetic: {tmp}/nowhere}"],
     "filter.reid_checkpoints.synthetic", "no filter_model.json"),
    ("checkpoint-of-other-source", ["filter.reid_checkpoints={synthetic: {tmp}/foreign}"],
     "filter.reid_checkpoints.synthetic", "not trained on source 'synthetic'"),
    ("checkpoint-without-weights", ["filter.reid_checkpoints={synthetic: {tmp}/weightless}"],
     "filter.reid_checkpoints.synthetic", "does not exist"),
    ("pk-batch-larger-than-source", ["filter.reid.ids_per_batch=30"], "filter.reid.ids_per_batch",
     "24 training identities"),
    ("fault-injection-unplanned", ["generation.debug_fail_identities=[synthetic/999]"],
     "generation.debug_fail_identities", "not among the 12 planned identities"),
]


@pytest.mark.parametrize(("overrides", "key", "reason"), [r[1:] for r in RULES], ids=[r[0] for r in RULES])
def test_rule_refuses_before_heavy_work(
    demo_ready: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    overrides: list[str], key: str, reason: str,
) -> None:
    monkeypatch.chdir(REPO_ROOT)
    _foreign_filter_model(tmp_path / "foreign", [1000, 1001, 1002])
    _foreign_filter_model(tmp_path / "weightless", list(range(1, 25)), weights=False)
    out = tmp_path / "out"
    args = ["--out", str(out)]
    for override in overrides:
        args += ["--set", override.replace("{tmp}", str(tmp_path))]

    start = time.perf_counter()
    code = main(args)
    elapsed = time.perf_counter() - start

    err = capsys.readouterr().err
    assert code == 2, err
    assert key in err and reason in err, err
    assert "demo.yaml" in err, "the message names the config file"
    assert elapsed < CHECK_SECONDS, f"refused after {elapsed:.1f} s"
    assert not out.exists(), "nothing is written before the check phase passes"


def test_every_problem_is_reported_at_once(demo_ready: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(REPO_ROOT)
    code = main(["--out", str(tmp_path / "out"), "--set", "filter.threshold=1.5",
                 "--set", "caption.prompt_template=no iir {caption}", "--set", "sequences.min_images=7"])
    err = capsys.readouterr().err
    assert code == 2 and "3 problems" in err
    assert all(k in err for k in ("filter.threshold", "caption.prompt_template", "sequences.min_images")), err


def test_eight_bit_adam_where_bitsandbytes_cannot_load(demo_ready: None, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A machine without bitsandbytes (None in sys.modules makes its import raise ImportError)."""
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    start = time.perf_counter()
    code = main(["--out", str(tmp_path / "out"), "--set", "generation.use_8bit_adam=true"])
    err = capsys.readouterr().err
    assert code == 2 and "generation.use_8bit_adam" in err and "bitsandbytes cannot be loaded" in err, err
    assert time.perf_counter() - start < CHECK_SECONDS


def test_eight_bit_adam_passes_where_bitsandbytes_loads(demo_ready: None) -> None:
    from factory.preflight import check_config

    pytest.importorskip("bitsandbytes")  # in the lock for Linux x86_64
    config = load_run_config(overrides=["generation.use_8bit_adam=true"])
    assert [p for p in check_config(config) if p.key == "generation.use_8bit_adam"] == []


def test_presets_pass_the_config_phase() -> None:
    from factory.preflight import check_config

    for preset in sorted((REPO_ROOT / "configs").glob("*.yaml")):
        if preset.name == "reid_demo.yaml":
            continue  # a trainer preset, not a run preset
        config = load_run_config(preset)
        assert [p for p in check_config(config) if p.key != "generation.use_8bit_adam"] == [], preset.name


def test_cli_refuses_the_issue_example_in_seconds(demo_ready: None, tmp_path: Path) -> None:
    """`generation.resolution=[63,32]` used to train the filter model, fail every identity and exit 0."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "factory.build", "--out", str(tmp_path / "out"), "--set", "generation.resolution=[63,32]"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    elapsed = time.perf_counter() - start
    assert result.returncode == 2, result.stderr[-2000:]
    assert "generation.resolution = [63, 32]" in result.stderr and "vae/config.json" in result.stderr
    assert "Traceback" not in result.stderr
    assert elapsed < 20, elapsed  # interpreter start + imports on a loaded 2-core CI box; ~1 s quiet


def test_relative_out_inside_ray_job_submit_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path, capsys) -> None:
    """Inside `ray job submit` the working directory is a temporary copy: a relative --out would
    vanish with it. Refused at once (exit 2); a URI or an absolute path is accepted."""
    from factory.build import RAY_JOB_ENV, output_location
    from core.settings.run import load_run_config

    monkeypatch.setenv(RAY_JOB_ENV, '{"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}}')
    assert main(["--out", "outputs/demo"]) == 2
    err = capsys.readouterr().err
    assert "--out 'outputs/demo' is relative" in err and "ray job submit" in err
    config = load_run_config(None, [])
    assert output_location(str(tmp_path / "abs"), config).uri == str(tmp_path / "abs")
    assert output_location(f"file://{tmp_path}/uri", config).uri == str(tmp_path / "uri")
    monkeypatch.delenv(RAY_JOB_ENV)
    assert output_location("outputs/demo", config).is_local
