"""The grid's cells: what each one is, its folder under `cells/`, the digest of everything that
determines its result, and reading a finished result back."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from core.storage import Location, resolve
from core.settings.downstream import DownstreamConfig
from eval.downstream.inits import InitWeights
from core.settings.downstream import Setting


RESULT_FILE = "result.json"
EXECUTIONS_FILE = "executions.log"
RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
CONFIG_FILE = "config.yaml"


@dataclass(frozen=True, order=True)
class Cell:
    """One point of the grid, and one Tune trial."""

    dataset: str
    method: str
    init: str
    setting: Setting
    seed: int

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.method}/{self.init}/{self.setting.name}/seed{self.seed}"

    def params(self) -> dict[str, Any]:
        """The trial's config entry (plain JSON, as Tune stores it)."""
        return {"dataset": self.dataset, "method": self.method, "init": self.init,
                "setting": self.setting.name, "seed": self.seed}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Cell:
        return cls(params["dataset"], params["method"], params["init"], Setting.parse(params["setting"]),
                   int(params["seed"]))

    def directory(self, out_dir: Location | str) -> Location:
        safe = [part.replace("/", "_") for part in (self.dataset, self.method, self.init, self.setting.name)]
        return resolve(out_dir) / "/".join(["cells", *safe, f"seed{self.seed}"])


def plan_cells(config: DownstreamConfig) -> list[Cell]:
    """The grid: dataset x method x init x setting x seed, with the Fs/Ss settings limited to
    `fraction_datasets` / `fraction_methods` when those are given."""
    return [Cell(source.source_name, method, init, setting, seed)
            for source in config.datasets for method in config.methods for setting in config.setting_list
            if setting.kind == "supervised" or (
                (not config.fraction_datasets or source.source_name in config.fraction_datasets)
                and (not config.fraction_methods or method in config.fraction_methods))
            for init in config.inits for seed in config.seeds]


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def cell_digest(cell: Cell, config: DownstreamConfig, init: InitWeights) -> str:
    """Changes whenever anything that determines the cell's result does."""
    source = next(d for d in config.datasets if d.source_name == cell.dataset)
    return _digest({
        "cell": cell.params(),
        "train": config.train.model_dump(mode="json"),
        "method_options": config.method_options.get(cell.method, {}),
        "dataset": source.model_dump(mode="json"),
        "weights": init.digest,
        "fs_min_images_per_id": config.fs_min_images_per_id,
        "ss_min_identities": config.ss_min_identities,
    })


def read_cell_result(out_dir: Location | str, cell: Cell, digest: str) -> dict[str, Any] | None:
    """The cell's finished result if it was computed under `digest`, else None."""
    location = cell.directory(out_dir) / RESULT_FILE
    try:
        result = location.read_json()
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return result if result.get("digest") == digest else None


def count_executions(out_dir: Location | str, cell: Cell) -> int:
    """How many trials started training this cell (lines of its `executions.log`)."""
    location = cell.directory(out_dir) / EXECUTIONS_FILE
    return len(location.read_text().splitlines()) if location.exists() else 0
