"""Train-and-evaluate in one call: the BoT baseline's figures before and after training.

"Before" is the same model the training starts from (same arch, init and seed), evaluated
untrained, so the comparison isolates what training added.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from core.storage import resolve
from core.datasets.base import DatasetError, ReidDataset
from core.datasets.images import read_images
from core.settings.reid import ReidTrainConfig
from trainers.reid.data import TrainingSet
from trainers.reid.evaluate import evaluate_reid
from trainers.reid.model import build_reid_model, load_reid_model
from trainers.reid.train import ReidTrainResult, train_reid

REPORT_FILE = "report.json"


@dataclass(frozen=True)
class BaselineReport:
    """Retrieval metrics of the untrained and the trained model (see `evaluate_reid`)."""

    untrained: dict[str, Any]
    trained: dict[str, Any]
    train_seconds: float
    total_seconds: float
    model_path: str
    history: list[dict[str, float]]

    def summary(self) -> str:
        def line(name: str, m: dict[str, Any]) -> str:
            return (f"{name:>9}: mAP {100 * m['mAP']:5.1f}%  Rank-1 {100 * m['rank1']:5.1f}%  "
                    f"mINP {100 * m['mINP']:5.1f}%")

        gain = self.trained["mAP"] / max(self.untrained["mAP"], 1e-12)
        return "\n".join([
            line("untrained", self.untrained),
            line("trained", self.trained),
            f"mAP x{gain:.1f}; training {self.train_seconds:.0f} s, total {self.total_seconds:.0f} s",
        ])


def run_bot_baseline(dataset: ReidDataset, config: ReidTrainConfig, out_dir: str | Path) -> BaselineReport:
    """Evaluate the untrained model, train it with `train_reid`, evaluate the result; writes
    `out_dir/report.json` (any URI) next to the training outputs. The training images are read
    here once and travel to the Ray Train workers as bytes; evaluation runs here too."""
    start = time.perf_counter()
    out = resolve(out_dir)
    loaded = read_images([r.path for r in dataset.train])
    unreadable = [path for path, data in loaded.items() if not isinstance(data, bytes)]
    if unreadable:
        raise DatasetError(f"{dataset.name}: {len(unreadable)} unreadable training images: {unreadable[:5]}")
    num_classes = TrainingSet.from_records(dataset.train).num_classes
    with _torch_threads(config.cpus_per_worker):
        torch.manual_seed(config.seed)  # the initial weights the training run starts from
        untrained = evaluate_reid(build_reid_model(config, num_classes), dataset, config)
    train_start = time.perf_counter()
    result: ReidTrainResult = train_reid(dataset, config, out.uri, images=loaded)
    train_seconds = time.perf_counter() - train_start
    with _torch_threads(config.cpus_per_worker):
        trained = evaluate_reid(load_reid_model(result.model_path, config, result.num_classes), dataset, config)
    report = BaselineReport(
        untrained=untrained,
        trained=trained,
        train_seconds=train_seconds,
        total_seconds=time.perf_counter() - start,
        model_path=str(result.model_path),
        history=result.history,
    )
    (out / REPORT_FILE).write_text(json.dumps(asdict(report), indent=2))
    return report


@contextmanager
def _torch_threads(cpus: float | None) -> Iterator[None]:
    """Evaluate with the CPU budget a training worker gets (`cpus_per_worker`), when one is set:
    on a shared machine more torch threads than free cores is several times slower, not faster."""
    previous = torch.get_num_threads()
    if cpus is not None:
        torch.set_num_threads(max(1, int(cpus)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)
