"""When the selection of ``c_a`` may stop: the clear-leader rule (:func:`selection_done`), its
look-ahead (:func:`selection_certain`) and the rules as objects (:class:`SelectionRule`: the
clear-leader rule and the first-votes rules). Pure numpy/scipy, never torch; re-exported by
:mod:`densepure_rt.stats.sequential`."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
from scipy import stats


#: The clear-leader rule of :func:`selection_done`: the leader holds at least this share of the
#: selection votes so far ...
SELECTION_MIN_SHARE = 2.0 / 3.0
#: ... and a one-sided binomial test of the leader against the runner-up rejects at this level.
SELECTION_LEVEL = 1e-3


def selection_done(counts0, left, min_share: float = SELECTION_MIN_SHARE, level: float = SELECTION_LEVEL):
    """Whether the selection of ``c_a`` may stop now, from the selection counts so far: counts in, decision out.

    counts0: [..., num_classes] integer per-class counts of the selection samples drawn so far
    (vectorised over leading axes). left: the selection samples not yet drawn (n0 minus those drawn;
    an integer >= 0 or an array broadcast with ``counts0.shape[:-1]``). min_share: in (0, 1].
    level: in [0, 1); 0 turns the clear-leader rule off.

    With k the leader's count (argmax, ties to the lowest class: ``c_a`` if selection stops now), r
    the runner-up's (0 with a single class) and t = counts0.sum(-1), selection is done when
      "exact": left == 0, or k > r + left: the samples left cannot change the argmax, so ``c_a`` is
               the class all n0 samples would select (CERTIFY's); or
      "clear": k >= min_share * t and P(Binomial(k + r, 1/2) >= k) <= level: the leader holds at
               least ``min_share`` of the votes and a one-sided binomial test of leader against
               runner-up (counts among those two) rejects at ``level``. The default (2/3, 1e-3), asked
               after every vote, stops a clear image after 10 selection samples instead of the
               exact rule's 51 (n0 = 100), e.g. 33 instead of 74 samples in all at p_a = 0.99,
               R = 0.5 sigma, alpha = 0.001 (``benchmarks/sequential_table.py``).

    Why any such rule keeps the guarantee: it reads the selection samples only, so ``c_a`` is a
    function of the selection samples, and the estimation samples are fresh and independent of
    them (keyed by another noise phase). Given any ``c_a``, the estimation votes for ``c_a`` are
    i.i.d. Bernoulli(p_{c_a}), so the sequential tests (:class:`TargetRadiiTest`,
    :class:`EarlyStopRadius`) are valid tests of p_{c_a} whatever ``c_a`` is, a wrong class
    included (then even R = 0 is false, and it is covered). The "clear" rule can pick another class
    than all n0 samples would; that costs power (an abstention), never validity. ``level`` is a
    heuristic bound on how often that happens, not part of any guarantee. Fixed-n CERTIFY
    (:func:`densepure_rt.stats.cohen.certify`) does not use this: it selects from all n0 samples.

    Returns a bool for a single count vector, else a bool array of shape counts0.shape[:-1].
    """
    counts0 = np.asarray(counts0)
    if counts0.ndim < 1 or counts0.shape[-1] < 1 or counts0.dtype.kind not in "iu" or (counts0 < 0).any():
        raise ValueError(f"counts0 must be [..., num_classes] non-negative integer counts (got {counts0.dtype}, shape {counts0.shape})")
    left = np.asarray(left)
    if left.dtype.kind not in "iu" or (left < 0).any():
        raise ValueError(f"left must be an integer >= 0 (got {left!r})")
    if isinstance(min_share, bool) or not isinstance(min_share, numbers.Real) or not 0.0 < min_share <= 1.0:
        raise ValueError(f"min_share must be in (0, 1] (got {min_share!r})")
    if isinstance(level, bool) or not isinstance(level, numbers.Real) or not 0.0 <= level < 1.0:
        raise ValueError(f"level must be in [0, 1) (got {level!r})")
    counts0 = counts0.astype(np.int64)
    top2 = -np.sort(-counts0, axis=-1)[..., :2]  # the leader's and runner-up's counts
    k = top2[..., 0]
    r = top2[..., 1] if counts0.shape[-1] > 1 else np.zeros_like(k)
    t = counts0.sum(axis=-1)
    exact = (left == 0) | (k > r + left)
    # sf(k - 1) = P(Binomial(k + r, 1/2) >= k); 1 when k = r = 0
    p_value = stats.binom.sf(k - 1, k + r, 0.5)
    clear = (t > 0) & (k >= min_share * t) & (p_value <= level)
    done = exact | clear
    return bool(done) if done.ndim == 0 else done


#: How far ahead (in samples) the look-aheads (:func:`selection_certain`, ``certain_more``) search
#: for the earliest possible stop; a stop further away counts as this many samples (the caller asks
#: again once they are read).
LOOKAHEAD = 16


def selection_certain(counts0, left, min_share: float = SELECTION_MIN_SHARE, level: float = SELECTION_LEVEL,
                      window: int = LOOKAHEAD) -> int:
    """The fewest further selection samples after which :func:`selection_done` could say done,
    whatever their votes (0 when it says so now; at most ``window``): that many more are read.

    counts0: [num_classes] integer counts of the selection samples so far; left: samples not yet
    drawn. The earliest stop puts every further vote on the leader: both rules grow with the
    leader's count and shrink with the runner-up's, and any other split leaves a leader with at
    most as many votes and a runner-up with at least as many."""
    counts0 = np.asarray(counts0)
    if counts0.ndim != 1:
        raise ValueError(f"counts0 must be one count vector [num_classes] (got shape {counts0.shape})")
    # A pure function of its arguments, asked after selection votes of every image: the same states
    # (e.g. k unanimous votes) come back image after image, so answers are kept (per process).
    key = (tuple(counts0.tolist()), int(left), min_share, level, int(window))
    known = _SELECTION_CERTAIN.get(key)
    if known is not None:
        return known
    m = np.arange(0, min(int(left), int(window)) + 1)  # m = 0: done now
    path = np.repeat(counts0.astype(np.int64)[None, :], m.size, axis=0)
    path[:, int(np.argmax(counts0))] += m
    done = selection_done(path, int(left) - m, min_share, level)
    answer = int(m[np.argmax(done)]) if done.any() else int(m[-1])
    if len(_SELECTION_CERTAIN) >= 1 << 16:
        _SELECTION_CERTAIN.clear()
    _SELECTION_CERTAIN[key] = answer
    return answer


#: :func:`selection_certain`'s answers by its arguments.
_SELECTION_CERTAIN: dict = {}


@dataclass(frozen=True)
class SelectionRule:
    """When the selection of ``c_a`` may stop, as an object a run is configured with (its ``key`` is
    what an options file records; a run is continued only under the same key).

    first: 0 for the clear-leader rule alone (:func:`selection_done`: the samples left cannot change
    the argmax, or a clear leader), or k in 1..3 for the first-votes rule: selection also stops as
    soon as the first t >= k votes all agree (with rounds of one vote: when the first k agree), and
    falls back to the clear-leader rule when they disagree (once two classes are seen, agreement
    never returns). ``first=1`` stops after one vote, always. min_share, level: the clear-leader
    rule's settings (:data:`SELECTION_MIN_SHARE`, :data:`SELECTION_LEVEL`).

    Every such rule reads the selection samples only, in sample order, so ``c_a`` is independent of
    the estimation samples and the sequential tests stay valid whichever class it picks (see
    :func:`selection_done`); a wrong pick costs an abstention. Measured (exact dynamic programs,
    benchmarks/selection_rule.py, docs/statistics.md): at p_a 0.99, R = 0.5 sigma, alpha 0.001 the
    clear-leader rule spends 10.4 selection samples per decision (33.3 in all, 1.55x the bound
    log(1/alpha)/KL), first-1 / first-2 / first-3 1.0 / 2.2 / 3.3 (1.11x / 1.17x / 1.22x); the price
    is accuracy where p_a is moderate: the first k votes agree on a wrong class with probability
    (1 - p_a)^k in a two-class vote (certified accuracy at p_a 0.7, R = 0: 100% / 70% / 91% / 97%).
    """

    first: int = 0
    min_share: float = SELECTION_MIN_SHARE
    level: float = SELECTION_LEVEL

    def __post_init__(self) -> None:
        if isinstance(self.first, bool) or not isinstance(self.first, numbers.Integral) or not 0 <= self.first <= 3:
            raise ValueError(f"first must be 0 (the clear-leader rule) or 1, 2 or 3 agreeing votes (got {self.first!r})")

    @property
    def key(self) -> str:
        """"clear-leader" or "first-k" (with the clear-leader settings where they differ from the defaults)."""
        name = "clear-leader" if self.first == 0 else f"first-{self.first}"
        if (self.min_share, self.level) != (SELECTION_MIN_SHARE, SELECTION_LEVEL):
            name += f"({self.min_share:g},{self.level:g})"
        return name

    def done(self, counts0, left):
        """:func:`selection_done` under this rule (same arguments; vectorised over leading axes)."""
        done = selection_done(counts0, left, self.min_share, self.level)
        if self.first:
            counts0 = np.asarray(counts0).astype(np.int64)
            t = counts0.sum(axis=-1)
            done = done | ((t >= self.first) & (counts0.max(axis=-1) == t))
        return bool(done) if np.ndim(done) == 0 else done

    def certain(self, counts0, left, window: int = LOOKAHEAD) -> int:
        """:func:`selection_certain` under this rule: the fewest further selection samples after which
        :meth:`done` could say done, whatever their votes (all further votes on the leader are the
        quickest way: both rules grow with the leader's count only)."""
        counts0 = np.asarray(counts0)
        if counts0.ndim != 1:
            raise ValueError(f"counts0 must be one count vector [num_classes] (got shape {counts0.shape})")
        m = np.arange(0, min(int(left), int(window)) + 1)
        path = np.repeat(counts0.astype(np.int64)[None, :], m.size, axis=0)
        path[:, int(np.argmax(counts0))] += m
        done = self.done(path, int(left) - m)
        return int(m[np.argmax(done)]) if np.any(done) else int(m[-1])

    @staticmethod
    def choose(counts0) -> int:
        """``c_a``: the argmax of the selection counts, ties to the lowest class."""
        return int(np.argmax(np.asarray(counts0)))


#: The selection rules by key: the clear-leader rule (the default) and the first-votes rules.
SELECTION_RULES = {rule.key: rule for rule in (SelectionRule(0), SelectionRule(1), SelectionRule(2), SelectionRule(3))}
#: The rule runs use unless told otherwise.
DEFAULT_SELECTION = SELECTION_RULES["clear-leader"]
