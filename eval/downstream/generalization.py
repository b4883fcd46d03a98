"""The paper's domain-generalization setting (`dg`, Table 6), with the protocol of the DG
literature it follows (DualNorm, Jia et al. 2019; MetaBIN, Choi et al. 2021): a model trained on
several labelled sources merged is tested, without ever seeing them, on small target datasets,
each over `generalization.splits` (10) random query/gallery splits; the table reports the mean and
the spread over splits.

Training data: every image of every source (train, query and gallery: the DG protocol trains on
whole source datasets), one label per (source, pid), so identities of different sources never
merge. Methods: any supervised method of `eval.downstream.methods.METHODS` (`bot` is the
multi-source baseline the DG papers start from).

MetaBIN is not built yet. Its gain comes from meta-learning the gates of batch-instance
normalisation layers (BIN replacing every BN of the backbone) with a meta-train / meta-test split of
the *source domains* inside each step and two extra meta-losses (inter-domain and intra-domain
triplet-style terms) through a second-order update of the gates. Building it here needs (1) a
BIN-ResNet whose weights still load from timm's BN ResNet (the `ours` / ImageNet
initialisations), (2) a domain-balanced sampler (every batch draws from every source) and (3) the
functional meta-step (torch.func.functional_call over the gate parameters). None of those exists in
the trainer yet; each is its own piece of work, and a hurried version would report numbers that
are not MetaBIN's.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from core.datasets.base import ImageRecord, ReidDataset
from core.datasets.test_splits import protocol_for, test_splits
from core.settings.downstream import DownstreamConfig
from eval.downstream.cells import Cell
from eval.downstream.inits import InitWeights
from eval.downstream.methods import METHODS, ReidMethod
from eval.downstream.tables import STATUS_DONE
from eval.downstream.trial import train_supervised
from trainers.reid.data import TrainingSet
from trainers.reid.evaluate import evaluate_reid


def merged_source_records(sources: Mapping[str, ReidDataset]) -> list[ImageRecord]:
    """Every labelled image of every source (train, query and gallery), distractors dropped."""
    return [r for dataset in sources.values() for r in (*dataset.train, *dataset.query, *dataset.gallery)
            if not r.distractor]


def evaluate_on_splits(model: torch.nn.Module, dataset: ReidDataset, kind: str, config: DownstreamConfig,
                       seed: int, device: torch.device, images: Mapping[str, bytes] | None) -> dict[str, Any]:
    """mAP / Rank-1 of `model` on `dataset` (a source of kind `kind`) over the protocol's random
    query/gallery splits: mean, std over splits (population std, as the DG tables), and each split."""
    assert config.generalization is not None
    per_split = []
    for split in test_splits(dataset, protocol_for(kind), seed, config.generalization.splits):
        metrics = evaluate_reid(model, split, config.train, device=device, images=images)
        per_split.append({"mAP": metrics["mAP"], "rank1": metrics["rank1"],
                          "query": len(split.query), "gallery": len(split.gallery)})
    maps = np.array([s["mAP"] for s in per_split])
    rank1s = np.array([s["rank1"] for s in per_split])
    return {"mAP": float(maps.mean()), "rank1": float(rank1s.mean()), "mAP_std": float(maps.std()),
            "rank1_std": float(rank1s.std()), "splits": len(per_split), "per_split": per_split}


def run_generalization_cell(cell: Cell, datasets: Mapping[str, ReidDataset], kinds: Mapping[str, str],
                            config: DownstreamConfig, init: InitWeights, device: torch.device,
                            images: Mapping[str, Mapping[str, bytes]], method: ReidMethod | None = None,
                            report: Any = None) -> dict[str, Any]:
    """A `dg` cell: train `cell.method` on the merged sources, then every target over its splits.
    The result holds one entry per target under `targets`; `runner.collect_rows` makes them rows."""
    assert config.generalization is not None
    start = time.perf_counter()
    method = method or METHODS.get(cell.method)
    options = method.options(cell.method, config.method_options.get(cell.method))
    recipe = method.adjust_recipe(config.train, options)
    sources = {name: datasets[name] for name in config.generalization.sources}
    merged_images = {path: data for name in sources for path, data in images.get(name, {}).items()}
    training = TrainingSet.from_records(merged_source_records(sources), merged_images or None)
    model, history = train_supervised(method, options, recipe, init, training, cell.seed, device, report=report)
    train_seconds = time.perf_counter() - start
    targets = {name: evaluate_on_splits(model, datasets[name], kinds[name], config, cell.seed, device,
                                        images.get(name))
               for name in config.generalization.targets}
    return {
        **cell.params(), "status": STATUS_DONE, "kind": cell.setting.kind, "percent": 100,
        "sources": "+".join(sources), "targets": targets,
        "mAP": float(np.mean([t["mAP"] for t in targets.values()])),
        "rank1": float(np.mean([t["rank1"] for t in targets.values()])),
        "train_images": len(training.paths), "train_ids": training.num_classes, "epochs": recipe.epochs,
        "train_seconds": train_seconds, "total_seconds": time.perf_counter() - start,
        "weights": init.source, "history": history,
    }
