"""What a pipeline stage is. Stages never import Ray: `factory.ray_pipeline` hands them to
Ray Data, and tests call them directly on in-memory `pyarrow.Table`s."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

from core.device import torch_device


def actor_device(num_gpus: float) -> str:
    """The torch device of an actor that asked for `num_gpus`: its GPU when it holds one."""
    return torch_device(num_gpus > 0)


@dataclass(frozen=True)
class StageResources:
    """What each actor of a stage asks the cluster for."""

    batch_size: int = 1
    min_actors: int = 1
    max_actors: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0  # requested only when the cluster has GPUs (decided by the adapter)


class Stage(ABC):
    """A stateful batch transform. `setup` runs once per actor (load models there, never per
    batch); `process_batch` maps a table of identities to a table of identities."""

    name: str = "stage"

    @abstractmethod
    def resources(self) -> StageResources: ...

    def setup(self) -> None:  # noqa: B027 - optional hook
        """Load models and other per-actor state."""

    @abstractmethod
    def process_batch(self, batch: pa.Table) -> pa.Table: ...


class StageChain(Stage):
    """Stages run one after the other inside one actor, with the first stage's resources: a
    stage that needs none of its own (the write stage) rides along instead of starting an actor
    pool (one process start and one hand-off less per build)."""

    def __init__(self, *factories: Callable[[], Stage]) -> None:
        self.stages = [make() for make in factories]
        self.name = "+".join(stage.name for stage in self.stages)

    def resources(self) -> StageResources:
        return self.stages[0].resources()

    def setup(self) -> None:
        for stage in self.stages:
            stage.setup()

    def process_batch(self, batch: pa.Table) -> pa.Table:
        for stage in self.stages:
            batch = stage.process_batch(batch)
        return batch
