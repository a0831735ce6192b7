"""Certified accuracy from results files, as the papers report it, and the accuracy-vs-radius plot.

Certified accuracy at radius r = fraction of images whose prediction is correct and whose certified
radius is at least r. Across several files (one per sigma), each radius takes the best file, as in
Cohen et al. and DensePure's tables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import DataError
from .results import read_results

__all__ = ["DEFAULT_RADII", "certified_accuracy", "report_table", "format_table", "plot_curves"]

DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)


def certified_accuracy(rows: Sequence[dict], radii: Sequence[float]) -> np.ndarray:
    """[len(radii)] fraction of rows with correct == 1 and radius >= r."""
    if not rows:
        return np.zeros(len(radii))
    correct = np.array([r["correct"] for r in rows], dtype=bool)
    radius = np.array([r["radius"] for r in rows], dtype=float)
    return np.array([np.mean(correct & (radius >= r)) for r in radii])


def report_table(files: Sequence[str | Path], radii: Sequence[float] = DEFAULT_RADII) -> dict:
    """Per-file certified accuracies, the best per radius, and which file gave it."""
    if not files:
        raise DataError("report needs at least one results file")
    per_file = {}
    sizes = {}
    for f in files:
        rows = read_results(f)
        per_file[str(f)] = certified_accuracy(rows, radii)
        sizes[str(f)] = len(rows)
    names = list(per_file)
    stacked = np.stack([per_file[n] for n in names])
    best_idx = stacked.argmax(axis=0)
    return {
        "radii": list(radii),
        "files": {n: per_file[n].tolist() for n in names},
        "images": sizes,
        "best": stacked.max(axis=0).tolist(),
        "best_file": [names[i] for i in best_idx],
    }


def format_table(table: dict) -> str:
    """A plain-text table: one row per file plus the best-per-radius row."""
    radii = table["radii"]
    width = max([len(Path(n).name) for n in table["files"]] + [len("best (per radius)")])
    head = "radius".ljust(width) + "".join(f"{r:>8.2f}" for r in radii) + "   images"
    lines = [head, "-" * len(head)]
    for name, acc in table["files"].items():
        lines.append(Path(name).name.ljust(width) + "".join(f"{100 * a:>7.1f}%" for a in acc) + f"{table['images'][name]:>9d}")
    if len(table["files"]) > 1:
        lines.append("best (per radius)".ljust(width) + "".join(f"{100 * a:>7.1f}%" for a in table["best"]))
    return "\n".join(lines)


def plot_curves(files: Sequence[str | Path], out: str | Path, title: str = "DensePure certified accuracy") -> Path:
    """Certified accuracy vs radius, one curve per file (and the best envelope), saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    all_rows = {str(f): read_results(f) for f in files}
    max_r = max([r["radius"] for rows in all_rows.values() for r in rows] + [1.0])
    grid = np.linspace(0.0, max_r * 1.05, 300)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    curves = []
    for name, rows in all_rows.items():
        acc = certified_accuracy(rows, grid)
        curves.append(acc)
        ax.plot(grid, acc, label=Path(name).stem)
    if len(curves) > 1:
        ax.plot(grid, np.max(curves, axis=0), "k--", linewidth=1, label="best per radius")
    ax.set_xlabel("L2 radius")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
