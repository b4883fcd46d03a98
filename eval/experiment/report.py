"""The experiment's report: `results.csv` (one row per arm x setting), `runs.csv` (one row per arm
x seed x setting), `results.md` and `plots/map_<dataset>_<method>.png`; with the data-scale study,
`scale.csv` (one row per scale point x setting), its Table 8 section in `results.md` and
`plots/scale_<dataset>_<method>.png`."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from core.settings.downstream import Setting
from core.settings.experiment import ARM_IMAGENET
from eval.experiment.scale import IDENTITIES, IMAGES, ScaleRun
from eval.experiment.stats import CELL

if TYPE_CHECKING:
    from matplotlib.axes import Axes

_GROUP_COLOURS = {"ablation": "tab:gray", "scale": "tab:olive"}  # the main arms: tab:blue
_SCALE_LINES = {IMAGES: ("images per identity", "o-"), IDENTITIES: ("identities", "s--")}
IMAGENET_LABEL = "ImageNet"
STAND_IN_NOTE = "(stand-in)"  # as the downstream report names weights in place of timm's ImageNet ones


def arm_label(arm: str, imagenet_stand_in: bool = False) -> str:
    """How tables and plots name an arm: its config name, except the `imagenet` arm, written as
    the paper writes the init, and marked when a stand-in backbone takes the real weights' place."""
    if arm != ARM_IMAGENET:
        return arm
    return f"{IMAGENET_LABEL} {STAND_IN_NOTE}" if imagenet_stand_in else IMAGENET_LABEL


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
                     consistency: Mapping[str, Mapping[str, Any]], imagenet_stand_in: bool = False) -> str:
    """`imagenet_stand_in`: the `imagenet` arm fine-tunes from the `downstream.imagenet_standin`
    file (its rows and the baseline are labelled so)."""
    lines = ["# Evidence experiment", ""]
    lines += [f"- {key}: {value}" for key, value in meta.items()]
    baseline = arm_label(baseline, imagenet_stand_in)
    for (dataset, method, setting), group in summary.groupby(["dataset", "method", "setting"], sort=False):
        lines += ["", f"## {method.upper()} on {dataset}, {Setting.parse(setting).label}", "",
                  f"| arm | pre-training set | seeds | mAP | Rank-1 | Δ mAP vs {baseline} [95 % CI] "
                  f"| Δ Rank-1 vs {baseline} [95 % CI] | ablation: Δ mAP vs generated, same seeds |",
                  "|---|---|---|---|---|---|---|---|"]
        for _, row in group.iterrows():
            size = ("-" if pd.isna(row["pretrain_images"]) else
                    f"{int(row['pretrain_images'])} images, {int(row['pretrain_ids'])} ids")
            seeds = f"{row['seeds']}" + (f" ({row['errors']} failed)" if row["errors"] else "")
            label = arm_label(row["arm"], imagenet_stand_in) + (f" ({row['group']})" if row["group"] != "main" else "")
            lines.append(f"| {label} | {size} | {seeds} | {_mean_std(row['mAP_mean'], row['mAP_std'])} | "
                         f"{_mean_std(row['rank1_mean'], row['rank1_std'])} | {_difference(row, 'mAP')} | "
                         f"{_difference(row, 'rank1')} | {_difference(row, 'mAP', 'dm')} |")
    if consistency:
        lines += ["", "## The builds", "",
                  "Pass rates: the Re-ID filter's, of samples after the per-identity fine-tune vs the base model "
                  "with the same prompts and seeds (`experiment.consistency_identities`). Gain: fine-tuned minus "
                  "base-model pass rate per identity (paired by seed within it), its mean over identities in "
                  "points with a 95 % t interval over identities (`eval.experiment.consistency`). A build that "
                  "only changes the filter scores the main build's samples again (`generation.replay_from`): its "
                  "rates are the main build's.", "",
                  "| build | kept / generated | identities in the shards | fine-tuned pass rate | base-model pass rate "
                  "| identities measured | gain, points [95 % CI] |",
                  "|---|---|---|---|---|---|---|"]
        for name, entry in consistency.items():
            rates = [f"{100 * rate:.1f} %" if rate is not None else "-"
                     for rate in (entry.get("fine_tuned"), entry.get("base_model"))]
            name += f" ({entry['consistency_source']}'s samples)" if entry.get("consistency_source") else ""
            lines.append(f"| {name} | {entry['kept']} / {entry['generated']} | {entry['identities']} | {rates[0]} | "
                         f"{rates[1]} | {entry.get('consistency_identities', '-')} | {_gain(entry)} |")
        lines += _diversity_lines(consistency)
    return "\n".join(lines) + "\n"


def _gain(entry: Mapping[str, Any]) -> str:
    """`+12.5 [+3.1, +21.9] (n=8)` in points; `-` for a marker from before the paired gain."""
    if entry.get("consistency_gain") is None:
        return "-"
    low, high = entry.get("consistency_gain_low"), entry.get("consistency_gain_high")
    interval = f" [{100 * low:+.1f}, {100 * high:+.1f}]" if low is not None and high is not None else " (no interval)"
    return f"{100 * entry['consistency_gain']:+.1f}{interval} (n={entry.get('consistency_gain_identities', '-')})"


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f} %"


def _distribution(shares: Mapping[str, float]) -> str:
    return ", ".join(f"{label} {100 * share:.0f} %" for label, share in sorted(shares.items(), key=lambda kv: -kv[1]))


def _diversity_lines(markers: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The diversity table: per build, what share of its kept images a probe of the world's capture
    conditions puts in a condition the source (or the image's own identity in the source) lacks."""
    measured = {name: entry["diversity"] for name, entry in markers.items() if entry.get("diversity")}
    if not measured:
        return []
    first = next(iter(measured.values()))
    conditions = list(first["conditions"])
    lines = ["", "## Diversity of the kept images", "",
             "A probe of the procedural world's capture conditions (logistic regression on colour and gradient "
             "statistics, fitted on freshly rendered world images; its held-out accuracy per condition is in the "
             "header) reads each kept image and each source training image (`eval.experiment.diversity`). "
             f"Beyond source: the share of kept images in a condition fewer than {100 * first['min_share']:.0f} % of "
             "the source images show; beyond identity: in a condition that image's own identity's source images "
             "do not show. Figures at or below the probe's error rate are within its noise.", "",
             "| build | kept images read | beyond source | beyond identity | "
             + " | ".join(f"{c}, kept / source (probe {100 * first['conditions'][c]['probe_accuracy']:.0f} % right)"
                          for c in conditions) + " |",
             "|---|---|---|---|" + "---|" * len(conditions)]
    for name, found in measured.items():
        read = found["conditions"]
        cells = [f"{_distribution(read[c]['generated'])} / {_distribution(read[c]['source'])}" for c in conditions]
        lines.append(f"| {name} | {found['generated_images']} | {_percent(found['coverage_beyond_source'])} | "
                     f"{_percent(found.get('coverage_beyond_identity'))} | " + " | ".join(cells) + " |")
    return lines


# (a panel's axis, the rows of its setting, every row of its dataset x method) -> draws the panel
PanelDrawer = Callable[["Axes", pd.DataFrame, pd.DataFrame], None]


def _plot_per_cell(frame: pd.DataFrame, folder: Path, prefix: str, draw: PanelDrawer) -> list[Path]:
    """One figure per dataset x method, `<folder>/<prefix>_<dataset>_<method>.png`, with a panel per
    setting that `draw` fills, titled with its cell."""
    from eval.downstream.plots import plt, save_figure  # matplotlib (Agg: files only) just when plotting

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for (dataset, method), group in frame.groupby(["dataset", "method"], sort=False):
        settings = list(dict.fromkeys(group["setting"]))
        figure, axes = plt.subplots(1, len(settings), figsize=(4.5 * len(settings), 3.6), squeeze=False)
        for axis, setting in zip(axes[0], settings):
            draw(axis, group[group["setting"] == setting], group)
            axis.set_title(f"{method.upper()} {dataset}, {Setting.parse(setting).label}", fontsize=9)
        paths.append(save_figure(figure, folder / f"{prefix}_{dataset}_{method}.png"))
    return paths


def _draw_map_bars(axis: Axes, rows: pd.DataFrame, cell: pd.DataFrame, imagenet_stand_in: bool = False) -> None:
    colours = [_GROUP_COLOURS.get(g, "tab:blue") for g in rows["group"]]
    axis.bar(range(len(rows)), rows["mAP_mean"], yerr=rows["mAP_std"].fillna(0), color=colours, capsize=3)
    labels = [arm_label(arm, imagenet_stand_in) for arm in rows["arm"]]
    axis.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=8)
    axis.set_ylabel("mAP (%)")


def write_plots(summary: pd.DataFrame, folder: Path, imagenet_stand_in: bool = False) -> list[Path]:
    """Bar chart of mAP (mean ± std over seeds) per arm, one panel per setting."""
    return _plot_per_cell(summary, folder, "map",
                          functools.partial(_draw_map_bars, imagenet_stand_in=imagenet_stand_in))


def scale_table(runs: pd.DataFrame, points: Sequence[ScaleRun]) -> pd.DataFrame:
    """The data-scale study from the runs frame (one row per arm x seed x cell): one row per
    scale point (kind, percent) x cell, over the point's own seeds only (the `generated` arm
    standing for 100 % may run more seeds than the study), with the pre-training set's size range
    over those seeds."""
    rows = []
    by_point: dict[tuple[str, float], set[tuple[str, int]]] = {}
    for point in points:
        by_point.setdefault((point.kind, point.percent), set()).add((point.arm, point.seed))
    for (kind, percent), chains in by_point.items():
        mine = runs[[(arm, seed) in chains for arm, seed in zip(runs["arm"], runs["seed"])]]
        for cell, group in mine.groupby(CELL, sort=False):
            ok = group[group["status"] == "done"]
            row = {"kind": kind, "percent": percent, "arms": ",".join(sorted({a for a, _ in chains})),
                   **dict(zip(CELL, cell)), "seeds": len(ok), "chains": len(chains)}
            for column in ("pretrain_images", "pretrain_ids"):
                sizes = pd.to_numeric(group[column], errors="coerce")
                row[f"{column}_min"], row[f"{column}_max"] = sizes.min(), sizes.max()
            for metric in ("mAP", "rank1"):
                values = pd.to_numeric(ok[metric], errors="coerce")
                row[f"{metric}_mean"] = values.mean() if len(ok) else math.nan
                row[f"{metric}_std"] = values.std(ddof=1) if len(ok) > 1 else math.nan
            rows.append(row)
    return pd.DataFrame(rows)


def _size_range(row: Mapping[str, Any], column: str) -> str:
    low, high = row[f"{column}_min"], row[f"{column}_max"]
    if pd.isna(low):
        return "-"
    return f"{int(low)}" if low == high else f"{int(low)}-{int(high)}"


def scale_markdown(table: pd.DataFrame, seeds: Sequence[int]) -> str:
    """The "Data scale (Table 8 layout)" section: a row per scale point (images %, then
    identities %), the pre-training set's size, and mAP / Rank-1 per downstream cell."""
    lines = ["## Data scale (Table 8 layout)", "",
             "Pre-training on a share of the main build's generated images, then the same fine-tuning as every "
             "arm. *images P %*: every identity keeps P % of its images (half up, at least one); *identities P %*: "
             "P % of the identities keep all their images. For one seed a smaller share lies within every larger "
             "one; 100 % is the main build itself (the `generated` arm's chain where it runs the seed). Cells: "
             f"mAP / Rank-1 (%), mean over seeds {list(seeds)} (± std with more than one).", ""]
    if table.empty:
        return "\n".join([*lines, "No scale chain has results yet."]) + "\n"
    cells = list(dict.fromkeys(zip(table["dataset"], table["method"], table["setting"])))
    lines += ["| pre-training data | images | identities | "
              + " | ".join(f"{m.upper()} {d}, {Setting.parse(s).label}" for d, m, s in cells) + " |",
              "|---|---|---|" + "---|" * len(cells)]
    for (kind, percent), group in table.groupby(["kind", "percent"], sort=False):
        by_cell = {(r["dataset"], r["method"], r["setting"]): r for r in group.to_dict("records")}
        first = next(iter(by_cell.values()))
        values = []
        for cell in cells:
            row = by_cell.get(cell)
            if row is None or not row["seeds"]:
                values.append("-")
                continue
            text = f"{_mean_std(row['mAP_mean'], row['mAP_std'])} / {_mean_std(row['rank1_mean'], row['rank1_std'])}"
            partial = row["seeds"] < row["chains"]
            values.append(text + (f" ({row['seeds']} of {row['chains']} seeds)" if partial else ""))
        lines.append(f"| {kind} {percent:g} % | {_size_range(first, 'pretrain_images')} | "
                     f"{_size_range(first, 'pretrain_ids')} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def _draw_scale_lines(axis: Axes, rows: pd.DataFrame, cell: pd.DataFrame) -> None:
    for kind, line in rows.groupby("kind", sort=False):
        line = line.sort_values("percent")
        label, style = _SCALE_LINES[kind]
        axis.errorbar(line["percent"], line["mAP_mean"], yerr=line["mAP_std"].fillna(0), fmt=style,
                      capsize=3, label=label)
    # The paper's shares halve (12.5, 25, 50, 100 %): even steps on a log axis, the same in every panel.
    percents = sorted(set(cell["percent"]))
    axis.set_xscale("log", base=2)
    axis.set_xticks(percents, [f"{p:g}" for p in percents])
    axis.minorticks_off()
    axis.set_xlabel("share of the generated data kept (%)")
    axis.set_ylabel("mAP (%)")
    axis.legend(fontsize=8)


def write_scale_plots(table: pd.DataFrame, folder: Path) -> list[Path]:
    """mAP (mean ± std over seeds) against the percent kept, one line per axis (images per
    identity, identities), one panel per setting, one file per dataset x method."""
    return _plot_per_cell(table, folder, "scale", _draw_scale_lines)
