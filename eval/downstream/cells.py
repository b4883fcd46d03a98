"""The grid's cells: what each one is, its folder under `cells/`, the digest of everything that
determines its result, and reading a finished result back."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from core.storage import Location, resolve
from core.settings.downstream import ADAPTATION, GENERALIZATION, DownstreamConfig
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
        safe = [part.replace("/", "_").replace("->", "-to-") for part in
                (self.dataset, self.method, self.init, self.setting.name)]
        return resolve(out_dir) / "/".join(["cells", *safe, f"seed{self.seed}"])


def plan_cells(config: DownstreamConfig) -> list[Cell]:
    """The grid: per setting, its datasets x its methods x init x seed (`DownstreamConfig.datasets_for`
    / `methods_for`: the supervised methods on the supervised datasets, Fs/Ss narrowed by
    `fraction_datasets` / `fraction_methods`, the unsupervised methods on the unsupervised datasets
    and the adaptation pairs, the DG methods on the merged DG sources)."""
    labelled = [s for s in config.setting_list if s.trains_with_labels_of_the_dataset]
    others = [s for s in config.setting_list if not s.trains_with_labels_of_the_dataset]
    # The labelled settings in the order of earlier versions (dataset, method, setting, init, seed).
    cells = [Cell(dataset, method, init, setting, seed)
             for dataset in [d.source_name for d in config.datasets] for method in config.methods
             for setting in labelled
             if dataset in config.datasets_for(setting) and method in config.methods_for(setting)
             for init in config.inits for seed in config.seeds]
    return cells + [Cell(dataset, method, init, setting, seed)
                    for setting in others for dataset in config.datasets_for(setting)
                    for method in config.methods_for(setting) for init in config.inits for seed in config.seeds]


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def cell_digest(cell: Cell, config: DownstreamConfig, init: InitWeights) -> str:
    """Changes whenever anything that determines the cell's result does."""
    read = [d.model_dump(mode="json") for d in config.datasets_of_cell(cell.dataset, cell.setting)]
    payload: dict[str, Any] = {
        "cell": cell.params(),
        "train": config.train.model_dump(mode="json"),
        "method_options": config.method_options.get(cell.method, {}),
        "dataset": read[0] if len(read) == 1 else read,  # one dataset: the digest of earlier versions
        "weights": init.digest,
        "fs_min_images_per_id": config.fs_min_images_per_id,
        "ss_min_identities": config.ss_min_identities,
    }
    if cell.setting.kind == ADAPTATION:  # the source model's recipe is part of the result
        payload["source_method"] = [config.adaptation_source_method,
                                    config.method_options.get(config.adaptation_source_method, {})]
    if cell.setting.kind == GENERALIZATION and config.generalization is not None:
        payload["generalization"] = config.generalization.model_dump(mode="json", exclude={"methods"})
    return _digest(payload)


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
