"""densepure_rt.stats.vote: the official DensePure majority vote and per-class counting."""

import numpy as np
import pytest

from densepure_rt.stats.vote import count_labels, majority_vote


def _official_vote(row):
    """The official DensePure rule, verbatim: Python's max keeps the first maximal element."""
    row = list(row)
    return max(row, key=row.count)


@pytest.mark.parametrize(
    "row, expected",
    [
        ([3, 1, 1, 3], 3),  # 3 and 1 tie; 3's first vote is at run 0
        ([2, 5, 5, 2, 7], 2),  # 2 and 5 tie; 2 votes first
        ([4, 4, 1, 1, 1], 1),  # a strict majority wins whatever the order
        ([9], 9),
        ([0, 1, 2, 3], 0),  # all distinct: the first run's label
        ([6, 2, 2, 6, 6, 2], 6),
    ],
)
def test_majority_vote_ties_go_to_the_earliest_first_vote(row, expected):
    assert _official_vote(row) == expected
    out = majority_vote(np.array([row]))
    assert out.dtype == np.int64 and out.shape == (1,) and out[0] == expected


@pytest.mark.parametrize("num_classes, k", [(2, 4), (3, 10), (10, 10), (1000, 10), (10, 1), (5, 7)])
def test_majority_vote_matches_official_rule_on_random_rows(num_classes, k):
    rng = np.random.default_rng(1000 * num_classes + k)
    labels = rng.integers(0, num_classes, size=(3000, k))
    expected = np.array([_official_vote(row.tolist()) for row in labels], dtype=np.int64)
    np.testing.assert_array_equal(majority_vote(labels), expected)


def test_majority_vote_accepts_other_integer_dtypes_and_empty_batches():
    labels = np.array([[3, 1, 1, 3], [0, 2, 2, 2]], dtype=np.uint8)
    np.testing.assert_array_equal(majority_vote(labels), [3, 2])
    out = majority_vote(np.zeros((0, 10), dtype=np.int64))
    assert out.shape == (0,) and out.dtype == np.int64


@pytest.mark.parametrize("bad", [np.array([1, 2, 3]), np.zeros((2, 0), dtype=np.int64), np.ones((2, 3), dtype=float)])
def test_majority_vote_rejects_malformed_labels(bad):
    with pytest.raises(ValueError):
        majority_vote(bad)


def test_count_labels_counts_every_class_with_minlength():
    counts = count_labels(np.array([3, 1, 1, 3, 3]), num_classes=10)
    assert counts.dtype == np.int64 and counts.shape == (10,)
    np.testing.assert_array_equal(counts, [0, 2, 0, 3, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(count_labels(np.array([], dtype=np.int64), 3), [0, 0, 0])


@pytest.mark.parametrize("labels", [np.array([0, 10]), np.array([-1, 2]), np.array([[1, 2]]), np.array([0.0, 1.0])])
def test_count_labels_rejects_out_of_range_or_malformed_labels(labels):
    with pytest.raises(ValueError):
        count_labels(labels, num_classes=10)


def _could_change(row: list[int], votes: int, classes: int) -> bool:
    """Brute force: does any completion of the remaining runs change the official vote?"""
    import itertools

    now = _official_vote(row)
    for tail in itertools.product(range(classes), repeat=votes - len(row)):
        if _official_vote(row + list(tail)) != now:
            return True
    return False


@pytest.mark.parametrize("votes", [1, 2, 3, 4, 5, 6])
def test_undecided_is_exact_against_every_completion_of_the_remaining_runs(votes):
    from densepure_rt.stats.vote import undecided

    rng = np.random.default_rng(votes)
    classes = 4  # one more class than most prefixes show: unseen classes are covered
    for j in range(1, votes + 1):
        prefixes = rng.integers(0, 3, size=(300, j))
        expected = np.array([_could_change(row.tolist(), votes, classes) for row in prefixes])
        np.testing.assert_array_equal(undecided(prefixes, votes), expected)


@pytest.mark.parametrize("votes", [1, 2, 3, 5, 10])
def test_waves_with_early_exit_give_the_full_vote(votes):
    from densepure_rt.stats.vote import undecided, vote_waves

    waves = vote_waves(votes)
    assert sum(waves) == votes and waves[0] == (votes + 1) // 2
    rng = np.random.default_rng(10 + votes)
    full = rng.integers(0, 3, size=(5000, votes))
    voted = np.full(len(full), -1)
    active, done, runs_used = np.arange(len(full)), 0, 0
    for wave in waves:
        done += wave
        runs_used += wave * len(active)
        still = undecided(full[active, :done], votes)
        finished = active[~still]
        voted[finished] = majority_vote(full[finished, :done]) if finished.size else voted[finished]
        active = active[still]
    assert active.size == 0
    np.testing.assert_array_equal(voted, [_official_vote(row) for row in full.tolist()])
    assert runs_used < full.size or votes <= 2


@pytest.mark.parametrize("votes", [1, 2, 3, 4, 5, 6, 7])
def test_runs_to_decide_is_the_fewest_runs_any_continuation_needs(votes):
    """Against every continuation (three classes, K up to 7): the fewest further runs after which
    SOME outcome decides the vote, by brute force over all outcomes and the exact majority rule."""
    import itertools

    from densepure_rt.stats.vote import runs_to_decide

    def decided(seq):  # the full vote is fixed whatever the remaining runs return
        rest = votes - len(seq)
        runs = [list(seq) + list(t) for t in itertools.product(range(3), repeat=rest)]
        full = {max(run, key=run.count) for run in runs}  # the official code's vote
        return len(full) == 1

    for j in range(1, votes + 1):
        prefixes = np.array(list(itertools.product(range(3), repeat=j)))
        got = runs_to_decide(prefixes, votes)
        for prefix, need in zip(prefixes, got):
            want = next(e for e in range(0, votes - j + 1)
                        if any(decided(tuple(prefix) + t) for t in itertools.product(range(3), repeat=e)))
            assert need == want, (prefix.tolist(), votes, int(need), want)
