"""Tables of the protocol settings (unsupervised: Table 4, DA: Table 5, DG: Table 6) beside the
supervised (Table 2) and Fs/Ss (Table 3) ones, from hand-written rows in the schema that
`eval.downstream.runner.collect_rows` gives: two seeds, `ours` and `imagenet` done, `random`
unavailable, one errored cell. Pure pandas/matplotlib: no Ray, no model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from eval.downstream.plots import plot_protocol_bars
from eval.downstream.tables import (
    CSV_COLUMNS,
    results_frame,
    results_markdown,
    setting_label,
    setting_kind,
    summarise,
    write_results_csv,
)

METHODS = ["bot", "agw", "cluster_contrast", "spcl", "metabin"]
SETTINGS = ["supervised", "fs10", "ss50", "unsupervised", "da", "dg"]
SEEDS = (0, 1)


# ------------------------------------------------------------------------------------------
# rows (metrics in %)


def cell(dataset: str, method: str, init: str, setting: str, seed: int, status: str = "done",
         **values: Any) -> dict[str, Any]:
    """One row as collect_rows gives it: the cell's parameters, then its result columns."""
    kind = setting[:2] if setting[:2] in ("fs", "ss") else setting
    percent = int(setting[2:]) if kind in ("fs", "ss") else 100
    return {"dataset": dataset, "method": method, "init": init, "setting": setting, "kind": kind,
            "percent": percent, "seed": seed, "status": status, **values}


def unavailable(dataset: str, method: str, setting: str, **values: Any) -> list[dict[str, Any]]:
    """`random` could not be had: one row per seed, as collect_rows writes them."""
    return [cell(dataset, method, "random", setting, seed, "unavailable", reason="random weights withheld",
                 **values) for seed in SEEDS]


def supervised_rows() -> list[dict[str, Any]]:
    """Market-1501, BoT: IN 81/91, Ours 85/94 (means of seeds 0 and 1); AGW one point higher."""
    rows = []
    for method, bump in (("bot", 0.0), ("agw", 1.0)):
        for seed in SEEDS:
            for init, m, r1, r5, r10, minp in (("imagenet", 80, 90, 97.0, 98.0, 50.0),
                                                ("ours", 84, 93, 98.0, 99.0, 55.0)):
                rows.append(cell("market1501", method, init, "supervised", seed, mAP=m + 2 * seed + bump,
                                 rank1=r1 + 2 * seed + bump, rank5=r5, rank10=r10, mINP=minp, train_images=12936,
                                 train_ids=751, image_fraction=1.0, id_fraction=1.0, epochs=120))
        rows += unavailable("market1501", method, "supervised")
    return rows


def fraction_rows() -> list[dict[str, Any]]:
    """AGW on Market-1501 at Fs 10% and Ss 50%."""
    rows = []
    for setting, base in (("fs10", 30.0), ("ss50", 60.0)):
        for seed in SEEDS:
            kept = {"image_fraction": 0.12, "id_fraction": 1.0} if setting == "fs10" else \
                {"image_fraction": 1.0, "id_fraction": 0.5}
            rows.append(cell("market1501", "agw", "imagenet", setting, seed, mAP=base + seed,
                             rank1=base + 20 + seed, **kept))
            rows.append(cell("market1501", "agw", "ours", setting, seed, mAP=base + 10 + seed,
                             rank1=base + 25 + seed, **kept))
        rows += unavailable("market1501", "agw", setting)
    return rows


def unsupervised_rows() -> list[dict[str, Any]]:
    """Market-1501, cluster_contrast: IN 71/86 (untrained 2.2/10.5), Ours 76/89 (untrained 5.2/20.5);
    MSMT17 is 30 lower, SpCL 5 lower; IN's second SpCL seed on MSMT17 errs."""
    rows = []
    for dataset, shift in (("market1501", 0.0), ("msmt17", -30.0)):
        for method, bump in (("cluster_contrast", 0.0), ("spcl", -5.0)):
            for seed in SEEDS:
                for init, m, r1, bm, br1 in (("imagenet", 70, 85, 2.0, 10.0), ("ours", 75, 88, 5.0, 20.0)):
                    if (dataset, method, init, seed) == ("msmt17", "spcl", "imagenet", 1):
                        rows.append(cell(dataset, method, init, "unsupervised", seed, "error",
                                         reason="CUDA out of memory"))
                        continue
                    rows.append(cell(dataset, method, init, "unsupervised", seed, mAP=m + 2 * seed + shift + bump,
                                     rank1=r1 + 2 * seed + shift + bump, before_mAP=bm + 0.4 * seed,
                                     before_rank1=br1 + seed, clusters=500 + 10 * seed, outliers=30 + 4 * seed))
            rows += unavailable(dataset, method, "unsupervised")
    return rows


def da_rows() -> list[dict[str, Any]]:
    """market1501->msmt17: IN 31/61 (direct 11/31, on the source 51/81), Ours 36/65 (direct 15/41, on the
    source 56/85); the reverse pair is 30 higher, except on the source."""
    rows = []
    for source, target, shift in (("market1501", "msmt17", 0.0), ("msmt17", "market1501", 30.0)):
        pair = f"{source}->{target}"
        for seed in SEEDS:
            for init, m, r1, dm, dr1 in (("imagenet", 30, 60, 10, 30), ("ours", 35, 64, 14, 40)):
                rows.append(cell(pair, "cluster_contrast", init, "da", seed, mAP=m + 2 * seed + shift,
                                 rank1=r1 + 2 * seed + shift, direct_mAP=dm + 2 * seed + shift,
                                 direct_rank1=dr1 + 2 * seed + shift, source_mAP=m + 20 + 2 * seed,
                                 source_rank1=r1 + 20 + 2 * seed, source=source, target=target))
        rows += unavailable(pair, "cluster_contrast", "da", source=source, target=target)
    return rows


DG_TARGETS = {"prid": 0.0, "grid": -20.0, "viper": 10.0, "ilids": 30.0}
DG_SOURCES = "market1501+cuhk02+cuhk03+cuhksysu"


def dg_rows() -> list[dict[str, Any]]:
    """metabin on prid: IN 41.2±1.3/52.0±2.1, Ours 45.2±0.8/57.0±1.6; other targets shifted."""
    rows = []
    for target, shift in DG_TARGETS.items():
        for seed in SEEDS:
            for init, m, r1, ms, r1s in (("imagenet", 41.0, 51.8, 1.2, 2.0), ("ours", 45.0, 56.8, 0.7, 1.5)):
                rows.append(cell(target, "metabin", init, "dg", seed, mAP=m + 0.4 * seed + shift,
                                 rank1=r1 + 0.4 * seed + shift, mAP_std=ms + 0.2 * seed, rank1_std=r1s + 0.2 * seed,
                                 splits=10, sources=DG_SOURCES))
        rows += unavailable(target, "metabin", "dg", sources=DG_SOURCES)
    return rows


# ------------------------------------------------------------------------------------------
# The output of eval/downstream/tables.py before the protocol settings (commit 8b506a2) on the
# frames of `supervised_rows()` and `supervised_rows() + fraction_rows()`, methods [bot, agw],
# meta {"seeds": "0, 1"}: those frames must still give exactly this.

OLD_CSV_COLUMNS = (
    "dataset",
    "method",
    "init",
    "setting",
    "kind",
    "percent",
    "seed",
    "status",
    "mAP",
    "rank1",
    "rank5",
    "rank10",
    "mINP",
    "delta_mAP_vs_imagenet",
    "delta_rank1_vs_imagenet",
    "delta_mAP_vs_random",
    "delta_rank1_vs_random",
    "train_images",
    "train_ids",
    "image_fraction",
    "id_fraction",
    "epochs",
    "train_seconds",
    "total_seconds",
    "reason",
)

# The pinned output in its parts: the supervised frame's, then what the fractions add to it.
PINNED_HEAD = [
    "# Downstream Re-ID evaluation",
    "",
    "- seeds: 0, 1",
    "",
    "Entries are mAP/Rank-1 in % (Market-1501 protocol), averaged over seeds; deltas are ours minus the baseline in points, as in the paper's Tables 2 and 3. `unavailable`: those weights could not be had (see the notes); the cell was not run.",
    "",
    "## All cells",
    "",
    "| Dataset | Method | Setting | Init | mAP/Rank-1 | Seeds | Δ vs ImageNet | Δ vs random |",
    "|---|---|---|---|---|---|---|---|",
]
PINNED_SUPERVISED_CELLS = [
    "| market1501 | BOT | supervised | IN | 81.0/91.0 | 2 |  |  |",
    "| market1501 | BOT | supervised | Ours | 85.0/94.0 | 2 | +4.0/+3.0 | n/a |",
    "| market1501 | BOT | supervised | Random | unavailable | 0 |  |  |",
    "| market1501 | AGW | supervised | IN | 82.0/92.0 | 2 |  |  |",
    "| market1501 | AGW | supervised | Ours | 86.0/95.0 | 2 | +4.0/+3.0 | n/a |",
    "| market1501 | AGW | supervised | Random | unavailable | 0 |  |  |",
]
PINNED_FRACTION_CELLS = [
    "| market1501 | AGW | Fs 10% | IN | 30.5/50.5 | 2 |  |  |",
    "| market1501 | AGW | Fs 10% | Ours | 40.5/55.5 | 2 | +10.0/+5.0 | n/a |",
    "| market1501 | AGW | Fs 10% | Random | unavailable | 0 |  |  |",
    "| market1501 | AGW | Ss 50% | IN | 60.5/80.5 | 2 |  |  |",
    "| market1501 | AGW | Ss 50% | Ours | 70.5/85.5 | 2 | +10.0/+5.0 | n/a |",
    "| market1501 | AGW | Ss 50% | Random | unavailable | 0 |  |  |",
]
PINNED_TABLE_2 = [
    "",
    "## Supervised (Table 2 layout)",
    "",
    "| Dataset | Init | BOT | AGW |",
    "|---|---|---|---|",
    "| market1501 | IN | 81.0/91.0 | 82.0/92.0 |",
    "| market1501 | Ours | 85.0/94.0 | 86.0/95.0 |",
    "|  | Δ vs IN | +4.0/+3.0 | +4.0/+3.0 |",
    "| market1501 | Random | unavailable | unavailable |",
    "|  | Δ vs random | n/a | n/a |",
]
PINNED_TABLE_3 = [
    "",
    "## Fs / Ss on market1501 with AGW (Table 3 layout)",
    "",
    "| Setting | Init | 10% | 50% |",
    "|---|---|---|---|",
    "| Fs | IN | 30.5/50.5 | - |",
    "| Fs | Ours | 40.5/55.5 | - |",
    "| Fs | Δ vs IN | +10.0/+5.0 | - |",
    "| Fs | Random | unavailable | - |",
    "| Fs | Δ vs random | n/a | - |",
    "| Fs | data kept | 12% imgs, 100% ids | - |",
    "| Ss | IN | - | 60.5/80.5 |",
    "| Ss | Ours | - | 70.5/85.5 |",
    "| Ss | Δ vs IN | - | +10.0/+5.0 |",
    "| Ss | Random | - | unavailable |",
    "| Ss | Δ vs random | - | n/a |",
    "| Ss | data kept | - | 100% imgs, 50% ids |",
]
PINNED_NOTES = [
    "",
    "## Notes",
    "",
    "- random / unavailable: random weights withheld",
]
PINNED_SUPERVISED = "\n".join(PINNED_HEAD + PINNED_SUPERVISED_CELLS + PINNED_TABLE_2 + PINNED_NOTES) + "\n"
PINNED_SUPERVISED_AND_FRACTIONS = "\n".join(
    PINNED_HEAD + PINNED_SUPERVISED_CELLS + PINNED_FRACTION_CELLS + PINNED_TABLE_2 + PINNED_TABLE_3 + PINNED_NOTES
) + "\n"


# ------------------------------------------------------------------------------------------
# helpers


def all_rows() -> list[dict[str, Any]]:
    return supervised_rows() + fraction_rows() + unsupervised_rows() + da_rows() + dg_rows()


def markdown_of(rows: list[dict[str, Any]]) -> str:
    return results_markdown(results_frame(rows), METHODS, SETTINGS, {"seeds": "0, 1"})


def section(markdown: str, heading: str) -> list[str]:
    """The lines of the `## heading` section (up to the next `## `), which must be there once."""
    parts = markdown.split("\n## ")
    found = [p for p in parts if p.startswith(heading + "\n")]
    assert len(found) == 1, f"{heading!r} appears {len(found)} times"
    return found[0].splitlines()


def table_rows(lines: list[str]) -> list[list[str]]:
    """The cells of a section's table rows (header and separator dropped)."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines if line.startswith("|")]
    return rows[2:]


# ------------------------------------------------------------------------------------------
# tests


def test_setting_labels_without_parsing_the_protocol_settings() -> None:
    assert [setting_label(s) for s in ("supervised", "fs10", "ss50", "unsupervised", "da", "dg")] == [
        "supervised", "Fs 10%", "Ss 50%", "unsupervised", "DA", "DG"]
    assert [setting_kind(s) for s in ("fs10", "unsupervised", "da", "dg")] == ["fs", "unsupervised", "da", "dg"]


def test_csv_columns_keep_the_old_order_and_add_the_protocol_columns(tmp_path: Path) -> None:
    assert [c for c in CSV_COLUMNS if c in OLD_CSV_COLUMNS] == list(OLD_CSV_COLUMNS)
    added = [c for c in CSV_COLUMNS if c not in OLD_CSV_COLUMNS]
    assert set(added) == {"before_mAP", "before_rank1", "clusters", "outliers", "source", "target", "direct_mAP",
                          "direct_rank1", "source_mAP", "source_rank1", "sources", "mAP_std", "rank1_std", "splits"}
    assert CSV_COLUMNS.index(added[0]) == CSV_COLUMNS.index("delta_rank1_vs_random") + 1
    frame = results_frame(all_rows())
    assert list(frame.columns) == list(CSV_COLUMNS) and len(frame) == len(all_rows())
    for column in ("clusters", "outliers", "splits"):
        assert str(frame[column].dtype) == "Int64"
    written = pd.read_csv(write_results_csv(frame, tmp_path / "results.csv"))
    unsupervised = written[(written["kind"] == "unsupervised") & (written["status"] == "done")]
    assert sorted(set(unsupervised["clusters"])) == [500, 510] and sorted(set(unsupervised["outliers"])) == [30, 34]
    dg = written[(written["kind"] == "dg") & (written["status"] == "done")]
    assert (dg["splits"] == 10).all() and (dg["sources"] == DG_SOURCES).all()
    assert set(written.loc[written["kind"] == "da", "source"]) == {"market1501", "msmt17"}
    # a supervised-only frame has the new columns too, empty
    supervised = results_frame(supervised_rows())
    assert supervised["before_mAP"].isna().all() and supervised["splits"].isna().all()


def test_supervised_and_fraction_tables_are_as_before() -> None:
    for rows, settings, pinned in ((supervised_rows(), ["supervised"], PINNED_SUPERVISED),
                                   (supervised_rows() + fraction_rows(), ["supervised", "fs10", "ss50"],
                                    PINNED_SUPERVISED_AND_FRACTIONS)):
        markdown = results_markdown(results_frame(rows), ["bot", "agw"], settings, {"seeds": "0, 1"})
        assert markdown == pinned
    # ...and alongside the protocol settings, Tables 2 and 3 keep their rows (no DA/DG dataset in Table 2)
    everything, before = markdown_of(all_rows()), PINNED_SUPERVISED_AND_FRACTIONS
    for heading in ("Supervised (Table 2 layout)", "Fs / Ss on market1501 with AGW (Table 3 layout)"):
        assert section(everything, heading) == section(before, heading)


def test_protocol_sections_only_with_their_rows() -> None:
    headings = {"unsupervised": "## Unsupervised (Table 4 layout)", "da": "## Domain adaptation (Table 5 layout)",
                "dg": "## Domain generalization (Table 6 layout)"}
    by_setting = {"unsupervised": unsupervised_rows(), "da": da_rows(), "dg": dg_rows()}
    for setting, rows in by_setting.items():
        markdown = markdown_of(rows)
        assert [h for h in headings.values() if h in markdown] == [headings[setting]]
        assert "Table 2 layout" not in markdown and "Table 3 layout" not in markdown
    assert all(h not in markdown_of(supervised_rows() + fraction_rows()) for h in headings.values())
    assert all(h in markdown_of(all_rows()) for h in headings.values())


def test_all_cells_lists_every_cell_of_every_setting() -> None:
    rows = all_rows()
    cells = table_rows(section(markdown_of(rows), "All cells"))
    assert len(cells) == len({(r["dataset"], r["method"], r["init"], r["setting"]) for r in rows})
    assert ["msmt17", "SPCL", "unsupervised", "IN", "error", "1", "", ""] in cells  # one seed of two done
    assert ["market1501->msmt17", "CLUSTER_CONTRAST", "DA", "Ours", "36.0/65.0", "2", "+5.0/+4.0", "n/a"] in cells
    assert ["prid", "METABIN", "DG", "Random", "unavailable", "0", "", ""] in cells


def test_deltas_per_seed_on_protocol_rows() -> None:
    frame = results_frame(all_rows()).set_index(["kind", "dataset", "method", "init", "seed"])
    ours = frame.xs("ours", level="init")
    assert ours.loc[("unsupervised", "market1501", "cluster_contrast", 1), "delta_mAP_vs_imagenet"] == 5.0
    assert ours.loc[("da", "msmt17->market1501", "cluster_contrast", 0), "delta_rank1_vs_imagenet"] == 4.0
    assert ours.loc[("dg", "viper", "metabin", 1), "delta_rank1_vs_imagenet"] == pytest.approx(5.0)
    assert math.isnan(ours.loc[("unsupervised", "msmt17", "spcl", 1), "delta_mAP_vs_imagenet"])  # IN's seed errs
    assert ours["delta_mAP_vs_random"].isna().all()  # random unavailable
    assert frame.xs("imagenet", level="init")["delta_mAP_vs_imagenet"].isna().all()


def test_summary_carries_the_protocol_columns() -> None:
    summary = summarise(results_frame(all_rows())).set_index(["setting", "dataset", "method", "init"])
    untrained = summary.loc[("unsupervised", "market1501", "cluster_contrast", "imagenet")]
    assert (untrained["before_mAP"], untrained["before_rank1"]) == pytest.approx((2.2, 10.5))
    assert (untrained["clusters"], untrained["outliers"]) == pytest.approx((505.0, 32.0))
    adapted = summary.loc[("da", "market1501->msmt17", "cluster_contrast", "ours")]
    assert (adapted["direct_mAP"], adapted["direct_rank1"]) == pytest.approx((15.0, 41.0))
    assert (adapted["source"], adapted["target"]) == ("market1501", "msmt17")
    generalized = summary.loc[("dg", "prid", "metabin", "imagenet")]
    assert (generalized["mAP"], generalized["mAP_std"], generalized["rank1"], generalized["rank1_std"]) == \
        pytest.approx((41.2, 1.3, 52.0, 2.1))
    assert generalized["splits"] == 10 and generalized["sources"] == DG_SOURCES
    assert summary.loc[("dg", "prid", "metabin", "random"), "sources"] == DG_SOURCES  # given on unavailable rows too
    assert math.isnan(summary.loc[("dg", "prid", "metabin", "random"), "mAP_std"])


def test_unsupervised_table_4_layout() -> None:
    lines = section(markdown_of(all_rows()), "Unsupervised (Table 4 layout)")
    assert "| Dataset | Init | CLUSTER_CONTRAST | SPCL |" in lines
    assert table_rows(lines) == [
        ["market1501", "IN", "71.0/86.0", "66.0/81.0"],
        ["market1501", "Ours", "76.0/89.0", "71.0/84.0"],
        ["", "Δ vs IN", "+5.0/+3.0", "+5.0/+3.0"],
        ["market1501", "Random", "unavailable", "unavailable"],
        ["", "Δ vs random", "n/a", "n/a"],
        ["", "IN, untrained", "2.2/10.5", "2.2/10.5"],
        ["", "Ours, untrained", "5.2/20.5", "5.2/20.5"],
        ["", "Random, untrained", "unavailable", "unavailable"],
        # MSMT17: SpCL's IN cell errs on one seed (its done seed gives 40/55 against Ours' 46/59 - 5)
        ["msmt17", "IN", "41.0/56.0", "error"],
        ["msmt17", "Ours", "46.0/59.0", "41.0/54.0"],
        ["", "Δ vs IN", "+5.0/+3.0", "+6.0/+4.0"],
        ["msmt17", "Random", "unavailable", "unavailable"],
        ["", "Δ vs random", "n/a", "n/a"],
        ["", "IN, untrained", "2.2/10.5", "error"],
        ["", "Ours, untrained", "5.2/20.5", "5.2/20.5"],
        ["", "Random, untrained", "unavailable", "unavailable"],
    ]


def test_domain_adaptation_table_5_layout() -> None:
    lines = section(markdown_of(all_rows()), "Domain adaptation (Table 5 layout)")
    assert "| Method | Init | market1501→msmt17 | msmt17→market1501 |" in lines
    assert table_rows(lines) == [
        ["CLUSTER_CONTRAST", "IN", "31.0/61.0", "61.0/91.0"],
        ["CLUSTER_CONTRAST", "Ours", "36.0/65.0", "66.0/95.0"],
        ["", "Δ vs IN", "+5.0/+4.0", "+5.0/+4.0"],
        ["CLUSTER_CONTRAST", "Random", "unavailable", "unavailable"],
        ["", "Δ vs random", "n/a", "n/a"],
        ["", "IN, direct transfer", "11.0/31.0", "41.0/61.0"],
        ["", "Ours, direct transfer", "15.0/41.0", "45.0/71.0"],
        ["", "Random, direct transfer", "unavailable", "unavailable"],
        ["", "IN, on the source", "51.0/81.0", "51.0/81.0"],
        ["", "Ours, on the source", "56.0/85.0", "56.0/85.0"],
        ["", "Random, on the source", "unavailable", "unavailable"],
    ]


def test_domain_generalization_table_6_layout() -> None:
    lines = section(markdown_of(all_rows()), "Domain generalization (Table 6 layout)")
    assert f"- mean of 10 random query/gallery splits, trained on {DG_SOURCES}" in lines
    assert "| Method | Init | prid | grid | viper | ilids | Average |" in lines
    shift = sum(DG_TARGETS.values()) / len(DG_TARGETS)  # the targets' mean offset: the Average's
    rows = table_rows(lines)
    assert rows[0] == ["METABIN", "IN", *[f"{41.2 + s:.1f}±1.3/{52.0 + s:.1f}±2.1" for s in DG_TARGETS.values()],
                       f"{41.2 + shift:.1f}/{52.0 + shift:.1f}"]
    assert rows[1] == ["METABIN", "Ours", *[f"{45.2 + s:.1f}±0.8/{57.0 + s:.1f}±1.6" for s in DG_TARGETS.values()],
                       f"{45.2 + shift:.1f}/{57.0 + shift:.1f}"]
    assert rows[0][2] == "41.2±1.3/52.0±2.1"
    assert rows[2] == ["", "Δ vs IN", *["+4.0/+5.0"] * 5]
    assert rows[3] == ["METABIN", "Random", *["unavailable"] * 5] and rows[4] == ["", "Δ vs random", *["n/a"] * 5]


def test_dg_average_needs_every_target() -> None:
    rows = [r for r in dg_rows() if not (r["dataset"] == "grid" and r["init"] == "ours")]
    table = table_rows(section(markdown_of(rows), "Domain generalization (Table 6 layout)"))
    assert table[1][1:] == ["Ours", "45.2±0.8/57.0±1.6", "-", "55.2±0.8/67.0±1.6", "75.2±0.8/87.0±1.6", "n/a"]
    assert table[2][-1] == "n/a" and table[0][-1] == "46.2/57.0"


def test_bar_plots_per_protocol_setting(tmp_path: Path) -> None:
    paths = plot_protocol_bars(results_frame(all_rows()), tmp_path)
    assert [p.name for p in paths] == ["bars_unsupervised.png", "bars_da.png", "bars_dg.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    assert plot_protocol_bars(results_frame(supervised_rows()), tmp_path / "none") == []
