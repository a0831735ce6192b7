"""Majority vote over K purified runs, and per-class counting (numpy only, never torch)."""

from __future__ import annotations

import numpy as np


def majority_vote(labels: np.ndarray) -> np.ndarray:
    """Most frequent label per row, as the official DensePure code votes.

    labels: [num_samples x K] int, the classifier labels of K purified runs of the same noisy
    sample, in run order.
    Returns [num_samples] int64. Ties go to the class whose FIRST vote has the lowest run index,
    i.e. ``max(list(row), key=list(row).count)`` (Python's max keeps the first maximal element).
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.shape[1] == 0:
        raise ValueError(f"labels must be [num_samples x K] with K >= 1 (got shape {labels.shape})")
    if labels.dtype.kind not in "iu":
        raise ValueError(f"labels must hold integers (got dtype {labels.dtype})")
    labels = labels.astype(np.int64, copy=False)

    # counts[i, j] = how often row i's run-j label occurs in row i.
    counts = np.empty(labels.shape, dtype=np.int64)
    for j in range(labels.shape[1]):
        counts[:, j] = (labels == labels[:, j : j + 1]).sum(axis=1)
    # The first run holding a maximal count is the first vote of the earliest-voted tied class.
    winner_run = np.argmax(counts, axis=1)
    return labels[np.arange(labels.shape[0]), winner_run]


def count_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-class counts of a 1-D array of labels.

    labels: [num_samples] int in [0, num_classes). Returns [num_classes] int64.
    Raises ValueError on labels outside [0, num_classes).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D (got shape {labels.shape})")
    if labels.size and labels.dtype.kind not in "iu":
        raise ValueError(f"labels must hold integers (got dtype {labels.dtype})")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 (got {num_classes})")
    labels = labels.astype(np.int64, copy=False)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise ValueError(f"labels must be in [0, {num_classes}) (got {int(bad[0])})")
    return np.bincount(labels, minlength=num_classes).astype(np.int64, copy=False)
