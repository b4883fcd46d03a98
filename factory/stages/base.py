"""What a pipeline stage is. Stages never import Ray: `factory.ray_pipeline` hands them to
Ray Data, and tests call them directly on in-memory `pyarrow.Table`s."""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyarrow as pa
from PIL import Image

from factory.schema import append_columns, require_columns, with_fields


def decode_images(images: Sequence[bytes]) -> list[Image.Image]:
    return [Image.open(io.BytesIO(b)).convert("RGB") for b in images]


@dataclass(frozen=True)
class StageResources:
    """What each actor of a stage asks the cluster for."""

    batch_size: int = 1
    min_actors: int = 1
    max_actors: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0  # requested only when the cluster has GPUs (decided by the adapter)
    # Identities queued on one actor at a time (None: Ray Data's default, 2). A stage whose one
    # identity takes minutes wants 1, or an autoscaled-up actor finds the queue already taken
    # by the busy ones and the run ends on a tail of idle GPUs.
    tasks_in_flight: int | None = None


class Stage(ABC):
    """A stateful batch transform. `setup` runs once per actor (load models there, never per
    batch); `process_batch` maps a table of identities to a table of identities.

    Its columns are declared: `reads`, what its input batches must carry (names and types, from
    `factory.schema`), and `writes`, the fields it appends (or replaces). `check_columns` holds a
    whole pipeline to them before anything runs."""

    name: str = "stage"
    reads: pa.Schema = pa.schema([])
    writes: Sequence[tuple[str, pa.DataType]] = ()

    @abstractmethod
    def resources(self) -> StageResources: ...

    def setup(self) -> None:  # noqa: B027 - optional hook
        """Load models and other per-actor state."""

    @abstractmethod
    def process_batch(self, batch: pa.Table) -> pa.Table: ...

    def output_schema(self, input_schema: pa.Schema) -> pa.Schema:
        return with_fields(input_schema, self.writes)


class RowStage(Stage):
    """A stage that works one identity at a time: `process_row` gets the row's values (a dict
    of the input's columns) and returns the values of the columns in `writes`."""

    @abstractmethod
    def process_row(self, row: dict) -> dict: ...

    def process_batch(self, batch: pa.Table) -> pa.Table:
        require_columns(batch, self.reads, self.name)
        written = [self.process_row(row) for row in batch.to_pylist()]
        return append_columns(batch, self.writes, {name: [row[name] for row in written] for name, _ in self.writes})


def check_columns(schema: pa.Schema, stages: Sequence[Stage]) -> pa.Schema:
    """The schema after `stages`, fed batches of `schema`. Raises `TypeError` naming the first
    stage that reads a column no earlier stage provides, or provides with another type: a
    pipeline wired wrongly fails as it is built, not at its first identity."""
    for stage in stages:
        problems = []
        for wanted in stage.reads:
            if wanted.name not in schema.names:
                problems.append(f"{wanted.name} (missing)")
            elif not schema.field(wanted.name).type.equals(wanted.type):
                problems.append(f"{wanted.name} ({schema.field(wanted.name).type}, reads {wanted.type})")
        if problems:
            raise TypeError(f"stage {stage.name} cannot read its input: {', '.join(problems)}")
        schema = stage.output_schema(schema)
    return schema


class StageChain(Stage):
    """Stages run one after the other inside one actor, with the first stage's resources: a
    stage that needs none of its own (the write stage) rides along instead of starting an actor
    pool (one process start and one hand-off less per build)."""

    def __init__(self, *factories: Callable[[], Stage]) -> None:
        self.stages = [make() for make in factories]
        self.name = "+".join(stage.name for stage in self.stages)

    @property
    def reads(self) -> pa.Schema:  # type: ignore[override]
        return self.stages[0].reads

    def output_schema(self, input_schema: pa.Schema) -> pa.Schema:
        return check_columns(input_schema, self.stages)

    def resources(self) -> StageResources:
        return self.stages[0].resources()

    def setup(self) -> None:
        for stage in self.stages:
            stage.setup()

    def process_batch(self, batch: pa.Table) -> pa.Table:
        for stage in self.stages:
            batch = stage.process_batch(batch)
        return batch
