"""Results of a downstream grid as the paper prints them: mAP/Rank-1 in % per cell, and the
delta of the evaluated backbone ("ours") over ImageNet and over random initialisation in
points ("+2.9/+1.2", Tables 2 and 3).

Input is one row per cell (dataset, method, init, setting, seed) as `runner` collects them; the
CSV keeps every cell (each seed), the Markdown averages over seeds (deltas of the means).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from core.storage import atomic_local_path
from core.settings.downstream import INIT_IMAGENET, INIT_OURS, INIT_RANDOM
from core.settings.downstream import Setting

STATUS_DONE, STATUS_UNAVAILABLE, STATUS_ERROR, STATUS_MISSING = "done", "unavailable", "error", "missing"
INIT_ORDER = (INIT_IMAGENET, INIT_OURS, INIT_RANDOM)
INIT_LABELS = {INIT_IMAGENET: "IN", INIT_OURS: "Ours", INIT_RANDOM: "Random"}
BASELINES = (INIT_IMAGENET, INIT_RANDOM)  # ours minus these: columns delta_<metric>_vs_<init>
METRICS = ("mAP", "rank1", "rank5", "rank10", "mINP")
CSV_COLUMNS = (
    "dataset", "method", "init", "setting", "kind", "percent", "seed", "status",
    *METRICS,
    "delta_mAP_vs_imagenet", "delta_rank1_vs_imagenet", "delta_mAP_vs_random", "delta_rank1_vs_random",
    "train_images", "train_ids", "image_fraction", "id_fraction", "epochs", "train_seconds",
    "total_seconds", "reason",
)
_INTEGER_COLUMNS = ("percent", "seed", "train_images", "train_ids", "epochs")


def results_frame(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Cells as a frame with the CSV columns; metrics in %, per-seed deltas on `ours` rows."""
    frame = pd.DataFrame(list(rows))
    for column in CSV_COLUMNS:
        if column not in frame:
            frame[column] = "" if column == "reason" else math.nan
    _add_deltas(frame, frame[frame["status"] == STATUS_DONE], ["dataset", "method", "setting", "seed"])
    for column in _INTEGER_COLUMNS:  # nullable ints: unavailable cells have none
        frame[column] = pd.to_numeric(frame[column], errors="coerce").round().astype("Int64")
    return frame[list(CSV_COLUMNS)]


def _add_deltas(frame: pd.DataFrame, references: pd.DataFrame, keys: list[str]) -> None:
    """`delta_<metric>_vs_<baseline>` on the `ours` rows of `frame`: their metric minus that of the
    baseline's row in `references` with the same `keys` (NaN where it has none)."""
    ours = frame["init"] == INIT_OURS
    index = pd.MultiIndex.from_frame(frame.loc[ours, keys])
    for baseline in BASELINES:
        base = references[references["init"] == baseline].set_index(keys)
        for metric in ("mAP", "rank1"):
            column = f"delta_{metric}_vs_{baseline}"
            frame[column] = frame[column] if column in frame else math.nan
            reference = base[metric].reindex(index).to_numpy(dtype=float)
            frame.loc[ours, column] = frame.loc[ours, metric].to_numpy(dtype=float) - reference


def write_results_csv(frame: pd.DataFrame, path: str | Path) -> Path:
    with atomic_local_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.2f")
    return Path(path)


def _pair(first: float, second: float, signed: bool = False) -> str:
    if math.isnan(first) or math.isnan(second):
        return "n/a"
    return f"{first:+.1f}/{second:+.1f}" if signed else f"{first:.1f}/{second:.1f}"


def _order(values: Sequence[str], preferred: Sequence[str]) -> list[str]:
    rank = {v: i for i, v in enumerate(preferred)}
    return sorted(dict.fromkeys(values), key=lambda v: (rank.get(v, len(rank)), v))


def summarise(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per dataset x method x init x setting: status, mean mAP/Rank-1 over finished
    seeds, the seed count, and the deltas of ours' means over the baselines' means."""
    keys = ["dataset", "method", "init", "setting"]
    records = []
    for key, group in frame.groupby(keys, sort=False):
        done = group[group["status"] == STATUS_DONE]
        statuses = set(group["status"])
        status = STATUS_DONE if len(done) == len(group) else (
            STATUS_UNAVAILABLE if statuses == {STATUS_UNAVAILABLE} else
            STATUS_ERROR if STATUS_ERROR in statuses else STATUS_MISSING if done.empty else "partial"
        )
        records.append({
            **dict(zip(keys, key)), "status": status, "seeds": len(done),
            "mAP": done["mAP"].mean() if len(done) else math.nan,
            "rank1": done["rank1"].mean() if len(done) else math.nan,
            "reason": "; ".join(sorted({str(r) for r in group["reason"] if isinstance(r, str) and r})),
        })
    summary = pd.DataFrame(records)
    _add_deltas(summary, summary, ["dataset", "method", "setting"])
    return summary


def _value(row: Mapping[str, Any] | None) -> str:
    if row is None:
        return "-"
    if row["status"] in (STATUS_UNAVAILABLE, STATUS_ERROR, STATUS_MISSING):
        return str(row["status"])
    return _pair(row["mAP"], row["rank1"])


def _delta(row: Mapping[str, Any] | None, label: str) -> str:
    if row is None or row["init"] != INIT_OURS:
        return ""
    return _pair(row[f"delta_mAP_vs_{label}"], row[f"delta_rank1_vs_{label}"], signed=True)


def _kept(frame: pd.DataFrame, dataset: str, method: str, setting: str) -> str:
    """What a fraction setting actually kept (Fs raises tiny identities to the minimum)."""
    done = frame[(frame["dataset"] == dataset) & (frame["method"] == method) & (frame["setting"] == setting)
                 & (frame["status"] == STATUS_DONE)]
    if done.empty:
        return "-"
    images = pd.to_numeric(done["image_fraction"], errors="coerce").mean()
    ids = pd.to_numeric(done["id_fraction"], errors="coerce").mean()
    if math.isnan(images) or math.isnan(ids):
        return "-"
    return f"{100 * images:.0f}% imgs, {100 * ids:.0f}% ids"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


# The rows of the paper's Table 2 and 3 layouts: an init's results, or ours' delta over a baseline.
_LAYOUT = ((INIT_IMAGENET, None), (INIT_OURS, None), (None, INIT_IMAGENET), (INIT_RANDOM, None), (None, INIT_RANDOM))


def _layout_rows(first: str, delta_first: str, columns: Callable[[str], list[Any]]) -> list[list[str]]:
    """`columns(init)` gives the summary rows (or None) of the table's columns for `init`."""
    rows = []
    for init, baseline in _LAYOUT:
        if init is not None:
            rows.append([first, INIT_LABELS[init], *map(_value, columns(init))])
        else:
            rows.append([delta_first, f"Δ vs {'IN' if baseline == INIT_IMAGENET else 'random'}",
                         *[_delta(row, baseline) or "-" for row in columns(INIT_OURS)]])
    return rows


def results_markdown(
    frame: pd.DataFrame,
    methods: Sequence[str] = (),
    settings: Sequence[str] = (),
    meta: Mapping[str, Any] | None = None,
) -> str:
    """`results.md`: the per-cell table, then the paper's Table 2 (supervised) and Table 3
    (Fs/Ss) layouts. `methods`/`settings` give the row order (the config's)."""
    # Rows laid out by hand, not DataFrame.pivot(...).to_markdown(): the paper's layouts put delta
    # rows between the init rows and status words (unavailable, error) where numbers would be,
    # and to_markdown needs tabulate, which nothing else here uses.
    summary = summarise(frame)
    method_order = _order(summary["method"].tolist(), methods)
    setting_order = _order(summary["setting"].tolist(), settings)
    datasets = list(dict.fromkeys(summary["dataset"]))
    cell = {(r["dataset"], r["method"], r["setting"], r["init"]): r for _, r in summary.iterrows()}

    lines = ["# Downstream Re-ID evaluation", "", *[f"- {key}: {value}" for key, value in (meta or {}).items()]]
    lines += [
        "",
        "Entries are mAP/Rank-1 in % (Market-1501 protocol), averaged over seeds; deltas are "
        "ours minus the baseline in points, as in the paper's Tables 2 and 3. `unavailable`: "
        "those weights could not be had (see the notes); the cell was not run.",
        "",
        "## All cells",
        "",
    ]
    rows = [[dataset, method.upper(), Setting.parse(setting).label, INIT_LABELS[init], _value(row), str(row["seeds"]),
             _delta(row, "imagenet"), _delta(row, "random")]
            for dataset in datasets for method in method_order for setting in setting_order for init in INIT_ORDER
            if (row := cell.get((dataset, method, setting, init))) is not None]
    lines += _table(["Dataset", "Method", "Setting", "Init", "mAP/Rank-1", "Seeds", "Δ vs ImageNet",
                     "Δ vs random"], rows)

    supervised = [m for m in method_order if any(k[1] == m and k[2] == "supervised" for k in cell)]
    if supervised:
        lines += ["", "## Supervised (Table 2 layout)", ""]
        rows = []
        for dataset in datasets:
            rows += _layout_rows(dataset, "", lambda init: [cell.get((dataset, m, "supervised", init))
                                                            for m in supervised])
        lines += _table(["Dataset", "Init", *[m.upper() for m in supervised]], rows)

    fractions = [s for s in setting_order if Setting.parse(s).kind in ("fs", "ss")]
    for dataset in datasets:
        for method in method_order:
            present = [s for s in fractions if any(k[:3] == (dataset, method, s) for k in cell)]
            if not present:
                continue
            percents = sorted({Setting.parse(s).percent for s in present})
            lines += ["", f"## Fs / Ss on {dataset} with {method.upper()} (Table 3 layout)", ""]
            rows = []
            for kind in ("fs", "ss"):
                if not any(Setting.parse(s).kind == kind for s in present):
                    continue
                rows += _layout_rows(kind.capitalize(), kind.capitalize(), lambda init: [
                    cell.get((dataset, method, f"{kind}{percent}", init)) for percent in percents])
                rows.append([kind.capitalize(), "data kept", *[
                    _kept(frame, dataset, method, f"{kind}{percent}") for percent in percents]])
            lines += _table(["Setting", "Init", *[f"{p}%" for p in percents]], rows)

    notes = summary[summary["reason"].astype(bool)]
    if not notes.empty:
        texts = [f"- {r['init']} / {r['status']}: {r['reason']}" if r["status"] == STATUS_UNAVAILABLE else
                 f"- {r['dataset']}/{r['method']}/{r['init']}/{r['setting']} {r['status']}: {r['reason']}"
                 for _, r in notes.iterrows()]
        lines += ["", "## Notes", "", *dict.fromkeys(texts)]
    return "\n".join(lines) + "\n"
