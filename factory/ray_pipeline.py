"""The only module of the factory that knows Ray Data: it turns `Stage`s into autoscaling actor
pools (`map_batches` with an actor class and `ActorPoolStrategy(min_size, max_size)`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy, Dataset

from factory.stages.base import Stage

StageFactory = Callable[[], Stage]


class _StageActor:
    """Actor body: builds the stage and runs its `setup` once (models load here, once per actor)."""

    def __init__(self, make_stage: StageFactory) -> None:
        self.stage = make_stage()
        self.stage.setup()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.stage.process_batch(batch)


def _actor_class(stage: Stage) -> type[_StageActor]:
    """A `_StageActor` named after the stage: Ray Data names the operator after it, so progress
    lines and the dashboard read `MapBatches(Caption)`, `MapBatches(FilterWrite)`, ..."""
    name = "".join(part.title() for part in stage.name.replace("+", "_").split("_"))
    return type(name, (_StageActor,), {"__doc__": f"The `{stage.name}` stage's actor."})


def apply_stage(dataset: Dataset, make_stage: StageFactory, use_gpus: bool) -> Dataset:
    """`dataset.map_batches` through an autoscaling pool of actors running `make_stage()`."""
    stage = make_stage()
    resources = stage.resources()
    return dataset.map_batches(
        _actor_class(stage),
        fn_constructor_kwargs={"make_stage": make_stage},
        batch_size=resources.batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=resources.min_actors, max_size=resources.max_actors),
        num_cpus=resources.num_cpus,
        num_gpus=resources.num_gpus if use_gpus else 0,
    )


def dataset_of_rows(table: pa.Table) -> Dataset:
    """One block per identity, so an actor pool spreads identities over all its actors instead
    of streaming one large block through a single actor."""
    return ray.data.from_arrow([table.slice(i, 1) for i in range(table.num_rows)])


def iter_rows(dataset: Dataset) -> Iterator[dict]:
    """Stream finished identities back to the driver as they complete."""
    for batch in dataset.iter_batches(batch_size=1, batch_format="pyarrow"):
        yield from batch.to_pylist()
