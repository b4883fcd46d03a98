"""The only module of the factory that knows Ray Data: it turns `Stage`s into autoscaling actor
pools (`map_batches` with an actor class and `ActorPoolStrategy(min_size, max_size)`)."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Iterator, Sequence

import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy, Dataset

from core.device import StickyCudaError
from factory.stages.base import Stage, check_columns

StageFactory = Callable[[], Stage]

# Restarts of one stage actor after its process ended (a sticky CUDA error ends it on purpose):
# enough for an occasional Xid on a long run; a node or image that breaks every actor it starts
# ends the build instead of cycling forever (the build then names the error).
ACTOR_RESTARTS = 3
# Exit status of an actor that ended itself on a sticky CUDA error (sysexits' EX_SOFTWARE).
STICKY_CUDA_EXIT = 70


class _StageActor:
    """Actor body: builds the stage and runs its `setup` once (models load here, once per actor)."""

    def __init__(self, make_stage: StageFactory) -> None:
        self.stage = make_stage()
        self.stage.setup()

    def __call__(self, batch: pa.Table) -> pa.Table:
        try:
            return self.stage.process_batch(batch)
        except StickyCudaError as err:
            # The CUDA context is broken for good: every later identity on this actor would fail
            # at once. Ending the process makes Ray start a fresh actor (up to ACTOR_RESTARTS) and
            # run this identity again there; no row is written for it from here.
            print(f"[{self.stage.name}] ending this actor (pid {os.getpid()}) on a sticky CUDA error, "
                  f"Ray restarts it and retries the identity: {err}", file=sys.stderr, flush=True)
            os._exit(STICKY_CUDA_EXIT)


def _actor_class(stage: Stage) -> type[_StageActor]:
    """A `_StageActor` named after the stage: Ray Data names the operator after it, so progress
    lines and the dashboard read `MapBatches(Caption)`, `MapBatches(FilterWrite)`, ..."""
    name = "".join(part.title() for part in stage.name.replace("+", "_").split("_"))
    return type(name, (_StageActor,), {"__doc__": f"The `{stage.name}` stage's actor."})


# Ray Data grows an actor pool once its tasks in flight reach this many per actor. Its default
# (1.75) assumes 2 tasks queued per actor; a pool that takes one identity per actor (generation)
# never reaches it and would stay at `concurrency.min` however long the queue. At 1.0 a pool grows
# while every actor is busy and identities are still to come; once the last one is handed out it
# only shrinks.
UPSCALE_AT_TASKS_PER_ACTOR = 1.0


def allow_scale_up_at_one_task_per_actor() -> None:
    """Set the scale-up threshold of this driver's Ray Data executions (read when they start)."""
    context = ray.data.DataContext.get_current()
    context.autoscaling_config = dataclasses.replace(
        context.autoscaling_config, actor_pool_util_upscaling_threshold=UPSCALE_AT_TASKS_PER_ACTOR)


def stage_pipeline(table: pa.Table, factories: Sequence[StageFactory], use_gpus: bool) -> Dataset:
    """`table`'s identities streamed through one autoscaling actor pool per stage. The stages'
    declared columns are checked against `table` first (`check_columns`), so a stage wired to
    a column nobody writes fails here, before any actor starts."""
    stages = [make_stage() for make_stage in factories]  # cheap: models load in `setup`
    check_columns(table.schema, stages)
    allow_scale_up_at_one_task_per_actor()
    # One block per identity, so an actor pool spreads identities over all its actors instead
    # of streaming one large block through a single actor.
    dataset = ray.data.from_arrow([table.slice(i, 1) for i in range(table.num_rows)])
    for make_stage, stage in zip(factories, stages):
        resources = stage.resources()
        dataset = dataset.map_batches(
            _actor_class(stage),
            fn_constructor_kwargs={"make_stage": make_stage},
            batch_size=resources.batch_size,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(min_size=resources.min_actors, max_size=resources.max_actors,
                                      max_tasks_in_flight_per_actor=resources.tasks_in_flight),
            num_cpus=resources.num_cpus,
            num_gpus=resources.num_gpus if use_gpus else 0,
            max_restarts=ACTOR_RESTARTS,
        )
    return dataset


def iter_rows(dataset: Dataset) -> Iterator[dict]:
    """Stream finished identities back to the driver as they complete."""
    yield from dataset.iter_rows()  # a generator: `close()` ends the streaming execution
