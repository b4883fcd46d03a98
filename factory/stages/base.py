"""What a pipeline stage is. Stages never import Ray: `factory.ray_pipeline` hands them to
Ray Data, and tests call them directly on in-memory `pyarrow.Table`s."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import pyarrow as pa


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
