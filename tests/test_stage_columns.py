"""Stages declare the columns they read and write; a pipeline is held to them as it is built."""

from __future__ import annotations

import functools

import pyarrow as pa
import pytest
import ray

from factory import ray_pipeline
from core.settings.run import DEFAULT_PRESET, load_run_config
from factory.schema import SEQUENCE_SCHEMA, STATUS_SCHEMA
from factory.stages.base import StageChain, check_columns
from factory.stages.caption import CaptionStage
from factory.filters import FilterStage
from factory.stages.generate import GenerationStage
from factory.stages.replay import ReplayStage
from factory.output.write import WriteStage


def _build_stages(replay: bool = False):
    config = load_run_config(DEFAULT_PRESET)
    generate = ReplayStage("/tmp/a-build") if replay else GenerationStage(config.generation, config.output)
    filter_then_write = StageChain(functools.partial(FilterStage, config.filter, {}),
                                   functools.partial(WriteStage, "/tmp/out"))
    return config, [CaptionStage(config.caption), generate, filter_then_write]


@pytest.mark.parametrize("replay", [False, True])
def test_the_builds_stages_fit_together_from_sequences_to_status_rows(replay: bool) -> None:
    _, stages = _build_stages(replay)
    assert check_columns(SEQUENCE_SCHEMA, stages) == STATUS_SCHEMA


def test_every_stage_has_a_name_of_its_own() -> None:
    """Ray names each operator after its stage (`MapBatches(Generate)`, `MapBatches(Replay)`):
    a stage standing in for another under its name would read as that one in progress lines."""
    _, stages = _build_stages()
    _, (_, replay, _) = _build_stages(replay=True)
    names = [stage.name for stage in [*stages, replay]]
    assert replay.name == "replay" and len(set(names)) == len(names)


def test_a_stage_fed_without_its_columns_is_named_with_them() -> None:
    _, (caption, generate, filter_then_write) = _build_stages()
    with pytest.raises(TypeError, match=r"stage generate cannot read its input: captions \(missing\)"):
        check_columns(SEQUENCE_SCHEMA, [generate])
    # the chain checks its own members: the write stage needs the filter's columns
    with pytest.raises(TypeError, match=r"stage write cannot read .* scores \(missing\)"):
        check_columns(check_columns(SEQUENCE_SCHEMA, [caption, generate]), [filter_then_write.stages[1]])
    wrong_type = SEQUENCE_SCHEMA.set(SEQUENCE_SCHEMA.get_field_index("seed"), pa.field("seed", pa.string()))
    with pytest.raises(TypeError, match=r"stage caption cannot read .*seed \(string, reads int64\)"):
        check_columns(wrong_type, [caption])


def test_a_miswired_pipeline_fails_as_it_is_built_before_ray_starts() -> None:
    config = load_run_config(DEFAULT_PRESET)
    table = SEQUENCE_SCHEMA.empty_table()
    was_running = ray.is_initialized()
    with pytest.raises(TypeError, match="stage generate"):
        ray_pipeline.stage_pipeline(table, [functools.partial(GenerationStage, config.generation, config.output)], False)
    assert ray.is_initialized() == was_running
