"""The Re-ID models that filters declaring `uses_reid_models` (`reid`, `cctf`) score with: one
per source dataset, as in the paper (Sec. 3.2, "trained separately for each of the four source
datasets"). The build calls `ensure_filter_models` in the driver before the pipeline starts.

A source listed in `filter.reid_checkpoints` uses that model; otherwise the build trains one on
the source's training split with the foundation's BoT trainer and keeps it under
`DIR/filter_models/<source>/`, where a rerun finds and reuses it.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any

import ray

from core.storage import Location, resolve
from core.datasets.base import ReidDataset
from core.datasets.images import read_images
from core.settings.stages import FilterConfig
from factory.filters.reid import FilterModelSpec, PendingFilterModel
from core.settings.reid import ReidTrainConfig


def readable_training_split(dataset: ReidDataset, threads: int = 8) -> tuple[ReidDataset, list[str], dict[str, bytes]]:
    """`dataset` without training images that fail to decode, the paths dropped, and the bytes
    of the others (read here, once: they travel to the training workers, which then need no
    access to the source's filesystem). One corrupt file cannot crash the filter's training."""
    loaded = read_images([r.path for r in dataset.train], threads)  # the test the sequence reader quarantines with
    images = {path: data for path, data in loaded.items() if isinstance(data, bytes)}
    dropped = [path for path in loaded if path not in images]
    return dataclasses.replace(dataset, train=[r for r in dataset.train if r.path in images]), dropped, images


@ray.remote(num_cpus=0)
class _StartSignal:
    """Where each filter-model training run says its workers hold their resources."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def mark(self, name: str) -> None:
        self.names.add(name)

    def marked(self) -> list[str]:
        return sorted(self.names)


@ray.remote(num_cpus=0)  # coordinates only: the Ray Train workers ask for their own CPUs / GPUs
def _train_filter_model(dataset: ReidDataset, config: ReidTrainConfig, location: str, images: dict[str, bytes],
                        signal: Any) -> FilterModelSpec:
    from trainers.reid.data import TrainingSet
    from trainers.reid.train import train_reid

    location = resolve(location)
    result = train_reid(dataset, config, (location / "train").uri, images=images,
                        on_start=(signal, dataset.name))
    training = TrainingSet.from_records(dataset.train)
    spec = FilterModelSpec(weights=result.model_path, config=config,
                           labels={pid: label for label, pid in enumerate(training.pids)})
    spec.save(location)
    return spec


def ensure_filter_models(
    datasets: Sequence[ReidDataset], config: FilterConfig, directory: Location | str, log=print
) -> dict[str, FilterModelSpec | PendingFilterModel]:
    """A filter model per source name: a `FilterModelSpec` for those found, a
    `PendingFilterModel` for those it starts training.

    `directory` (DIR/filter_models, any URI) keeps them for reruns: Ray Train checkpoints there,
    and the filter actors fetch the weights from there on their own nodes. The missing models of
    all sources train at once, one Ray task each; this returns as soon as each run's workers hold
    their resources (so the pipeline cannot take them first), and only the filter stage waits for
    a model, when the first identity of its source reaches it."""
    directory = resolve(directory)
    specs: dict[str, FilterModelSpec | PendingFilterModel] = {}
    signal = None
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
                "(point it at a DIR/filter_models/<source> directory written by a previous build)")
        readable, dropped, images = readable_training_split(dataset)
        if dropped:
            log(f"[filter] {len(dropped)} unreadable training images left out of the filter model: {dropped[:3]}")
        signal = signal or _StartSignal.remote()
        # Wall-clock times in these lines: the log shows which models train at once.
        log(f"[filter] {time.strftime('%H:%M:%S')} training the {config.reid.arch} Re-ID filter model of "
            f"{dataset.name} ({len(readable.train)} images)")
        result = _train_filter_model.remote(readable, config.reid, location.uri, images, signal)
        result.future().add_done_callback(functools.partial(_report_trained, dataset.name, log))
        specs[dataset.name] = PendingFilterModel(dataset.name, result)
    pending = [spec for spec in specs.values() if isinstance(spec, PendingFilterModel)]
    if pending:
        _wait_until_started(pending, signal)
    return specs


def _report_trained(name: str, log, future: Any) -> None:
    try:
        future.result()
        log(f"[filter] {time.strftime('%H:%M:%S')} the filter model of {name} is trained")
    except Exception as err:  # the filter stage raises it for this source's identities
        log(f"[filter] {time.strftime('%H:%M:%S')} the filter model of {name} failed to train: {err}")


def _wait_until_started(pending: Sequence[PendingFilterModel], signal: Any, poll_seconds: float = 0.5) -> None:
    """Block until every training run has its workers (or has ended); a run that failed before
    the pipeline starts fails the build here, before any identity is generated."""
    while True:
        started = set(ray.get(signal.marked.remote()))
        ended = {p.source for p in pending if ray.wait([p.result], timeout=0)[0]}
        ray.get([p.result for p in pending if p.source in ended])  # raises an ended run's error
        if all(p.source in started or p.source in ended for p in pending):
            return
        time.sleep(poll_seconds)


def finish_filter_models(specs: dict[str, FilterModelSpec | PendingFilterModel], log=print) -> None:
    """Wait for training runs the pipeline never needed (every identity of their source failed,
    or none was left to filter): their models are kept for the next run."""
    for name, spec in specs.items():
        if isinstance(spec, PendingFilterModel):
            try:
                specs[name] = spec.wait()
            except Exception as err:  # already reported by _report_trained
                log(f"[filter] the filter model of {name} is not kept: {type(err).__name__}")
