"""What a filter is, the registry that names them (`FILTERS`, selected by `filter.kind`), and
the stage that runs the chosen one.

A filter is one `ImageFilter` subclass registered once where it is defined. Its class attributes
tell the rest of the build what it needs, so no other file lists filter names:

- `score_range`: the scores it gives (the check phase refuses a threshold outside it);
- `uses_reid_models`: it scores with a Re-ID model per source, which the build finds in
  `filter.reid_checkpoints` or trains (`factory.filters.reid_models`) before the pipeline starts;
- `model_keys`: the `filter.<key>` settings naming the models its actors load (checked for
  availability before anything heavy, shipped to the nodes, opened by each actor);
- `config_problems`: the filter settings it cannot take (a check-phase rule of its own).

Ray: a filter registered by a user's module exists only in the driver's process, so the driver
looks the class up and hands the class object itself to the stage (`FilterStage(image_filter=...)`;
Ray's cloudpickle carries it to the actors), never a name for the actor to look up.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from core.device import actor_device
from core.registry import Registry
from core.settings.stages import FilterConfig
from factory.models.shipping import ModelFolders
from factory.schema import FILTER_FIELDS, GENERATED_SCHEMA
from factory.stages.base import RowStage, StageResources


class ImageFilter(ABC):
    """One filter: `score` a row's generated images; `keep` says whether a score passes.

    `source_models` holds what the build prepared per source name for filters that declare
    `uses_reid_models` (a `FilterModelSpec`, or a `PendingFilterModel` still training); empty
    for the others."""

    score_range: ClassVar[tuple[float, float]] = (0.0, 1.0)
    uses_reid_models: ClassVar[bool] = False
    model_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: FilterConfig, source_models: Mapping[str, Any]) -> None:
        self.config = config
        self.threshold = config.threshold

    @classmethod
    def run_models(cls, config: FilterConfig) -> dict[str, str]:
        """The models this filter's actors load: config key -> model id, as the config names them."""
        return {f"filter.{key}": getattr(config, key) for key in cls.model_keys}

    @classmethod
    def config_problems(cls, config: FilterConfig) -> Iterable[tuple[str, Any, str]]:
        """(key, value, reason) for every filter setting this filter cannot take; none by default."""
        return ()

    def setup(self, device: str) -> None:  # noqa: B027 - optional hook
        self.device = device

    def prepare(self, source: str) -> None:  # noqa: B027 - optional hook
        """Make `source`'s rows scorable (wait for a model still training); not timed as filtering."""

    def score(self, row: Mapping) -> list[float]:
        return self.score_images(row) if row["generated"] else []

    @abstractmethod
    def score_images(self, row: Mapping) -> list[float]: ...  # `score` of a row with generated images

    def keep(self, score: float) -> tuple[bool, str]:
        return (True, "") if score >= self.threshold else (False, f"score {score:.3f} < threshold {self.threshold}")


FILTERS: Registry[type[ImageFilter]] = Registry("filter", "filter.kind")


class FilterStage(RowStage):
    """Scores every generated image with the configured filter and keeps those at or above the
    threshold. `image_filter` is the filter class; by default `FILTERS.get(config.kind)` in the
    process that builds the stage, which in a Ray actor knows only the built-in filters: a build
    passes the class it looked up in the driver."""

    name = "filter"
    reads = GENERATED_SCHEMA
    writes = FILTER_FIELDS

    def __init__(self, config: FilterConfig, models: Mapping[str, Any], num_gpus: float = 0.0,
                 folders: ModelFolders | None = None, image_filter: type[ImageFilter] | None = None) -> None:
        self.config = config
        self.models = dict(models)
        self.num_gpus = num_gpus
        self.folders = folders or ModelFolders()
        self.image_filter = image_filter or FILTERS.get(config.kind)
        self.filter: ImageFilter | None = None

    def resources(self) -> StageResources:
        c = self.config.concurrency
        return StageResources(1, c.min, c.max, 1.0, self.num_gpus)

    def setup(self) -> None:
        config = self.config
        if self.image_filter.model_keys:  # its models as this node opens them
            config = config.model_copy(update={key: self.folders.open(getattr(config, key))
                                               for key in self.image_filter.model_keys})
        self.filter = self.image_filter(config, self.models)
        self.filter.setup(actor_device(self.num_gpus))

    def process_row(self, row: dict) -> dict:
        assert self.filter is not None, "call setup() first"
        if row["status"] == "ok":
            self.filter.prepare(row["source"])
        start = time.perf_counter()
        scores = self.filter.score(row) if row["status"] == "ok" else []
        verdicts = [self.filter.keep(s) for s in scores]
        return {"scores": scores, "kept": [kept for kept, _ in verdicts], "reasons": [reason for _, reason in verdicts],
                "filter_kind": self.config.kind, "filter_seconds": time.perf_counter() - start}
