"""Mean, spread and the paired difference to the baseline arm, per arm and downstream setting.

Seeds pair the arms: seed s of every arm fine-tunes on the same subset with the same seed, so
the difference arm - baseline is taken per seed and its 95 % interval is Student's t over those
differences (a paired t interval). With one seed there is no interval (reported as such).
"""

from __future__ import annotations

import math

import pandas as pd

# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom (scipy is not a dependency
# of this project for one table); above 30 the normal 1.96 is within 2 %.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)
METRICS = ("mAP", "rank1")
CELL = ["dataset", "method", "setting"]


def t_quantile_975(degrees_of_freedom: int) -> float:
    if degrees_of_freedom < 1:
        return math.nan
    return _T975[degrees_of_freedom - 1] if degrees_of_freedom <= len(_T975) else 1.96


def paired_interval(differences: list[float]) -> tuple[float, float, float]:
    """(mean, low, high) of the 95 % paired t interval; low/high NaN for fewer than two pairs."""
    n = len(differences)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = sum(differences) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def _paired(ok: pd.DataFrame, reference: pd.DataFrame, metric: str) -> list[float]:
    return [float(v - reference.at[s, metric]) for s, v in zip(ok["seed"], ok[metric]) if s in reference.index]


def summarize(frame: pd.DataFrame, baseline: str, method_arm: str = "generated") -> pd.DataFrame:
    """One row per arm x cell (dataset, method, setting): seeds done, mean and std of each metric,
    and the paired difference to `baseline` with its interval; ablation rows also get the paired
    difference to `method_arm` (the method they ablate, at the same seeds: `dm_<metric>`).
    `frame` holds one row per arm x seed x cell with `status` 'done' where the metrics are valid."""
    done = frame[frame["status"] == "done"]
    rows = []
    for (arm, *cell), group in frame.groupby(["arm", *CELL], sort=False):
        ok = done[(done["arm"] == arm) & (done[CELL] == cell).all(axis=1)]
        row = {"arm": arm, "group": group["group"].iloc[0], **dict(zip(CELL, cell)), "seeds": len(ok),
               "errors": int((group["status"] != "done").sum()),
               "pretrain_images": group["pretrain_images"].iloc[0], "pretrain_ids": group["pretrain_ids"].iloc[0]}
        base = done[(done["arm"] == baseline) & (done[CELL] == cell).all(axis=1)].set_index("seed")
        method = done[(done["arm"] == method_arm) & (done[CELL] == cell).all(axis=1)].set_index("seed")
        for metric in METRICS:
            row[f"{metric}_mean"] = ok[metric].mean() if len(ok) else math.nan
            row[f"{metric}_std"] = ok[metric].std(ddof=1) if len(ok) > 1 else math.nan
            paired = _paired(ok, base, metric)
            mean, low, high = paired_interval(paired) if arm != baseline else (math.nan,) * 3
            row.update({f"d_{metric}": mean, f"d_{metric}_low": low, f"d_{metric}_high": high,
                        "pairs": len(paired) if arm != baseline else 0})
            ablation = row["group"] == "ablation"
            mean, low, high = paired_interval(_paired(ok, method, metric)) if ablation else (math.nan,) * 3
            row.update({f"dm_{metric}": mean, f"dm_{metric}_low": low, f"dm_{metric}_high": high})
        rows.append(row)
    return pd.DataFrame(rows)
