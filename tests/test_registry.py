"""One registry pattern (`core.registry`) for every pluggable component, and what it buys: a
filter and a source adapter that only this module defines and registers are accepted by the
config, the build's check phase and a build on the demo's tiny models, with no product file
naming them. The registrations are undone after each test (`remove`)."""

from __future__ import annotations

import functools
import io
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
import yaml
from PIL import Image
from pydantic import ValidationError

from core.config import ConfigError
from core.datasets.base import DatasetError, ImageRecord, ReidDataset
from core.datasets.config import SourceConfig
from core.datasets.registry import SOURCES, SourceAdapter, load_source
from core.registry import Registry, UnknownComponent
from core.settings.run import RunConfig, load_run_config
from core.settings.stages import FilterConfig
from core.storage import resolve
from factory.filters import FILTERS, FilterStage, ImageFilter
from factory.preflight import check_config, check_sources
from factory.schema import GENERATED_SCHEMA
from factory.sequences import plan_identities
from tests.pipeline_fixtures import save_tiny_models, small_preset

SCORE = 0.75  # what the constant filter gives every image
IDENTITIES, IMAGES_PER_IDENTITY = 3, 3


def test_a_registry_names_its_components_refuses_duplicates_and_forgets_removed_ones() -> None:
    widgets: Registry[object] = Registry("widget", "widgets[].kind")

    @widgets.register("one")
    def one() -> int:
        return 1

    assert one() == 1  # the decorator returns the function as it is
    widgets.add("two", 2)
    assert widgets.names() == ["one", "two"] and "two" in widgets and widgets.get("one") is one
    with pytest.raises(ValueError, match="a widget named 'two' is already registered"):
        widgets.add("two", 3)
    widgets.add("two", 3, replace=True)  # a plug-in overriding a component on purpose
    assert widgets.get("two") == 3
    with pytest.raises(UnknownComponent) as unknown:
        widgets.get("three")
    assert str(unknown.value) == "widgets[].kind: unknown widget 'three' (registered: one, two)"
    with pytest.raises(ValueError, match=r"unknown widget 'three' \(registered: one, two\)"):
        widgets.check("three")  # what a pydantic validator calls
    assert widgets.check("one") == "one"
    for bad in ("", " one"):
        with pytest.raises(ValueError, match="non-empty word"):
            widgets.add(bad, 0)
    widgets.remove("two")
    widgets.remove("two")  # removing what is gone is a no-op: cleanups may run twice
    assert widgets.names() == ["one"] and "two" not in widgets


def test_the_built_in_components_register_themselves_with_what_the_build_needs_to_know() -> None:
    from eval.downstream.methods import METHODS

    assert SOURCES.names() == ["airport", "csv", "cuhk02", "cuhk03", "cuhk_sysu", "folder", "grid", "ilids",
                               "market1501", "msmt17", "personx", "prid", "synthetic", "viper"]
    assert SOURCES.get("cuhk03").variants == ("labeled", "detected") and SOURCES.get("msmt17").variants == ("v1", "v2")
    assert [name for name, adapter in SOURCES.items() if adapter.accepts_generate] == ["synthetic"]
    assert {"reid", "cctf", "clip"} <= set(FILTERS.names()) and {"bot", "agw"} <= set(METHODS.names())
    reid, cctf, clip = (FILTERS.get(name) for name in ("reid", "cctf", "clip"))
    assert (reid.score_range, cctf.score_range, clip.score_range) == ((-1.0, 1.0), (0.0, 1.0), (0.0, 1.0))
    assert reid.uses_reid_models and cctf.uses_reid_models and not clip.uses_reid_models
    config = FilterConfig(kind="clip")
    assert clip.run_models(config) == {"filter.clip_model": config.clip_model} and reid.run_models(config) == {}


# -- a filter and a source adapter of this module only --------------------------------------------
class ConstantFilter(ImageFilter):
    """Scores every generated image `SCORE`: no model to load, no Re-ID model per source."""

    score_range = (0.0, 1.0)

    def score_images(self, row: Mapping) -> list[float]:
        return [SCORE] * len(row["generated"])


class FlatSource(SourceAdapter):
    """`root/<pid>_<frame>.png`: every image a training image of camera 0."""

    def load(self, config: SourceConfig) -> ReidDataset:
        root = Path(config.root)
        records = [ImageRecord(path=str(path), source=config.source_name, pid=int(path.stem.split("_")[0]), camid=0,
                               split="train", frame=int(path.stem.split("_")[1]))
                   for path in sorted(root.glob("*.png"))]
        if not records:
            raise DatasetError(f"{root}: no <pid>_<frame>.png images")
        return ReidDataset(config.source_name, root, train=records)


@pytest.fixture
def registered() -> Iterator[None]:
    FILTERS.add("constant", ConstantFilter)
    SOURCES.add("flat", FlatSource)
    try:
        yield
    finally:
        FILTERS.remove("constant")
        SOURCES.remove("flat")


def _png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 64), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _flat_dataset(root: Path) -> Path:
    root.mkdir(parents=True)
    for pid in range(1, IDENTITIES + 1):
        for frame in range(IMAGES_PER_IDENTITY):
            (root / f"{pid}_{frame}.png").write_bytes(_png((60 * pid, 20 * frame, 200 - 50 * pid)))
    return root


def _flat_preset(path: Path, root: Path, sd: Path, blip: Path, threshold: float = 0.5) -> Path:
    """The pipeline tests' small preset with this module's source and filter, named by the config."""
    small_preset(path, root, sd, blip, None, filter__kind="constant", filter__threshold=threshold)
    preset = yaml.safe_load(path.read_text())
    preset["sources"] = [{"kind": "flat", "root": str(root)}]
    path.write_text(yaml.safe_dump(preset))
    return path


def test_the_config_and_the_check_phase_accept_the_filter_and_source_registered_here(
    registered: None, tmp_path: Path
) -> None:
    root = _flat_dataset(tmp_path / "flat")
    config = load_run_config(_flat_preset(tmp_path / "preset.yaml", root, tmp_path / "sd", tmp_path / "blip"))
    assert (config.sources[0].kind, config.sources[0].source_name, config.filter.kind) == ("flat", "flat", "constant")
    assert check_config(config) == []
    datasets = [load_source(source) for source in config.sources]
    assert datasets[0].train_identities == [1, 2, 3]
    # no Re-ID filter model is asked for: the constant filter does not declare `uses_reid_models`
    plan = plan_identities(datasets, config.sequences)
    assert check_sources(config, datasets, plan, resolve(tmp_path / "filter_models")) == []

    # the check phase takes the threshold rule from the class
    too_high = config.model_copy(update={"filter": config.filter.model_copy(update={"threshold": 1.5})})
    assert [(p.key, p.reason.split(";")[0]) for p in check_config(too_high)] == [
        ("filter.threshold", "the 'constant' filter scores in [0, 1]")]
    # the source adapter's declarations decide its options
    with pytest.raises(ValidationError, match="variant 'v1' is not valid for kind 'flat'"):
        SourceConfig(kind="flat", root=root, variant="v1")


def test_unregistered_names_are_refused_naming_the_registered_ones(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"sources\[\].kind: unknown source 'flat' \(registered: airport, .*synthetic, viper\)"):
        SourceConfig(kind="flat", root=tmp_path)
    with pytest.raises(ConfigError, match=r"sources.0.kind"):
        load_run_config(None, [f"sources=[{{kind: flat, root: {tmp_path}}}]"])
    config = load_run_config(None, ["filter.kind=constant"])  # a string the config takes; the check phase refuses it
    assert [(p.key, p.value) for p in check_config(config)] == [("filter.kind", "constant")]
    assert "registered: cctf, clip, reid" in check_config(config)[0].reason
    with pytest.raises(UnknownComponent, match="filter.kind: unknown filter 'constant'"):
        FilterStage(config.filter, {})  # by default the stage looks its filter up in its own process


def test_the_filter_stage_runs_the_class_it_is_handed_as_ray_carries_it(tmp_path: Path) -> None:
    """A Ray actor's process has no registration of this module's filter: the build hands the
    stage the class itself, which Ray's cloudpickle carries (here by value, as for a class a
    driver script or notebook defines)."""
    from ray import cloudpickle

    config = FilterConfig(kind="constant", threshold=0.5)  # registered nowhere in this test
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    try:
        make_stage = cloudpickle.loads(cloudpickle.dumps(
            functools.partial(FilterStage, config, {}, 0.0, None, ConstantFilter)))
    finally:
        cloudpickle.unregister_pickle_by_value(module)
    stage = make_stage()
    stage.setup()
    row = {field.name: None for field in GENERATED_SCHEMA} | {
        "identity": "flat/1", "source": "flat", "source_pid": 1, "status": "ok",
        "generated": [_png((10, 20, 30)), _png((200, 100, 0))], "sample_prompts": ["p", "p"], "sample_seeds": [1, 2]}
    filtered = stage.process_batch(pa.Table.from_pylist([row], schema=GENERATED_SCHEMA)).to_pylist()[0]
    assert (filtered["scores"], filtered["kept"], filtered["filter_kind"]) == ([SCORE, SCORE], [True, True], "constant")


def test_a_build_uses_the_filter_and_the_source_registered_by_this_module_only(
    registered: None, tmp_path: Path
) -> None:
    """`factory.build.run` in this process on a local Ray cluster: the config names the flat
    source and the constant filter; the filter actors run the class the driver handed them."""
    import ray
    from ray import cloudpickle

    from factory.build import run

    root = _flat_dataset(tmp_path / "flat")
    sd, blip = save_tiny_models(tmp_path / "models")
    config: RunConfig = load_run_config(_flat_preset(tmp_path / "preset.yaml", root, sd, blip))
    out, lines = tmp_path / "out", []
    # By value, so the actors need not import this test module: the class object itself travels.
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        summary = run(config, out, log=lines.append)
    finally:
        ray.shutdown()
        cloudpickle.unregister_pickle_by_value(module)

    samples = IDENTITIES * config.generation.samples_per_identity
    assert (summary.generated, summary.kept, summary.identities_failed) == (samples, samples, 0)
    assert sum(": kept " in line and "(constant)" in line for line in lines) == IDENTITIES  # a progress line each
    rows = pd.concat(pd.read_parquet(shard) for shard in sorted((out / "shards").glob("*.parquet")))
    assert len(rows) == samples and set(rows["source"]) == {"flat"}
    assert sorted(set(rows["source_pid"])) == [1, 2, 3] and (rows["score"] == SCORE).all()
