"""Results of a downstream grid as the paper prints them: mAP/Rank-1 in % per cell, and the
delta of the evaluated backbone ("ours") over ImageNet and over random initialisation in
points ("+2.9/+1.2", Tables 2 to 6).

Input is one row per cell (dataset, method, init, setting, seed) as `runner` collects them; the
CSV keeps every cell (each seed), the Markdown averages over seeds (deltas of the means).
Settings beyond supervised and Fs/Ss add columns to their rows: `unsupervised` the untrained
reference (`before_mAP`, `before_rank1`) and the last clustering's `clusters`/`outliers`; `da`
(dataset "SOURCE->TARGET") `source`, `target` and the direct transfer before adaptation
(`direct_mAP`, `direct_rank1`); `dg` (dataset = the target) `sources`, the std over the random
query/gallery splits (`mAP_std`, `rank1_std`) and their count (`splits`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from core.storage import atomic_local_path
from core.settings.downstream import ADAPTATION as DOMAIN_ADAPTATION
from core.settings.downstream import GENERALIZATION as DOMAIN_GENERALIZATION
from core.settings.downstream import INIT_IMAGENET, INIT_OURS, INIT_RANDOM, UNSUPERVISED, Setting

STATUS_DONE, STATUS_UNAVAILABLE, STATUS_ERROR, STATUS_MISSING = "done", "unavailable", "error", "missing"
INIT_ORDER = (INIT_IMAGENET, INIT_OURS, INIT_RANDOM)
INIT_LABELS = {INIT_IMAGENET: "IN", INIT_OURS: "Ours", INIT_RANDOM: "Random"}
BASELINES = (INIT_IMAGENET, INIT_RANDOM)  # ours minus these: columns delta_<metric>_vs_<init>
METRICS = ("mAP", "rank1", "rank5", "rank10", "mINP")
# Per-setting columns (see the module docstring); empty on the rows of other settings.
# Averaged over seeds in the summary:
PROTOCOL_MEANS = ("before_mAP", "before_rank1", "direct_mAP", "direct_rank1", "source_mAP", "source_rank1",
                  "mAP_std", "rank1_std", "clusters", "outliers")
PROTOCOL_FIRSTS = ("splits", "source", "target", "sources")  # one value per cell: the first given
CSV_COLUMNS = (
    "dataset", "method", "init", "setting", "kind", "percent", "seed", "status",
    *METRICS,
    "delta_mAP_vs_imagenet", "delta_rank1_vs_imagenet", "delta_mAP_vs_random", "delta_rank1_vs_random",
    *PROTOCOL_MEANS, *PROTOCOL_FIRSTS,
    "train_images", "train_ids", "image_fraction", "id_fraction", "epochs", "train_seconds",
    "total_seconds", "reason",
)
_INTEGER_COLUMNS = ("percent", "seed", "train_images", "train_ids", "epochs", "clusters", "outliers", "splits")
_TEXT_COLUMNS = ("source", "target", "sources", "reason")


def setting_label(setting: str) -> str:
    """How the paper writes a setting: `supervised`, `Fs 30%`, `unsupervised`, `DA`, `DG`."""
    return Setting.parse(setting).label


def setting_kind(setting: str) -> str:
    """`supervised`, `fs`, `ss`, `unsupervised`, `da` or `dg`."""
    return Setting.parse(setting).kind


def results_frame(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Cells as a frame with the CSV columns; metrics in %, per-seed deltas on `ours` rows."""
    frame = pd.DataFrame(list(rows))
    for column in CSV_COLUMNS:
        if column not in frame:
            frame[column] = "" if column in _TEXT_COLUMNS else math.nan
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


def _first(values: pd.Series) -> Any:
    """The first value given (not NaN, not empty), else NaN."""
    given = [v for v in values if not (v is pd.NA or (isinstance(v, float) and math.isnan(v)) or v == "")]
    return given[0] if given else math.nan


def summarise(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per dataset x method x init x setting: status, mean mAP/Rank-1 over finished
    seeds, the seed count, and the deltas of ours' means over the baselines' means; the
    per-setting columns as `PROTOCOL_MEANS` (means over finished seeds) and `PROTOCOL_FIRSTS`."""
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
            **{c: pd.to_numeric(done[c], errors="coerce").mean() if len(done) else math.nan
               for c in PROTOCOL_MEANS if c in group},
            **{c: _first(group[c]) for c in PROTOCOL_FIRSTS if c in group},
            "reason": "; ".join(sorted({str(r) for r in group["reason"] if isinstance(r, str) and r})),
        })
    summary = pd.DataFrame(records)
    _add_deltas(summary, summary, ["dataset", "method", "setting"])
    return summary


def _value(row: Mapping[str, Any] | None, prefix: str = "") -> str:
    """`<prefix>mAP/<prefix>rank1` of a summary row (prefix `before_`: untrained, `direct_`: direct
    transfer), or why it has none."""
    if row is None:
        return "-"
    if row["status"] in (STATUS_UNAVAILABLE, STATUS_ERROR, STATUS_MISSING):
        return str(row["status"])
    return _pair(row.get(f"{prefix}mAP", math.nan), row.get(f"{prefix}rank1", math.nan))


def _value_with_std(row: Mapping[str, Any] | None) -> str:
    """DG: `41.2±1.3/52.0±2.1`, the mean and std over query/gallery splits (no ± where no std)."""
    if row is None or row["status"] in (STATUS_UNAVAILABLE, STATUS_ERROR, STATUS_MISSING):
        return _value(row)
    mean_map, mean_rank1 = row["mAP"], row["rank1"]
    if math.isnan(mean_map) or math.isnan(mean_rank1):
        return "n/a"
    parts = []
    for mean, std in ((mean_map, row.get("mAP_std", math.nan)), (mean_rank1, row.get("rank1_std", math.nan))):
        parts.append(f"{mean:.1f}" if math.isnan(std) else f"{mean:.1f}±{std:.1f}")
    return "/".join(parts)


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


def _layout_rows(first: str, delta_first: str, columns: Callable[[str], list[Any]],
                 value: Callable[[Any], str] = _value) -> list[list[str]]:
    """`columns(init)` gives the summary rows (or None) of the table's columns for `init`;
    `value` writes an init's entry."""
    rows = []
    for init, baseline in _LAYOUT:
        if init is not None:
            rows.append([first, INIT_LABELS[init], *map(value, columns(init))])
        else:
            rows.append([delta_first, f"Δ vs {'IN' if baseline == INIT_IMAGENET else 'random'}",
                         *[_delta(row, baseline) or "-" for row in columns(INIT_OURS)]])
    return rows


Cells = Mapping[tuple[str, str, str, str], Any]  # (dataset, method, setting, init) -> summary row


def _with_setting(cells: Cells, names: Sequence[str], position: int, setting: str) -> list[str]:
    """The `names` (datasets: position 0, methods: 1) that have a cell of `setting`, in order."""
    return [n for n in names if any(k[position] == n and k[2] == setting for k in cells)]


def _unsupervised_section(cells: Cells, datasets: Sequence[str], methods: Sequence[str]) -> list[str]:
    """Table 4: a block per dataset, a column per method."""
    methods = _with_setting(cells, methods, 1, UNSUPERVISED)
    if not methods:
        return []
    rows = []
    for dataset in _with_setting(cells, datasets, 0, UNSUPERVISED):
        def columns(init: str, dataset: str = dataset) -> list[Any]:
            return [cells.get((dataset, m, UNSUPERVISED, init)) for m in methods]

        rows += _layout_rows(dataset, "", columns)
        # The untrained reference as rows of the same block rather than a table of its own: it
        # depends on the method too (its head and pooling shape the embedding, e.g. AGW's GeM),
        # so it shares the method columns, and reading a column down gives what training added.
        rows += [["", f"{INIT_LABELS[init]}, untrained", *[_value(r, "before_") for r in columns(init)]]
                 for init in INIT_ORDER if any(r is not None for r in columns(init))]
    return ["", "## Unsupervised (Table 4 layout)", "",
            "Trained without labels on each dataset's train split. `untrained`: the same initialisation "
            "evaluated before any training.", "",
            *_table(["Dataset", "Init", *[m.upper() for m in methods]], rows)]


def _pair_name(cells: Cells, dataset: str) -> str:
    """`market1501→msmt17`, from the cells' `source`/`target` where given."""
    for (name, _, setting, _), row in cells.items():
        if name == dataset and setting == DOMAIN_ADAPTATION and isinstance(row.get("source"), str) \
                and isinstance(row.get("target"), str):
            return f"{row['source']}→{row['target']}"
    return dataset.replace("->", "→")


def _adaptation_section(cells: Cells, datasets: Sequence[str], methods: Sequence[str]) -> list[str]:
    """Table 5: a column per source→target pair, a block of rows per method."""
    methods = _with_setting(cells, methods, 1, DOMAIN_ADAPTATION)
    if not methods:
        return []
    pairs = _with_setting(cells, datasets, 0, DOMAIN_ADAPTATION)
    rows = []
    for method in methods:
        def columns(init: str, method: str = method) -> list[Any]:
            return [cells.get((pair, method, DOMAIN_ADAPTATION, init)) for pair in pairs]

        rows += _layout_rows(method.upper(), "", columns)
        for prefix, label in (("direct_", "direct transfer"), ("source_", "on the source")):
            rows += [["", f"{INIT_LABELS[init]}, {label}", *[_value(r, prefix) for r in columns(init)]]
                     for init in INIT_ORDER if any(r is not None for r in columns(init))]
    return ["", "## Domain adaptation (Table 5 layout)", "",
            "mAP/Rank-1 on the target after adapting to it without its labels. `direct transfer`: the "
            "source-trained model on the target before adaptation; `on the source`: the same model on the "
            "source's own test split (the domain drop is the difference).", "",
            *_table(["Method", "Init", *[_pair_name(cells, p) for p in pairs]], rows)]


def _averages(per_init: Mapping[str, list[Any]]) -> dict[str, dict[str, Any] | None]:
    """DG's `Average` column: per init the mean mAP/Rank-1 over the targets (n/a unless every
    target has numbers), and ours' deltas over the baselines' averages."""
    averages: dict[str, dict[str, Any] | None] = {}
    for init, rows in per_init.items():
        present = [r for r in rows if r is not None]
        statuses = {str(r["status"]) for r in present}
        if not present:
            averages[init] = None
        elif len(statuses) == 1 and statuses <= {STATUS_UNAVAILABLE, STATUS_ERROR, STATUS_MISSING}:
            averages[init] = {"init": init, "status": statuses.pop()}
        else:
            complete = len(present) == len(rows) and not statuses & {STATUS_UNAVAILABLE, STATUS_ERROR, STATUS_MISSING}
            averages[init] = {"init": init, "status": STATUS_DONE, **{
                metric: sum(r[metric] for r in rows) / len(rows) if complete else math.nan
                for metric in ("mAP", "rank1")}}
    ours = averages.get(INIT_OURS)
    if ours is not None:
        for baseline in BASELINES:
            base = averages.get(baseline) or {}
            for metric in ("mAP", "rank1"):
                ours[f"delta_{metric}_vs_{baseline}"] = ours.get(metric, math.nan) - base.get(metric, math.nan)
    return averages


def _generalization_section(cells: Cells, datasets: Sequence[str], methods: Sequence[str]) -> list[str]:
    """Table 6: a column per unseen target and their average, a block of rows per method."""
    methods = _with_setting(cells, methods, 1, DOMAIN_GENERALIZATION)
    if not methods:
        return []
    targets = _with_setting(cells, datasets, 0, DOMAIN_GENERALIZATION)
    rows, protocols = [], {}
    for method in methods:
        per_init = {init: [cells.get((t, method, DOMAIN_GENERALIZATION, init)) for t in targets] for init in INIT_ORDER}
        average = _averages(per_init)
        rows += _layout_rows(method.upper(), "", lambda init: [*per_init[init], average[init]], _value_with_std)
        given = [r for rs in per_init.values() for r in rs if r is not None]
        splits = sorted({int(r["splits"]) for r in given if not math.isnan(r.get("splits", math.nan))})
        sources = sorted({r["sources"] for r in given if isinstance(r.get("sources"), str) and r["sources"]})
        protocols[method] = (f"mean of {' or '.join(map(str, splits)) or 'the'} random query/gallery splits, "
                             f"trained on {' or '.join(sources) or 'the sources'}")
    notes = ([f"- {next(iter(protocols.values()))}"] if len(set(protocols.values())) == 1
             else [f"- {m.upper()}: {text}" for m, text in protocols.items()])
    return ["", "## Domain generalization (Table 6 layout)", "",
            "Each target unseen in training. Entries are mAP/Rank-1 as mean±std over the target's random "
            "query/gallery splits (the std averaged over seeds); `Average`: the mean over the targets "
            "(n/a unless every target has a result).", "", *notes, "",
            *_table(["Method", "Init", *targets, "Average"], rows)]


def results_markdown(
    frame: pd.DataFrame,
    methods: Sequence[str] = (),
    settings: Sequence[str] = (),
    meta: Mapping[str, Any] | None = None,
) -> str:
    """`results.md`: the per-cell table, then the paper's layouts of the settings the frame has:
    Table 2 (supervised), 3 (Fs/Ss), 4 (unsupervised), 5 (DA), 6 (DG). `methods`/`settings` give
    the row order (the config's)."""
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
    rows = [[dataset, method.upper(), setting_label(setting), INIT_LABELS[init], _value(row), str(row["seeds"]),
             _delta(row, "imagenet"), _delta(row, "random")]
            for dataset in datasets for method in method_order for setting in setting_order for init in INIT_ORDER
            if (row := cell.get((dataset, method, setting, init))) is not None]
    lines += _table(["Dataset", "Method", "Setting", "Init", "mAP/Rank-1", "Seeds", "Δ vs ImageNet",
                     "Δ vs random"], rows)

    supervised = [m for m in method_order if any(k[1] == m and k[2] == "supervised" for k in cell)]
    if supervised:
        lines += ["", "## Supervised (Table 2 layout)", ""]
        rows = []
        for dataset in _with_setting(cell, datasets, 0, "supervised"):
            rows += _layout_rows(dataset, "", lambda init: [cell.get((dataset, m, "supervised", init))
                                                            for m in supervised])
        lines += _table(["Dataset", "Init", *[m.upper() for m in supervised]], rows)

    fractions = [s for s in setting_order if setting_kind(s) in ("fs", "ss")]
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

    for section in (_unsupervised_section, _adaptation_section, _generalization_section):
        lines += section(cell, datasets, method_order)

    notes = summary[summary["reason"].astype(bool)]
    if not notes.empty:
        texts = [f"- {r['init']} / {r['status']}: {r['reason']}" if r["status"] == STATUS_UNAVAILABLE else
                 f"- {r['dataset']}/{r['method']}/{r['init']}/{r['setting']} {r['status']}: {r['reason']}"
                 for _, r in notes.iterrows()]
        lines += ["", "## Notes", "", *dict.fromkeys(texts)]
    return "\n".join(lines) + "\n"
