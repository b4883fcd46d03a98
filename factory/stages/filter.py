"""Filtering stage: score every generated image, keep those at or above the threshold.

- `reid` (Re-ID Confidence Threshold Filter, the paper's choice): a Re-ID model trained on the
  identity's source dataset; score = cosine similarity between the generated image's feature
  and the centroid of the identity's source-sequence features.
- `cctf` (Classification Confidence Threshold Filter): softmax probability that the same
  model's identity classifier assigns to the identity.
- `clip`: CLIP zero-shot probability of the "person" prompt against negative prompts.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from core.device import actor_device
from core.storage import Location, local_file, resolve
from factory.schema import FILTER_FIELDS, GENERATED_SCHEMA
from core.settings.stages import FilterConfig
from factory.models.shipping import ModelFolders
from factory.stages.base import RowStage, StageResources, decode_images
from core.settings.reid import ReidTrainConfig


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


class ImageFilter(ABC):
    """One filter: `score` a row's generated images; `keep` says whether a score passes."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

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


class _ReidModelFilter(ImageFilter):
    """Shared by `reid` and `cctf`: one Re-ID model per source, loaded once per actor."""

    def __init__(self, threshold: float, models: Mapping[str, FilterModelSpec | PendingFilterModel]) -> None:
        super().__init__(threshold)
        self.specs = dict(models)
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

    @torch.inference_mode()
    def features(self, source: str, images: Sequence[Image.Image]) -> torch.Tensor:
        self.prepare(source)
        if source not in self.models:
            raise KeyError(f"no filter model for source {source!r} (have {sorted(self.models)})")
        batch = torch.stack([self.transforms[source](img) for img in images]).to(self.device)
        return self.models[source](batch)


class ReidThresholdFilter(_ReidModelFilter):
    def score_images(self, row: Mapping) -> list[float]:
        source = row["source"]
        reference = F.normalize(self.features(source, decode_images(row["image_bytes"])), dim=1)
        centroid = F.normalize(reference.mean(dim=0, keepdim=True), dim=1)
        generated = F.normalize(self.features(source, decode_images(row["generated"])), dim=1)
        return (generated @ centroid.T).squeeze(1).cpu().tolist()


class ClassifierConfidenceFilter(_ReidModelFilter):
    def score_images(self, row: Mapping) -> list[float]:
        source, pid = row["source"], int(row["source_pid"])
        self.prepare(source)
        label = self.specs[source].labels.get(pid)
        if label is None:
            raise KeyError(f"{row['identity']}: the {source} filter model was not trained on pid {pid}")
        with torch.inference_mode():
            logits = self.models[source].classifier(self.features(source, decode_images(row["generated"])))
        return logits.softmax(dim=1)[:, label].cpu().tolist()


class ClipFilter(ImageFilter):
    def __init__(self, threshold: float, config: FilterConfig) -> None:
        super().__init__(threshold)
        self.config = config

    def setup(self, device: str) -> None:
        from factory.models.loading import load_clip

        super().setup(device)
        self.model, self.processor = load_clip(self.config.clip_model, device, torch.float32)
        texts = [self.config.clip_positive, *self.config.clip_negatives]
        self.text_tokens = dict(self.processor(text=texts, return_tensors="pt", padding=True).to(device))

    @torch.inference_mode()
    def score_images(self, row: Mapping) -> list[float]:
        pixels = self.processor(images=decode_images(row["generated"]), return_tensors="pt").to(self.device)
        # Not transformers' zero-shot-image-classification pipeline: it tokenizes the prompts
        # again on every call and returns label dicts sorted by score; here they are tokenized
        # once per actor. The model's own forward gives image-text logits (scaled cosine): stable across
        # transformers versions, unlike the return type of get_text_features / get_image_features.
        logits = self.model(**self.text_tokens, pixel_values=pixels["pixel_values"]).logits_per_image
        return logits.softmax(dim=1)[:, 0].cpu().tolist()


def build_filter(config: FilterConfig, models: Mapping[str, FilterModelSpec | PendingFilterModel]) -> ImageFilter:
    if config.kind == "clip":
        return ClipFilter(config.threshold, config)
    return {"reid": ReidThresholdFilter, "cctf": ClassifierConfidenceFilter}[config.kind](config.threshold, models)


class FilterStage(RowStage):
    name = "filter"
    reads = GENERATED_SCHEMA
    writes = FILTER_FIELDS

    def __init__(self, config: FilterConfig, models: Mapping[str, FilterModelSpec | PendingFilterModel],
                 num_gpus: float = 0.0, folders: ModelFolders | None = None) -> None:
        self.config = config
        self.models = dict(models)
        self.num_gpus = num_gpus
        self.folders = folders or ModelFolders()
        self.filter: ImageFilter | None = None

    def resources(self) -> StageResources:
        c = self.config.concurrency
        return StageResources(1, c.min, c.max, 1.0, self.num_gpus)

    def setup(self) -> None:
        config = self.config
        if config.kind == "clip":  # the CLIP model as this node opens it
            config = config.model_copy(update={"clip_model": self.folders.open(config.clip_model)})
        self.filter = build_filter(config, self.models)
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
