"""Majority vote over K purified runs, and per-class counting (numpy only, never torch)."""

from __future__ import annotations

import sys

import numpy as np

__all__ = ["array_module", "majority_vote", "vote_waves", "undecided", "runs_to_decide", "count_labels"]


def array_module(a):
    """numpy, or CuPy for a CuPy array: the vote runs where the labels are (no import of CuPy
    unless a CuPy array is passed in)."""
    if type(a).__module__.split(".")[0] == "cupy":
        return sys.modules["cupy"]  # loaded already: a CuPy array exists (only the device module imports it)
    return np


def majority_vote(labels: np.ndarray) -> np.ndarray:
    """Most frequent label per row, as the official DensePure code votes.

    labels: [num_samples x K] int, the classifier labels of K purified runs of the same noisy
    sample, in run order.
    Returns [num_samples] int64. Ties go to the class whose FIRST vote has the lowest run index,
    i.e. ``max(list(row), key=list(row).count)`` (Python's max keeps the first maximal element).
    """
    xp = array_module(labels)
    labels = xp.asarray(labels)
    if labels.ndim != 2 or labels.shape[1] == 0:
        raise ValueError(f"labels must be [num_samples x K] with K >= 1 (got shape {labels.shape})")
    if labels.dtype.kind not in "iu":
        raise ValueError(f"labels must hold integers (got dtype {labels.dtype})")
    labels = labels.astype(xp.int64, copy=False)

    # counts[i, j] = how often row i's run-j label occurs in row i.
    counts = (labels[:, :, None] == labels[:, None, :]).sum(axis=2)
    # The first run holding a maximal count is the first vote of the earliest-voted tied class.
    winner_run = xp.argmax(counts, axis=1)
    return xp.take_along_axis(labels, winner_run[:, None], axis=1)[:, 0]


def vote_waves(votes: int) -> tuple[int, ...]:
    """How many of the K runs to run in each wave when undecided samples exit early.

    The first wave is ceil(K/2) runs: no fewer can decide a vote (a leader with c votes of j can be
    overtaken while the K - j runs left could give another class more than c). Then one run per wave,
    so that a sample stops at the first run after which its vote is decided. Every wave has a fixed
    number of runs per sample; the number of samples shrinks as votes are decided, so a wave's rows
    vary (the GPU path runs such waves without ONNX Runtime's graph).
    """
    if isinstance(votes, bool) or not isinstance(votes, (int, np.integer)) or votes < 1:
        raise ValueError(f"votes must be an integer >= 1 (got {votes!r})")
    first = (int(votes) + 1) // 2
    return (first,) + (1,) * (int(votes) - first)


def undecided(labels: np.ndarray, votes: int) -> np.ndarray:
    """Which rows' voted label could still change if the remaining runs were run.

    labels: [num_samples x j] int, the labels of the first j runs of each noisy sample, in run
    order (1 <= j <= votes). votes: K, the total number of runs of the vote.
    Returns [num_samples] bool: True where some outcome of the K - j remaining runs would make
    :func:`majority_vote` of all K runs differ from :func:`majority_vote` of the j runs so far.

    Exact under the official tie rule. With r = K - j runs left, the current leader L (count c_L,
    first vote at run f_L) keeps the vote unless some other class c could reach c_c + r > c_L, or
    c_c + r == c_L with an earlier first vote f_c < f_L (the remaining runs only ever add to one
    class's count, and the worst case gives them all to the strongest challenger). A class not seen
    yet would have its first vote at run >= j > f_L, so it can only win with r > c_L.
    """
    xp = array_module(labels)
    labels = xp.asarray(labels)
    if labels.ndim != 2 or labels.shape[1] == 0:
        raise ValueError(f"labels must be [num_samples x j] with j >= 1 (got shape {labels.shape})")
    done = labels.shape[1]
    if not done <= votes:
        raise ValueError(f"labels hold {done} runs but the vote has only {votes}")
    remaining = int(votes) - done
    if remaining == 0:
        return xp.zeros(labels.shape[0], dtype=bool)
    same = labels[:, :, None] == labels[:, None, :]  # [rows, run j, run i]
    counts = same.sum(axis=2)
    earlier = xp.tril(xp.ones((done, done), dtype=bool), k=-1)  # i < j
    first = ~(same & earlier[None]).any(axis=2)  # run j is its label's first vote in the row
    lead_run = xp.argmax(counts, axis=1)  # first run of the leader (as majority_vote picks it)
    lead_count = xp.take_along_axis(counts, lead_run[:, None], axis=1)[:, 0]
    lead_label = xp.take_along_axis(labels, lead_run[:, None], axis=1)[:, 0]
    runs = xp.arange(done)[None, :]
    challenger = first & (labels != lead_label[:, None])
    reach = counts + remaining
    overtakes = challenger & ((reach > lead_count[:, None]) | ((reach == lead_count[:, None]) & (runs < lead_run[:, None])))
    return overtakes.any(axis=1) | (remaining > lead_count)


def runs_to_decide(labels: np.ndarray, votes: int) -> np.ndarray:
    """The fewest further runs after which each row's vote could be decided (0 where it is already).

    labels: [num_samples x j] int, the first j runs' labels (1 <= j <= votes). Fewer runs than this
    cannot decide the vote whatever they return, so launching them all at once never costs more
    UNet evaluations than running them one at a time with :func:`undecided` after each: the
    scheduler launches this many, then asks again. The quickest way to a decision is every further
    run voting for the current leader (more votes for a challenger only shrink the leader's margin
    less than they would grow it); a test checks that against every continuation for small K.
    """
    xp = array_module(labels)
    labels = xp.asarray(labels)
    done = labels.shape[1]
    need = xp.zeros(labels.shape[0], dtype=np.int64)
    still = undecided(labels, votes)
    if not bool(still.any()):
        return need
    leader = majority_vote(labels)
    for extra in range(1, int(votes) - done + 1):
        grown = xp.concatenate([labels, xp.repeat(leader[:, None], extra, axis=1)], axis=1)
        now = still & (need == 0) & ~undecided(grown, votes)
        need[now] = extra
    return need


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
