"""The Re-ID models the `reid` / `cctf` filters score with: one per source dataset, as in the
paper (Sec. 3.2, "trained separately for each of the four source datasets").

A source listed in `filter.reid_checkpoints` uses that model; otherwise the build trains one on
the source's training split with the foundation's BoT trainer and keeps it under
`DIR/filter_models/<source>/`, where a rerun finds and reuses it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from core.storage import Location, resolve
from factory.datasets.base import ReidDataset
from factory.sequences import read_image_bytes
from factory.stage_config import FilterConfig
from factory.stages.filter import FilterModelSpec


def _read(path: str) -> bytes | None:
    try:
        return read_image_bytes(path)
    except Exception:  # the same test the sequence reader quarantines with
        return None


def readable_training_split(dataset: ReidDataset, threads: int = 8) -> tuple[ReidDataset, list[str], dict[str, bytes]]:
    """`dataset` without training images that fail to decode, the paths dropped, and the bytes
    of the others (read here, once: they travel to the training workers, which then need no
    access to the source's filesystem). One corrupt file cannot crash the filter's training."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        data = list(pool.map(_read, [r.path for r in dataset.train]))
    dropped = [r.path for r, b in zip(dataset.train, data) if b is None]
    kept = [r for r, b in zip(dataset.train, data) if b is not None]
    images = {r.path: b for r, b in zip(dataset.train, data) if b is not None}
    return dataclasses.replace(dataset, train=kept), dropped, images


def ensure_filter_models(
    datasets: Sequence[ReidDataset], config: FilterConfig, directory: Location | str, log=print
) -> dict[str, FilterModelSpec]:
    """A `FilterModelSpec` per source name; trains the missing ones (CLIP needs none).
    `directory` (DIR/filter_models, any URI) keeps them for reruns: Ray Train checkpoints there,
    and the filter actors fetch the weights from there on their own nodes."""
    if config.kind == "clip":
        return {}
    from trainers.reid.data import TrainingSet
    from trainers.reid.train import train_reid

    directory = resolve(directory)
    specs: dict[str, FilterModelSpec] = {}
    for dataset in datasets:
        configured = config.reid_checkpoints.get(dataset.name)
        location = resolve(configured) if configured else directory / dataset.name
        if (location / "filter_model.json").is_file():
            specs[dataset.name] = FilterModelSpec.load(location)
            log(f"[filter] using the Re-ID model in {location}")
            continue
        if configured:
            raise FileNotFoundError(
                f"filter.reid_checkpoints.{dataset.name}: {location} has no filter_model.json "
                "(point it at a DIR/filter_models/<source> directory written by a previous build)"
            )
        readable, dropped, images = readable_training_split(dataset)
        if dropped:
            log(f"[filter] {len(dropped)} unreadable training images left out of the filter model: {dropped[:3]}")
        log(f"[filter] training the {config.reid.arch} Re-ID filter model on {dataset.name} ({len(readable.train)} images)")
        result = train_reid(readable, config.reid, (location / "train").uri, images=images)
        training = TrainingSet.from_records(readable.train)
        spec = FilterModelSpec(
            weights=result.model_path,
            config=config.reid,
            labels={pid: label for label, pid in enumerate(training.pids)},
        )
        spec.save(location)
        specs[dataset.name] = spec
        last = result.history[-1] if result.history else {}
        log(f"[filter] {dataset.name}: trained in {len(result.history)} epochs, last metrics {last}")
    return specs
