"""The Re-ID models the `reid` / `cctf` filters score with: one per source dataset, as in the
paper (Sec. 3.2, "trained separately for each of the four source datasets").

A source listed in `filter.reid_checkpoints` uses that model; otherwise the build trains one on
the source's training split with the foundation's BoT trainer and keeps it under
`DIR/filter_models/<source>/`, where a rerun finds and reuses it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from core.storage import Location, resolve
from factory.datasets.base import ReidDataset
from factory.sequences import read_image_bytes
from factory.stage_config import FilterConfig
from factory.stages.filter import FilterModelSpec


def _decodes(path: str) -> bool:
    try:
        read_image_bytes(path)
        return True
    except Exception:  # the same test the sequence reader quarantines with
        return False


def readable_training_split(dataset: ReidDataset, threads: int = 8) -> tuple[ReidDataset, list[str]]:
    """`dataset` without training images that fail to decode (and the paths dropped), so one
    corrupt file cannot crash the filter model's training."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        ok = list(pool.map(_decodes, [r.path for r in dataset.train]))
    dropped = [r.path for r, good in zip(dataset.train, ok) if not good]
    kept = [r for r, good in zip(dataset.train, ok) if good]
    return dataclasses.replace(dataset, train=kept), dropped


def local_copy(location: Location, cache: Path | None = None) -> Path:
    """A folder of a filter model on this machine: the folder itself when local, else a copy
    under `cache` (default ~/.cache/reid-factory/filter-models/<hash of the URI>)."""
    if location.is_local:
        return location.local_path
    cache = cache or Path.home() / ".cache" / "reid-factory" / "filter-models"
    target = cache / hashlib.sha256(location.uri.encode()).hexdigest()[:16]
    if location.is_dir() and not (target / "filter_model.json").exists():
        location.download(target)
    return target


def _upload(folder: Path, location: Location) -> None:
    """The trained model (weights and its json, not the training checkpoints) to `location`."""
    for name in ("model.safetensors", "filter_model.json"):
        for path in folder.rglob(name):
            if "checkpoint" not in path.parent.name:
                (location / str(path.relative_to(folder))).write_bytes(path.read_bytes())


def _at(spec: FilterModelSpec, model_dir: Path, location: Location) -> FilterModelSpec:
    """`spec` with its weights named by `location` when that is remote: the filter actors fetch
    them on their own nodes instead of reading the driver's local copy by path."""
    if location.is_local:
        return spec
    relative = Path(spec.weights).resolve().relative_to(model_dir.resolve()).as_posix()
    return dataclasses.replace(spec, weights=(location / relative).uri)


def ensure_filter_models(
    datasets: Sequence[ReidDataset], config: FilterConfig, directory: Location | str, log=print
) -> dict[str, FilterModelSpec]:
    """A `FilterModelSpec` per source name; trains the missing ones (CLIP needs none).
    `directory` (DIR/filter_models, any URI) keeps them for reruns; models on an object store
    are used through a local copy."""
    if config.kind == "clip":
        return {}
    from trainers.reid.data import TrainingSet
    from trainers.reid.train import train_reid

    directory = resolve(directory)
    specs: dict[str, FilterModelSpec] = {}
    for dataset in datasets:
        configured = config.reid_checkpoints.get(dataset.name)
        location = resolve(configured) if configured else directory / dataset.name
        model_dir = local_copy(location)
        if (model_dir / "filter_model.json").exists():
            specs[dataset.name] = _at(FilterModelSpec.load(model_dir), model_dir, location)
            log(f"[filter] using the Re-ID model in {model_dir}")
            continue
        if configured:
            raise FileNotFoundError(
                f"filter.reid_checkpoints.{dataset.name}: {model_dir} has no filter_model.json "
                "(point it at a DIR/filter_models/<source> directory written by a previous build)"
            )
        readable, dropped = readable_training_split(dataset)
        if dropped:
            log(f"[filter] {len(dropped)} unreadable training images left out of the filter model: {dropped[:3]}")
        log(f"[filter] training the {config.reid.arch} Re-ID filter model on {dataset.name} ({len(readable.train)} images)")
        result = train_reid(readable, config.reid, model_dir / "train")
        training = TrainingSet.from_records(readable.train)
        spec = FilterModelSpec(
            weights=result.model_path,
            config=config.reid,
            labels={pid: label for label, pid in enumerate(training.pids)},
        )
        spec.save(model_dir)
        if not location.is_local:
            _upload(model_dir, location)
        specs[dataset.name] = _at(spec, model_dir, location)
        last = result.history[-1] if result.history else {}
        log(f"[filter] {dataset.name}: trained in {len(result.history)} epochs, last metrics {last}")
    return specs
