"""The paper's settings without target labels: `unsupervised` (Table 4) and `da` (Table 5).

- `unsupervised`: a pseudo-label method (Cluster Contrast) trains the initialised backbone on the
  dataset's training split with its labels hidden, then the usual query/gallery evaluation. The
  cell also evaluates the same initialisation before any training (`before_*`): the untrained
  reference the method must beat.
- `da`: domain adaptation from a labelled source to an unlabelled target, the clustering family all
  five of the paper's DA methods (CaCL, IDM, HCD, GLT, UNRN) belong to, in its plainest form:
  train the supervised `adaptation_source_method` (BoT by default) on the source's labels, then run
  the unsupervised method on the target's training split from that model's backbone — source
  pre-training followed by iterative clustering and fine-tuning (Fan et al., "Unsupervised Person
  Re-identification: Clustering and Fine-tuning", TOMM 2018), here with Cluster Contrast's memory
  as the fine-tuning loss. The cell records the source model on the source's own test split
  (`source_*`), on the target before adaptation (`direct_*`, direct transfer) and after
  (`mAP`, `rank1`): the domain drop is `source_*` minus `direct_*`, the gain of adaptation
  `mAP` minus `direct_mAP`.

Methods of both settings are registered once in `UNSUPERVISED_METHODS` and named in
`downstream.unsupervised_methods`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn

from core.datasets.base import ImageRecord, ReidDataset
from core.registry import Registry
from core.settings.downstream import DownstreamConfig
from core.settings.reid import ReidTrainConfig
from eval.downstream.cells import Cell
from eval.downstream.cluster_contrast import ClusterContrastModel, ClusterContrastOptions, train_cluster_contrast
from eval.downstream.inits import InitWeights, build_initialised_backbone
from eval.downstream.methods import METHODS, validated_options
from eval.downstream.tables import METRICS, STATUS_DONE
from eval.downstream.trial import train_supervised
from trainers.reid.data import TrainingSet
from trainers.reid.evaluate import evaluate_reid

# (initialised backbone, recipe, options) -> model whose eval-mode output is the retrieval feature
UnsupervisedModelBuilder = Callable[[nn.Module, ReidTrainConfig, Any], nn.Module]
# (model, unlabelled records, images, recipe, options, device, report) -> per-epoch history
UnsupervisedTrainer = Callable[..., list[dict[str, Any]]]


@dataclass(frozen=True)
class UnsupervisedMethod:
    """A method that learns from unlabelled images, registered in `UNSUPERVISED_METHODS`."""

    description: str
    build_model: UnsupervisedModelBuilder
    train: UnsupervisedTrainer
    options_model: type[BaseModel]

    def options(self, name: str, raw: dict[str, Any] | None) -> BaseModel:
        """Validated options of this method, registered as `name`, from `downstream.method_options.<name>`."""
        return validated_options(self.options_model, name, raw)


UNSUPERVISED_METHODS: Registry[UnsupervisedMethod] = Registry("unsupervised method", "downstream.unsupervised_methods")


def _build_cluster_contrast(backbone: nn.Module, recipe: ReidTrainConfig, options: ClusterContrastOptions) -> nn.Module:
    return ClusterContrastModel.from_options(backbone, options)


def _train_cluster_contrast(model: nn.Module, records: Sequence[ImageRecord], images: Mapping[str, bytes] | None,
                            recipe: ReidTrainConfig, options: ClusterContrastOptions, device: torch.device,
                            report: Callable[[dict[str, Any]], None] | None) -> list[dict[str, Any]]:
    return train_cluster_contrast(model, records, images, recipe, options, device, report=report)


UNSUPERVISED_METHODS.add("cluster_contrast", UnsupervisedMethod(
    description="Cluster Contrast (Dai et al. 2022): DBSCAN on k-reciprocal Jaccard distances, "
                "cluster memory with momentum, InfoNCE",
    build_model=_build_cluster_contrast,
    train=_train_cluster_contrast,
    options_model=ClusterContrastOptions,
))


def hidden_labels(records: Sequence[ImageRecord]) -> list[ImageRecord]:
    """The training records a method without labels may see: distractors dropped, every identity
    replaced by one placeholder (0), so nothing downstream can read the true labels."""
    return [ImageRecord(r.path, r.source, 0, r.camid, r.split, r.frame, r.sequence) for r in records
            if not r.distractor]


def _metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    return {f"{prefix}{k}": metrics[k] for k in METRICS}


def _train_unsupervised(method_name: str, config: DownstreamConfig, backbone: nn.Module,
                        records: Sequence[ImageRecord], images: Mapping[str, bytes] | None, device: torch.device,
                        report: Callable[[dict[str, Any]], None] | None,
                        evaluate_on: ReidDataset | None = None) -> tuple[nn.Module, list[dict[str, Any]], dict]:
    """(model, history, metrics of the model before training on `evaluate_on`) of `method_name`
    trained without labels on `records`."""
    method = UNSUPERVISED_METHODS.get(method_name)
    options = method.options(method_name, config.method_options.get(method_name))
    model = method.build_model(backbone, config.train, options).to(device)
    before = evaluate_reid(model, evaluate_on, config.train, device=device, images=images) if evaluate_on else {}
    history = method.train(model, hidden_labels(records), images, config.train, options, device, report)
    return model, history, before


def _last_clustering(history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    last = history[-1] if history else {}
    return {"clusters": last.get("clusters"), "outliers": last.get("outliers")}


def run_unsupervised_cell(cell: Cell, dataset: ReidDataset, config: DownstreamConfig, init: InitWeights,
                          device: torch.device, images: Mapping[str, bytes] | None = None,
                          report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """An `unsupervised` cell: evaluate `init` untrained, train without labels, evaluate again."""
    start = time.perf_counter()
    torch.manual_seed(cell.seed)
    backbone = build_initialised_backbone(config.train.arch, init, config.train.last_stride)
    records = [r for r in dataset.train if not r.distractor]
    train_start = time.perf_counter()
    model, history, before = _train_unsupervised(cell.method, config, backbone, records, images, device, report,
                                                 evaluate_on=dataset)
    train_seconds = time.perf_counter() - train_start
    after = evaluate_reid(model, dataset, config.train, device=device, images=images)
    return {
        **cell.params(), "status": STATUS_DONE, "kind": cell.setting.kind, "percent": 100,
        **_metrics(after), "cmc": after["cmc"],
        "before_mAP": before["mAP"], "before_rank1": before["rank1"],
        **_last_clustering(history),
        "train_images": len(records), "train_ids": None,  # the labels were hidden
        "epochs": len(history), "train_seconds": train_seconds, "total_seconds": time.perf_counter() - start,
        "weights": init.source, "history": history,
    }


def run_adaptation_cell(cell: Cell, source: ReidDataset, target: ReidDataset, config: DownstreamConfig,
                        init: InitWeights, device: torch.device, images: Mapping[str, Mapping[str, bytes]],
                        report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """A `da` cell: the supervised source model (direct transfer), then adaptation on the target."""
    start = time.perf_counter()
    method_name = config.adaptation_source_method
    method = METHODS.get(method_name)
    options = method.options(method_name, config.method_options.get(method_name))
    recipe = method.adjust_recipe(config.train, options)
    training = TrainingSet.from_records([r for r in source.train if not r.distractor], images.get(source.name))
    source_model, source_history = train_supervised(method, options, recipe, init, training, cell.seed, device)
    on_source = evaluate_reid(source_model, source, recipe, device=device, images=images.get(source.name))
    direct = evaluate_reid(source_model, target, recipe, device=device, images=images.get(target.name))
    backbone = getattr(source_model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise ValueError(f"adaptation_source_method {method_name!r} has no single backbone to adapt "
                         "(a multi-branch model); use bot, agw or sbs")
    records = [r for r in target.train if not r.distractor]
    model, history, _ = _train_unsupervised(cell.method, config, backbone, records, images.get(target.name),
                                            device, report)
    train_seconds = time.perf_counter() - start  # source training, its two evaluations, the adaptation
    adapted = evaluate_reid(model, target, config.train, device=device, images=images.get(target.name))
    return {
        **cell.params(), "status": STATUS_DONE, "kind": cell.setting.kind, "percent": 100,
        "source": source.name, "target": target.name,
        **_metrics(adapted), "cmc": adapted["cmc"],
        "direct_mAP": direct["mAP"], "direct_rank1": direct["rank1"],
        "source_mAP": on_source["mAP"], "source_rank1": on_source["rank1"],
        **_last_clustering(history),
        "train_images": len(training.paths) + len(records), "train_ids": training.num_classes,
        "epochs": len(source_history) + len(history), "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - start,
        "weights": init.source, "history": [*source_history, *history],
    }
