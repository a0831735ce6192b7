"""Certified accuracy from results files, as the papers report it, and the accuracy-vs-radius plot.

Certified accuracy at radius r = fraction of labelled images whose prediction is correct and whose
certified radius is at least r. Whether a prediction is correct is recomputed from the ``label`` and
``predict`` columns; the file's own ``correct`` column is only compared with it
(:func:`correct_mismatches`), so an edited column cannot change a reported number. Images without
a label (-1) are counted, but never as correct and never in the accuracy's denominator (an abstention, -1, is not a match for an unknown label). Across
several files (one per sigma), each radius takes the best file, as in Cohen et al. and DensePure's
tables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from densepure_rt.errors import DataError
from densepure_rt.files.outputs import MARK, holds_mark, write_atomic
from densepure_rt.files.results import PREDICT_HEADER, read_results, read_rows

__all__ = ["DEFAULT_RADII", "certified_accuracy", "clopper_pearson", "accuracy_intervals", "run_settings", "settings_label",
           "labelled", "is_correct", "correct_mismatches", "is_prediction_file",
           "prediction_summary", "format_predictions", "report_table", "format_table", "plot_curves", "check_plot_path",
           "printable", "is_report_json", "is_report_plot", "run_summary", "is_summary_json", "SUMMARY_MARK"]

DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)


def labelled(rows: Sequence[dict]) -> list[dict]:
    """The rows whose image has a label (label >= 0)."""
    return [r for r in rows if r["label"] >= 0]


def is_correct(row: dict) -> bool:
    """Whether a row's prediction is its label (an unlabelled image, label -1, is never correct,
    even where the prediction is an abstention, -1)."""
    return row["label"] >= 0 and row["predict"] == row["label"]


def correct_mismatches(rows: Sequence[dict]) -> int:
    """How many rows have a ``correct`` column that disagrees with their ``label`` and ``predict``."""
    return sum(int(bool(r["correct"])) != int(is_correct(r)) for r in rows)


def certified_accuracy(rows: Sequence[dict], radii: Sequence[float]) -> np.ndarray:
    """[len(radii)] fraction of the labelled rows whose prediction is their label (recomputed,
    :func:`is_correct`) and whose radius is >= r (NaN where no row has a label)."""
    rows = labelled(rows)
    if not rows:
        return np.full(len(radii), np.nan)
    correct = np.array([is_correct(r) for r in rows], dtype=bool)
    radius = np.array([r.get("radius", 0.0) for r in rows], dtype=float)
    return np.array([np.mean(correct & (radius >= r)) for r in radii])


def clopper_pearson(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """The two-sided Clopper-Pearson interval of a binomial proportion (``successes`` of ``trials``):
    certified accuracy over a few dozen images is itself an estimate of the accuracy over the data's
    distribution."""
    from scipy.stats import beta

    tail = (1.0 - confidence) / 2.0
    low = 0.0 if successes == 0 else float(beta.ppf(tail, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(beta.ppf(1.0 - tail, successes + 1, trials - successes))
    return low, high


def accuracy_intervals(rows: Sequence[dict], radii: Sequence[float], confidence: float = 0.95) -> list:
    """[len(radii)] Clopper-Pearson intervals (low, high) of the certified accuracies of
    :func:`certified_accuracy` over the labelled rows (None where no row has a label)."""
    rows = labelled(rows)
    if not rows:
        return [None] * len(radii)
    correct = np.array([is_correct(r) for r in rows], dtype=bool)
    radius = np.array([r.get("radius", 0.0) for r in rows], dtype=float)
    return [clopper_pearson(int(np.sum(correct & (radius >= r))), len(rows), confidence) for r in radii]


def run_settings(path: str | Path) -> dict:
    """The settings of a results file's run, from its options file (empty if it has none)."""
    import json

    from densepure_rt.files.results import options_path

    try:
        options = json.loads(options_path(Path(path)).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return {}
    return options if isinstance(options, dict) else {}


def settings_label(options: dict) -> str:
    """sigma, K, b and the samples of a run, as a legend says them (empty without options)."""
    if not options:
        return ""
    parts = [f"sigma {options.get('sigma')}", f"K {options.get('votes')}", f"b {options.get('steps')}"]
    mode = options.get("mode")
    if mode in ("certify-radii", "certify-until"):
        parts.append(f"n-max {options.get('n')}")
    else:
        parts.append(f"n {options.get('n')}")
    space = options.get("image_space")
    if isinstance(space, dict) and isinstance(space.get("size"), list):
        parts.append("radii in [0, 1] pixels at " + " x ".join(str(d) for d in space["size"]))
    if options.get("random_weights"):
        parts.append("random weights")
    return ", ".join(parts)


def is_prediction_file(path: str | Path) -> bool:
    """Whether ``path`` is a ``predict`` results file (its header is :data:`PREDICT_HEADER`)."""
    header, _ = read_rows(path, required=("idx",))
    return tuple(header) == PREDICT_HEADER


def prediction_summary(path: str | Path) -> dict:
    """A ``predict`` file in numbers: images, labelled images, accuracy over the labelled ones
    (None without labels), abstentions, and UNet evaluations per image."""
    _, rows = read_rows(path, required=PREDICT_HEADER)
    known = labelled(rows)
    return {
        "images": len(rows),
        "labelled": len(known),
        "accuracy": (sum(is_correct(r) for r in known) / len(known)) if known else None,
        "abstained": sum(r["predict"] == -1 for r in rows),
        "unet_evals_per_image": (sum(r["unet_evals"] for r in rows) / len(rows)) if rows else 0.0,
        "correct_column_mismatches": correct_mismatches(rows),
    }


def format_predictions(summaries: dict) -> str:
    """One line per ``predict`` file: accuracy over its labelled images and abstentions."""
    width = max([len(printable(Path(n).name)) for n in summaries] + [len("predictions")])
    lines = ["predictions".ljust(width) + "  accuracy   images  labelled  abstained", "-" * (width + 41)]
    for name, s in summaries.items():
        lines.append(printable(Path(name).name).ljust(width) + f"{_percent(s['accuracy']):>10}{s['images']:>9d}"
                     f"{s['labelled']:>10d}{s['abstained']:>11d}")
    for name, s in summaries.items():
        count = s.get("correct_column_mismatches", 0)
        if count:
            lines.append(f"({printable(Path(name).name)}: the correct column disagrees with label and predict in {count} "
                         f"row{'s' if count > 1 else ''}; recomputed from label and predict)")
    return "\n".join(lines)


def report_table(files: Sequence[str | Path], radii: Sequence[float] = DEFAULT_RADII) -> dict:
    """Per-file certified accuracies, the best per radius, and which file gave it."""
    if not files:
        raise DataError("report needs at least one results file")
    per_file, intervals, sizes, with_labels, mismatches, settings = {}, {}, {}, {}, {}, {}
    for f in files:
        rows = read_results(f)
        per_file[str(f)] = certified_accuracy(rows, radii)
        intervals[str(f)] = accuracy_intervals(rows, radii)
        sizes[str(f)] = len(rows)
        with_labels[str(f)] = len(labelled(rows))
        mismatches[str(f)] = correct_mismatches(rows)
        settings[str(f)] = settings_label(run_settings(f))
    names = list(per_file)
    stacked = np.stack([per_file[n] for n in names])
    usable = ~np.isnan(stacked).all(axis=0)
    best_idx = np.where(usable, np.nanargmax(np.where(np.isnan(stacked), -1.0, stacked), axis=0), 0)
    best = np.where(usable, np.nanmax(np.where(np.isnan(stacked), -1.0, stacked), axis=0), np.nan)
    return {
        "generator": MARK,
        "radii": list(radii),
        # None (JSON null) where a file has no labelled row: accuracy is not defined there.
        "files": {n: [None if np.isnan(a) else float(a) for a in per_file[n]] for n in names},
        "images": sizes,
        "labelled": with_labels,
        # Two-sided 95% Clopper-Pearson intervals over each file's labelled images.
        "intervals": {n: [None if iv is None else [float(iv[0]), float(iv[1])] for iv in intervals[n]] for n in names},
        "interval": "two-sided 95% Clopper-Pearson over the labelled images",
        "settings": settings,
        # The best file per radius (an envelope over the files: choosing the best after seeing the
        # results is optimistic, as in the papers' tables), its accuracy, interval and source.
        "best": [None if np.isnan(a) else float(a) for a in best],
        "best_interval": [list(intervals[names[i]][k]) if ok else None for k, (i, ok) in enumerate(zip(best_idx, usable))],
        "best_file": [names[i] if ok else None for i, ok in zip(best_idx, usable)],
        # Rows whose `correct` column disagrees with label and predict (recomputed, see is_correct).
        "correct_column_mismatches": mismatches,
    }


def format_table(table: dict) -> str:
    """A plain-text table: one row per file with its 95% interval row beneath, then (several
    files) the best-per-radius row and the file each value comes from."""
    radii = table["radii"]
    files = list(table["files"])
    several = len(files) > 1
    names = {n: (f"[{i}] " if several else "") + printable(Path(n).name) for i, n in enumerate(files, 1)}
    width = max([len(v) for v in names.values()] + [len("best (per radius)")])
    head = "radius".ljust(width) + "".join(f"{r:>8.2f}" for r in radii) + "   images  labelled"
    lines = [head, "-" * len(head)]
    intervals = table.get("intervals", {})
    for name, acc in table["files"].items():
        lines.append(names[name].ljust(width) + "".join(_percent(a) for a in acc)
                     + f"{table['images'][name]:>9d}{table['labelled'][name]:>10d}")
        if name in intervals:
            lines.append("  95% interval".ljust(width) + "".join(_interval(iv) for iv in intervals[name]))
        if table.get("settings", {}).get(name):
            lines.append(f"  ({table['settings'][name]})")
    if several:
        lines.append("best (per radius)".ljust(width) + "".join(_percent(a) for a in table["best"]))
        index = {n: i for i, n in enumerate(files, 1)}
        lines.append("  from file".ljust(width) + "".join(f"{'[' + str(index[f]) + ']' if f else 'n/a':>8}" for f in table["best_file"]))
    for name, count in table.get("correct_column_mismatches", {}).items():
        if count:
            lines.append(f"({printable(Path(name).name)}: the correct column disagrees with label and predict in {count} "
                         f"row{'s' if count > 1 else ''}; recomputed from label and predict)")
    unlabelled = sum(table["images"].values()) - sum(table["labelled"].values())
    if unlabelled:
        lines.append(f"({unlabelled} image{'s' if unlabelled > 1 else ''} without a label: "
                     "never counted as correct, and not in the accuracies, which are over labelled images only)")
    lines.append("(certified accuracy: the fraction of labelled images predicted correctly with a certified radius of at "
                 "least r; 95% interval: Clopper-Pearson over those images)")
    return "\n".join(lines)


def _interval(iv) -> str:
    return f"{'':>8}" if iv is None else f"{100 * iv[0]:>4.0f}-{100 * iv[1]:<3.0f}"


def _percent(a) -> str:
    return f"{'n/a':>8}" if a is None else f"{100 * a:>7.1f}%"


def printable(text: str) -> str:
    """``text`` with undecodable bytes of a file name (surrogate escapes) shown as ``\\xNN``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def check_plot_path(out: str | Path) -> Path:
    """``out`` as a plot file whose format matplotlib writes (by its extension), or a one-line
    :class:`DataError`: checked before any work, so a typo does not cost the table."""
    path = Path(out).expanduser()
    if str(out).endswith(("/", "\\")) or path.is_dir():
        raise DataError(f"--plot {out} is a folder: give a file such as {str(out).rstrip('/')}/curve.png")
    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in formats:
        raise DataError(
            f"--plot {out}: matplotlib cannot write {('.' + suffix) if suffix else 'a file without an extension'}: "
            f"end the name with one of {', '.join('.' + f for f in sorted(formats))}"
        )
    return path


def plot_curves(files: Sequence[str | Path], out: str | Path, title: str = "DensePure certified accuracy",
                radii: Sequence[float] = DEFAULT_RADII) -> Path:
    """Certified accuracy vs radius, one curve per file with its 95% Clopper-Pearson band and its
    settings (from its options file) in the legend; with several files the best-per-radius envelope,
    marked at ``radii`` in the colour of the file each value comes from."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    all_rows = {str(f): read_results(f) for f in files}
    max_r = max([r["radius"] for rows in all_rows.values() for r in rows] + [1.0])
    grid = np.linspace(0.0, max_r * 1.05, 300)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    curves, colours = [], {}
    for name, rows in all_rows.items():
        acc = certified_accuracy(rows, grid)
        curves.append(acc)
        settings = settings_label(run_settings(name))
        (line,) = ax.plot(grid, acc, label=printable(Path(name).stem) + (f" ({settings})" if settings else ""))
        colours[name] = line.get_color()
        bands = accuracy_intervals(rows, grid)
        if bands[0] is not None:
            ax.fill_between(grid, [b[0] for b in bands], [b[1] for b in bands], color=line.get_color(), alpha=0.12, linewidth=0)
    if len(curves) > 1:
        ax.plot(grid, np.nanmax(np.where(np.isnan(curves), -1.0, curves), axis=0), "k--", linewidth=1,
                label="best per radius (envelope over the files; dots: its source at the table's radii)")
        table = report_table(list(all_rows), radii)
        for r, acc, source in zip(table["radii"], table["best"], table["best_file"]):
            if source is not None:
                ax.plot([r], [acc], "o", color=colours[source], markeredgecolor="k", markersize=5)
    labelled_counts = sorted({len(labelled(rows)) for rows in all_rows.values()})
    counts = "/".join(str(c) for c in labelled_counts)
    ax.set_xlabel("certified L2 radius (pixel values in [0, 1])")
    ax.set_ylabel(f"certified accuracy (of {counts} labelled images)")
    ax.set_ylim(0, 1)
    ax.set_title(f"{title}\nshaded: 95% Clopper-Pearson interval over the images", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = check_plot_path(out)
    fmt = out.suffix.lower().lstrip(".")
    # The mark that lets a later report recognise (and replace) its own plot; the formats without
    # metadata are replaced only with --force.
    metadata = {"png": {"Software": MARK}, "pdf": {"Creator": MARK}, "svg": {"Creator": MARK},
                "ps": {"Creator": MARK}, "eps": {"Creator": MARK}}.get(fmt)
    try:
        write_atomic(out, lambda handle: fig.savefig(handle, format=fmt, metadata=metadata))
    finally:
        plt.close(fig)
    return out


def is_report_plot(path: Path) -> bool:
    """Whether ``path`` is a plot a report wrote (it carries :data:`~densepure_rt.files.outputs.MARK`)."""
    return holds_mark(path)


#: What a ``--json-summary`` file says it is (a later run recognises it as its own and replaces it).
SUMMARY_MARK = "densepure-rt summary"


def _seconds(text: str) -> float:
    """A ``time`` cell (``str(timedelta)``, e.g. ``0:00:01.532881``) in seconds."""
    try:
        days, _, clock = text.rpartition(" days, ") if " day" in text else ("0", "", text)
        h, m, sec = clock.split(":")
        return int(days or 0) * 86400 + int(h) * 3600 + int(m) * 60 + float(sec)
    except ValueError:
        return 0.0


def run_summary(path: str | Path, radii: Sequence[float], wall_seconds: float) -> dict:
    """A results file in numbers, for pipelines (``certify/predict --json-summary``): images,
    labelled images, abstentions, accuracy (predict) or certified accuracy with its 95% interval at
    each radius (certify), UNet evaluations, the images' summed time, this command's wall time, and
    the run's settings from its options file."""
    options = run_settings(path)
    keys = ("mode", "engine", "engine_id", "data", "sigma", "steps", "votes", "n0", "n", "radii", "tol", "alpha", "seed",
            "skip", "max", "round", "backend", "precision", "device", "version", "image_space")
    if is_prediction_file(path):
        summary = prediction_summary(path)
        rows = read_rows(path, required=PREDICT_HEADER)[1]
    else:
        rows = read_results(path)
        known = labelled(rows)
        summary = {
            "images": len(rows),
            "labelled": len(known),
            "abstained": sum(r["predict"] == -1 for r in rows),
            "radii": list(radii),
            "certified_accuracy": [None if np.isnan(a) else float(a) for a in certified_accuracy(rows, radii)],
            "intervals": [None if iv is None else list(iv) for iv in accuracy_intervals(rows, radii)],
            "correct_column_mismatches": correct_mismatches(rows),
        }
    evals = sum(int(r.get("unet_evals", 0)) for r in rows)
    return {
        "generator": SUMMARY_MARK,
        "results": str(path),
        **summary,
        "unet_evals": evals,
        "unet_evals_per_image": evals / len(rows) if rows else 0.0,
        "image_seconds": sum(_seconds(str(r.get("time", ""))) for r in rows),
        "wall_seconds": float(wall_seconds),
        "settings": {k: options[k] for k in keys if k in options},
    }


def is_summary_json(path: Path) -> bool:
    """Whether ``path`` is a ``--json-summary`` file densepure-rt wrote."""
    import json

    try:
        if Path(path).stat().st_size > (16 << 20):
            return False
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("generator") == SUMMARY_MARK


def is_report_json(path: Path) -> bool:
    """Whether ``path`` is a JSON table a report wrote: an object marked as one, or one with exactly
    the keys of the tables that reports wrote before they carried the mark."""
    import json

    try:
        if Path(path).stat().st_size > (16 << 20):
            return False
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return False
    if not isinstance(data, dict):
        return False
    if data.get("generator") == MARK:
        return True
    return set(data) in ({"radii", "files", "images", "labelled", "best", "best_file"}, {"predictions"})
