"""Downstream Re-ID evaluation of a pre-trained backbone under Ray Tune (the paper's Sec. 4.2).

    python -m eval.downstream --backbone CKPT/backbone.safetensors [--config FILE] [--out DIR] [--set k=v]

or from Python::

    from eval.downstream import run_downstream
    report = run_downstream(load_run_config("configs/demo.yaml").downstream, backbone="backbone.safetensors")

The exports load lazily: `factory.run_config` imports `eval.downstream.config` for every preset,
and must not pull in Ray Tune and torch with it.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DownstreamConfig": "eval.downstream.config",
    "Setting": "eval.downstream.settings",
    "few_shot_images": "eval.downstream.settings",
    "small_scale_identities": "eval.downstream.settings",
    "training_subset": "eval.downstream.settings",
    "METHODS": "eval.downstream.methods",
    "ReidMethod": "eval.downstream.methods",
    "get_method": "eval.downstream.methods",
    "register_method": "eval.downstream.methods",
    "Cell": "eval.downstream.cells",
    "DownstreamReport": "eval.downstream.runner",
    "fine_tune_cell": "eval.downstream.trial",
    "plan_cells": "eval.downstream.cells",
    "run_downstream": "eval.downstream.runner",
    "results_markdown": "eval.downstream.tables",
    "write_plots": "eval.downstream.plots",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'eval.downstream' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
