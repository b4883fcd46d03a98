"""Training curves of a pre-training run: `curves.csv` (one row per epoch) and `curves.png`
(loss, train accuracy and learning rate against the epoch)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

# A bare Figure renders with the Agg canvas and never touches pyplot's global backend or
# needs a display (workers, CI, clusters).
from matplotlib.figure import Figure

CURVES_CSV = "curves.csv"
CURVES_PNG = "curves.png"
CURVE_COLUMNS = ("epoch", "lr", "loss", "train_accuracy", "steps", "images", "epoch_seconds", "images_per_second")


def write_curves(history: Sequence[dict[str, float]], out_dir: str | Path) -> tuple[Path, Path]:
    """Write `out_dir/curves.csv` and `out_dir/curves.png` from the per-epoch history."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out_dir / CURVES_CSV, out_dir / CURVES_PNG
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(CURVE_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for row in history:
            writer.writerow({key: row.get(key, "") for key in CURVE_COLUMNS})

    epochs = [row["epoch"] for row in history]
    figure = Figure(figsize=(13, 3.6))
    axes = figure.subplots(1, 3)
    for axis, key, title in zip(axes, ("loss", "train_accuracy", "lr"),
                                ("training loss", "train accuracy (un-mixed labels)", "learning rate")):
        axis.plot(epochs, [row[key] for row in history], marker="o" if len(epochs) <= 30 else None)
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
    axes[2].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    figure.tight_layout()
    figure.savefig(png_path, dpi=110)
    return csv_path, png_path
