"""The experiment's report: `results.csv` (one row per arm x setting), `runs.csv` (one row per arm
x seed x setting), `results.md` and `plots/map_<dataset>_<method>.png`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from core.settings.downstream import Setting


def _mean_std(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.1f} ± {std:.1f}" if not math.isnan(std) else f"{mean:.1f}"


def _difference(row: Mapping[str, Any], metric: str, prefix: str = "d") -> str:
    mean, low, high = row[f"{prefix}_{metric}"], row[f"{prefix}_{metric}_low"], row[f"{prefix}_{metric}_high"]
    if math.isnan(mean):
        return "-"
    interval = f" [{low:+.1f}, {high:+.1f}]" if not math.isnan(low) else " (1 seed: no interval)"
    return f"{mean:+.1f}{interval}"


def results_markdown(summary: pd.DataFrame, baseline: str, meta: Mapping[str, str],
                     consistency: Mapping[str, Mapping[str, Any]]) -> str:
    lines = ["# Evidence experiment", ""]
    lines += [f"- {key}: {value}" for key, value in meta.items()]
    for (dataset, method, setting), group in summary.groupby(["dataset", "method", "setting"], sort=False):
        lines += ["", f"## {method.upper()} on {dataset}, {Setting.parse(setting).label}", "",
                  f"| arm | pre-training set | seeds | mAP | Rank-1 | Δ mAP vs {baseline} [95 % CI] "
                  f"| Δ Rank-1 vs {baseline} [95 % CI] | ablation: Δ mAP vs generated, same seeds |",
                  "|---|---|---|---|---|---|---|---|"]
        for _, row in group.iterrows():
            size = ("-" if pd.isna(row["pretrain_images"]) else
                    f"{int(row['pretrain_images'])} images, {int(row['pretrain_ids'])} ids")
            seeds = f"{row['seeds']}" + (f" ({row['errors']} failed)" if row["errors"] else "")
            label = row["arm"] + (" (ablation)" if row["group"] == "ablation" else "")
            lines.append(f"| {label} | {size} | {seeds} | {_mean_std(row['mAP_mean'], row['mAP_std'])} | "
                         f"{_mean_std(row['rank1_mean'], row['rank1_std'])} | {_difference(row, 'mAP')} | "
                         f"{_difference(row, 'rank1')} | {_difference(row, 'mAP', 'dm')} |")
    if consistency:
        lines += ["", "## The builds", "",
                  "Pass rates: the Re-ID filter's, of samples after the per-identity fine-tune vs the base model "
                  "with the same prompts and seeds (`experiment.consistency_identities`). A build that only "
                  "changes the filter scores the main build's samples again (`generation.replay_from`): its "
                  "rates are the main build's.", "",
                  "| build | kept / generated | identities in the shards | fine-tuned pass rate | base-model pass rate "
                  "| identities measured |",
                  "|---|---|---|---|---|---|"]
        for name, entry in consistency.items():
            rates = [f"{100 * rate:.1f} %" if rate is not None else "-"
                     for rate in (entry.get("fine_tuned"), entry.get("base_model"))]
            name += f" ({entry['consistency_source']}'s samples)" if entry.get("consistency_source") else ""
            lines.append(f"| {name} | {entry['kept']} / {entry['generated']} | {entry['identities']} | {rates[0]} | "
                         f"{rates[1]} | {entry.get('consistency_identities', '-')} |")
    return "\n".join(lines) + "\n"


def write_plots(summary: pd.DataFrame, folder: Path) -> list[Path]:
    """Bar chart of mAP (mean ± std over seeds) per arm, one panel per setting."""
    from eval.downstream.plots import plt, save_figure  # matplotlib (Agg: files only) just when plotting

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for (dataset, method), group in summary.groupby(["dataset", "method"], sort=False):
        settings = list(dict.fromkeys(group["setting"]))
        figure, axes = plt.subplots(1, len(settings), figsize=(4.5 * len(settings), 3.6), squeeze=False)
        for axis, setting in zip(axes[0], settings):
            rows = group[group["setting"] == setting]
            colours = ["tab:gray" if g == "ablation" else "tab:blue" for g in rows["group"]]
            axis.bar(range(len(rows)), rows["mAP_mean"], yerr=rows["mAP_std"].fillna(0), color=colours, capsize=3)
            axis.set_xticks(range(len(rows)), rows["arm"], rotation=45, ha="right", fontsize=8)
            axis.set_title(f"{method.upper()} {dataset}, {Setting.parse(setting).label}", fontsize=9)
            axis.set_ylabel("mAP (%)")
        paths.append(save_figure(figure, folder / f"map_{dataset}_{method}.png"))
    return paths
