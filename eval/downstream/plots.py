"""PNG figures of a downstream grid (matplotlib, Agg backend: no display needed).

- `cmc_<dataset>_<method>_<setting>.png`: CMC curves of the cell, one per initialisation
  (mean over seeds).
- `fraction_<dataset>_<method>_<fs|ss>.png`: mAP and Rank-1 against the percentage of training
  data kept, one line per initialisation, the supervised result drawn at 100 % when present
  (the paper's Fig. 7).
- `bars_<unsupervised|da|dg>.png`: mAP and Rank-1 per method and dataset (DA: source→target
  pair, DG: target), a bar per initialisation (mean over seeds, the std over seeds as error bar):
  Tables 4 to 6 at a glance.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from eval.downstream.tables import (  # noqa: E402
    DOMAIN_ADAPTATION,
    DOMAIN_GENERALIZATION,
    INIT_LABELS,
    INIT_ORDER,
    STATUS_DONE,
    UNSUPERVISED,
    setting_label,
)

_STYLE = {"ours": dict(color="tab:red", marker="o"), "imagenet": dict(color="tab:blue", marker="s"),
          "random": dict(color="tab:gray", marker="^")}
_KIND_NAMES = {"fs": "few-shot image (Fs)", "ss": "small-scale identity (Ss)"}


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text)


def save_figure(figure: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_cmc(
    frame: pd.DataFrame, cmc: Mapping[str, Sequence[float]], out_dir: Path, max_rank: int = 20
) -> list[Path]:
    """One CMC figure per dataset x method x setting with a curve per initialisation."""
    done = frame[frame["status"] == STATUS_DONE]
    paths = []
    for (dataset, method, setting), group in done.groupby(["dataset", "method", "setting"], sort=False):
        figure, axis = plt.subplots(figsize=(5, 3.6))
        for init in INIT_ORDER:
            keys = [f"{dataset}/{method}/{init}/{setting}/seed{seed}" for seed in group[group["init"] == init]["seed"]]
            curves = [np.asarray(cmc[k], dtype=float)[:max_rank] for k in keys if k in cmc]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            mean = 100 * np.mean([c[:length] for c in curves], axis=0)
            axis.plot(np.arange(1, length + 1), mean, label=f"{INIT_LABELS[init]} (R1 {mean[0]:.1f})",
                      markersize=3, **_STYLE[init])
        axis.set(xlabel="rank", ylabel="matching rate (%)", ylim=(0, 100),
                 title=f"CMC: {dataset}, {method.upper()}, {setting_label(setting)}")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        axis.legend(loc="lower right", fontsize=8)
        paths.append(save_figure(figure, out_dir / f"cmc_{_safe(dataset)}_{_safe(method)}_{_safe(setting)}.png"))
    return paths


def plot_fraction_curves(frame: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Fig. 7: mAP and Rank-1 vs data percentage, per dataset x method x {Fs, Ss}."""
    done = frame[frame["status"] == STATUS_DONE]
    paths = []
    for (dataset, method), group in done.groupby(["dataset", "method"], sort=False):
        for kind in ("fs", "ss"):
            points = group[group["kind"] == kind]
            if points.empty:
                continue
            full = group[group["kind"] == "supervised"]
            figure, axes = plt.subplots(1, 2, figsize=(9, 3.6))
            for axis, metric, label in zip(axes, ("mAP", "rank1"), ("mAP (%)", "Rank-1 (%)")):
                for init in INIT_ORDER:
                    series = pd.concat([points[points["init"] == init], full[full["init"] == init]])
                    if series.empty:
                        continue
                    means = series.groupby("percent")[metric].mean().sort_index()
                    axis.plot(means.index, means.to_numpy(), label=INIT_LABELS[init], **_STYLE[init])
                axis.set(xlabel="training data kept (%)", ylabel=label, xlim=(0, 105), xticks=[10, 30, 50, 70, 90, 100])
                axis.grid(alpha=0.3)
                axis.legend(fontsize=8)
            figure.suptitle(f"{dataset}, {method.upper()}: {_KIND_NAMES[kind]}", fontsize=10)
            paths.append(save_figure(figure, out_dir / f"fraction_{_safe(dataset)}_{_safe(method)}_{kind}.png"))
    return paths


def _group_label(method: str, dataset: str) -> str:
    """`market1501\n→msmt17\nCLUSTER_CONTRAST`: a DA pair broken at its arrow, so labels stay narrow."""
    return "\n".join([dataset.replace("->", "\n→"), method.upper()])


def plot_protocol_bars(frame: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Tables 4-6 as grouped bars: one figure per setting, a group per method x dataset."""
    done = frame[frame["status"] == STATUS_DONE]
    paths = []
    for setting in (UNSUPERVISED, DOMAIN_ADAPTATION, DOMAIN_GENERALIZATION):
        cells = done[done["kind"] == setting]
        if cells.empty:
            continue
        groups = list(dict.fromkeys(zip(cells["method"], cells["dataset"])))
        inits = [init for init in INIT_ORDER if (cells["init"] == init).any()]
        width = 0.8 / len(inits)
        figure, axes = plt.subplots(1, 2, figsize=(max(7.0, 2.0 * len(groups) + 2), 4.0))
        for axis, metric, label in zip(axes, ("mAP", "rank1"), ("mAP (%)", "Rank-1 (%)")):
            for offset, init in enumerate(inits):
                per_group = [cells[(cells["method"] == m) & (cells["dataset"] == d) & (cells["init"] == init)][metric]
                             for m, d in groups]
                means = [values.mean() if len(values) else np.nan for values in per_group]
                stds = [values.std() if len(values) > 1 else 0.0 for values in per_group]
                axis.bar(np.arange(len(groups)) + (offset - (len(inits) - 1) / 2) * width, means, width, yerr=stds,
                         capsize=2, label=INIT_LABELS[init], color=_STYLE[init]["color"])
            axis.set_xticks(np.arange(len(groups)),
                            [_group_label(m, d) for m, d in groups], fontsize=7)
            axis.set(ylabel=label, ylim=(0, 100))
            axis.grid(axis="y", alpha=0.3)
            axis.legend(fontsize=8)
        figure.suptitle(f"{setting_label(setting)}: mean over seeds, std as error bar", fontsize=10)
        paths.append(save_figure(figure, out_dir / f"bars_{setting}.png"))
    return paths


def write_plots(frame: pd.DataFrame, cmc: Mapping[str, Sequence[float]], out_dir: str | Path) -> list[Path]:
    """All figures of the grid under `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    return plot_cmc(frame, cmc, out_dir) + plot_fraction_curves(frame, out_dir) + plot_protocol_bars(frame, out_dir)
