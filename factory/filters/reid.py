"""The Re-ID filters, which score with a Re-ID model trained on the identity's source dataset
(one per source, as in the paper, Sec. 3.2; found or trained by `factory.filters.reid_models`):

- `reid` (Re-ID Confidence Threshold Filter, the paper's choice): score = cosine similarity
  between the generated image's feature and the centroid of the identity's source-sequence
  features;
- `cctf` (Classification Confidence Threshold Filter): softmax probability that the same
  model's identity classifier assigns to the identity.

torch and the Re-ID model code load when an actor sets a filter up: the check phase imports
this module for the registry alone.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.settings.reid import ReidTrainConfig
from core.settings.stages import FilterConfig
from core.storage import Location, local_file, resolve
from factory.filters.base import FILTERS, ImageFilter
from factory.stages.base import decode_images

if TYPE_CHECKING:
    import torch
    from PIL import Image


@dataclass(frozen=True)
class FilterModelSpec:
    """A Re-ID model trained on one source: weights, its training config and pid -> class."""

    weights: Path | str  # a local path, or a URI each filter actor fetches on its own node
    config: ReidTrainConfig
    labels: dict[int, int]

    @classmethod
    def load(cls, directory: Location | Path | str) -> FilterModelSpec:
        """From a `filter_model.json` folder (any URI); weights of a remote folder stay URIs."""
        location = resolve(directory)
        meta = (location / "filter_model.json").read_json()
        weights = location / meta["weights"]
        return cls(weights=weights.local_path if weights.is_local else weights.uri,
                   config=ReidTrainConfig.model_validate(meta["config"]),
                   labels={int(k): int(v) for k, v in meta["labels"].items()})

    def save(self, directory: Location | Path | str) -> None:
        location, weights = resolve(directory), resolve(self.weights)
        prefix = location.path.rstrip("/") + "/"
        if not weights.path.startswith(prefix):
            raise ValueError(f"filter model weights {weights} are not inside {location}")
        meta = {"weights": weights.path[len(prefix):], "config": self.config.model_dump(mode="json"),
                "labels": {str(k): v for k, v in self.labels.items()}}
        (location / "filter_model.json").write_text(json.dumps(meta, indent=1))


@dataclass(frozen=True)
class PendingFilterModel:
    """A filter model still training (the result of a Ray task). The filter actor waits for it
    only when the first identity of its source arrives: captioning and generation need not wait
    for every source's model."""

    source: str
    result: Any  # ray.ObjectRef of the FilterModelSpec

    def wait(self) -> FilterModelSpec:
        import ray

        return ray.get(self.result)


class ReidModelFilter(ImageFilter):
    """Shared by `reid` and `cctf`: one Re-ID model per source, loaded once per actor."""

    uses_reid_models = True

    def __init__(self, config: FilterConfig, source_models: Mapping[str, FilterModelSpec | PendingFilterModel]) -> None:
        super().__init__(config, source_models)
        self.specs = dict(source_models)
        self.models: dict[str, torch.nn.Module] = {}
        self.transforms: dict[str, Any] = {}

    def setup(self, device: str) -> None:
        super().setup(device)
        for source, spec in self.specs.items():
            if isinstance(spec, FilterModelSpec):
                self._load(source, spec)

    def _load(self, source: str, spec: FilterModelSpec) -> None:
        from trainers.reid.model import load_reid_model
        from trainers.reid.transforms import build_eval_transform

        weights = local_file(resolve(spec.weights))  # fetched once per node when it is a URI
        self.models[source] = load_reid_model(weights, spec.config).to(self.device).eval()
        self.transforms[source] = build_eval_transform(spec.config)

    def prepare(self, source: str) -> None:
        pending = self.specs.get(source)
        if isinstance(pending, PendingFilterModel):
            self.specs[source] = pending.wait()
            self._load(source, self.specs[source])

    def features(self, source: str, images: Sequence[Image.Image]) -> torch.Tensor:
        import torch

        with torch.inference_mode():
            self.prepare(source)
            if source not in self.models:
                raise KeyError(f"no filter model for source {source!r} (have {sorted(self.models)})")
            batch = torch.stack([self.transforms[source](img) for img in images]).to(self.device)
            return self.models[source](batch)


@FILTERS.register("reid")
class ReidThresholdFilter(ReidModelFilter):
    score_range = (-1.0, 1.0)  # a cosine similarity

    def score_images(self, row: Mapping) -> list[float]:
        import torch.nn.functional as F

        source = row["source"]
        reference = F.normalize(self.features(source, decode_images(row["image_bytes"])), dim=1)
        centroid = F.normalize(reference.mean(dim=0, keepdim=True), dim=1)
        generated = F.normalize(self.features(source, decode_images(row["generated"])), dim=1)
        return (generated @ centroid.T).squeeze(1).cpu().tolist()


@FILTERS.register("cctf")
class ClassifierConfidenceFilter(ReidModelFilter):
    score_range = (0.0, 1.0)  # a probability

    def score_images(self, row: Mapping) -> list[float]:
        import torch

        source, pid = row["source"], int(row["source_pid"])
        self.prepare(source)
        label = self.specs[source].labels.get(pid)
        if label is None:
            raise KeyError(f"{row['identity']}: the {source} filter model was not trained on pid {pid}")
        with torch.inference_mode():
            logits = self.models[source].classifier(self.features(source, decode_images(row["generated"])))
        return logits.softmax(dim=1)[:, label].cpu().tolist()
