"""densepure_rt.stats.cohen: Clopper-Pearson bound, CERTIFY, PREDICT, parameter checks, light imports."""

import subprocess
import sys

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.proportion import proportion_confint

from densepure_rt.stats.cohen import (
    ABSTAIN,
    Certificate,
    Prediction,
    certify,
    lower_confidence_bound,
    predict,
    validate_params,
)
from densepure_rt.errors import ConfigError


def _random_cases(rng: np.random.Generator, size: int):
    n = np.round(np.exp(rng.uniform(0.0, np.log(100_000), size))).astype(np.int64)
    n[:4] = [1, 1, 100_000, 100_000]
    n_a = rng.integers(0, n + 1)
    # Force the edges and the region near n_a ~ n where certification happens.
    n_a[: size // 8] = 0
    n_a[size // 8 : size // 4] = n[size // 8 : size // 4]
    near = slice(size // 4, size // 2)
    n_a[near] = np.maximum(n[near] - rng.integers(0, 50, n[near].shape), 0)
    alpha = np.exp(rng.uniform(np.log(1e-6), np.log(0.5), size))
    return n_a, n, alpha


def test_lower_confidence_bound_matches_statsmodels_beta_method():
    rng = np.random.default_rng(20230501)
    n_a, n, alpha = _random_cases(rng, 4000)
    expected = proportion_confint(n_a, n, alpha=2 * alpha, method="beta")[0]
    got = np.array([lower_confidence_bound(a, b, c) for a, b, c in zip(n_a, n, alpha)])
    assert (n_a == 0).any() and (n_a == n).any() and n.min() == 1 and n.max() == 100_000
    assert np.max(np.abs(got - expected)) <= 1e-12


@pytest.mark.parametrize("n", [1, 2, 100, 100_000])
def test_lower_confidence_bound_edges_match_statsmodels_scalars(n):
    for n_a in (0, n):
        expected = proportion_confint(n_a, n, alpha=0.002, method="beta")[0]
        assert abs(lower_confidence_bound(n_a, n, 0.001) - expected) <= 1e-12
    assert lower_confidence_bound(0, n, 0.001) == 0.0
    assert lower_confidence_bound(n, n, 0.001) == pytest.approx(0.001 ** (1 / n), abs=1e-12)


@pytest.mark.parametrize("n_a, n, alpha", [(-1, 10, 0.1), (11, 10, 0.1), (0, 0, 0.1), (5, 10, 0.0), (5, 10, 1.0)])
def test_lower_confidence_bound_rejects_impossible_arguments(n_a, n, alpha):
    with pytest.raises(ValueError):
        lower_confidence_bound(n_a, n, alpha)


def _counts(num_classes, entries):
    out = np.zeros(num_classes, dtype=np.int64)
    for cls, cnt in entries.items():
        out[cls] = cnt
    return out


def test_certify_published_cifar_setting_hand_checked():
    # n = 100,000, n_a = 99,000, alpha = 0.001, sigma = 0.5, expected from scipy directly.
    counts0 = _counts(10, {3: 98, 5: 2})
    counts = _counts(10, {3: 99_000, 1: 600, 5: 400})
    p_lower = stats.beta.ppf(0.001, 99_000, 100_000 - 99_000 + 1)
    cert = certify(counts0, counts, sigma=0.5, alpha=0.001)
    assert cert == Certificate(prediction=3, radius=cert.radius, n_a=99_000, p_a_lower=cert.p_a_lower, c_a=3)
    assert cert.p_a_lower == pytest.approx(p_lower, rel=0, abs=1e-15)
    assert cert.radius == pytest.approx(0.5 * stats.norm.ppf(p_lower), rel=0, abs=1e-15)
    assert 0.98 < cert.p_a_lower < 0.99 and 1.0 < cert.radius < 1.2


def test_certify_all_votes_for_one_class_gives_alpha_root_bound():
    counts = _counts(10, {7: 10_000})
    cert = certify(_counts(10, {7: 100}), counts, sigma=0.25, alpha=0.001)
    p_lower = 0.001 ** (1 / 10_000)
    assert cert.prediction == 7 and cert.n_a == 10_000
    assert cert.p_a_lower == pytest.approx(p_lower, abs=1e-12)
    assert cert.radius == pytest.approx(0.25 * stats.norm.ppf(p_lower), abs=1e-12)


def test_certify_abstains_with_zero_radius_when_bound_below_half():
    # 55 / 100 votes: the point estimate is above 0.5 but the 99.9% lower bound is not.
    counts = _counts(10, {2: 55, 4: 45})
    p_lower = stats.beta.ppf(0.001, 55, 46)
    assert p_lower < 0.5
    cert = certify(_counts(10, {2: 60, 4: 40}), counts, sigma=1.0, alpha=0.001)
    assert cert == Certificate(prediction=ABSTAIN, radius=0.0, n_a=55, p_a_lower=cert.p_a_lower, c_a=2)
    assert cert.p_a_lower == pytest.approx(p_lower, abs=1e-15)


def test_certify_uses_estimation_counts_not_selection_counts_for_n_a():
    # Selection picks class 1; the estimation samples mostly vote 0, so class 1's bound is tiny.
    cert = certify(_counts(3, {1: 100}), _counts(3, {0: 990, 1: 10}), sigma=0.5, alpha=0.001)
    assert cert.c_a == 1 and cert.n_a == 10 and cert.prediction == ABSTAIN and cert.radius == 0.0


def test_certify_abstains_when_selected_class_gets_no_estimation_votes():
    cert = certify(_counts(3, {2: 100}), _counts(3, {0: 1000}), sigma=0.5, alpha=0.001)
    assert cert == Certificate(prediction=ABSTAIN, radius=0.0, n_a=0, p_a_lower=0.0, c_a=2)


def test_certify_selection_tie_goes_to_lowest_class():
    counts0 = _counts(10, {6: 50, 2: 50})
    counts = _counts(10, {2: 9_000, 6: 1_000})
    cert = certify(counts0, counts, sigma=0.5, alpha=0.001)
    assert cert.c_a == 2 and cert.prediction == 2 and cert.n_a == 9_000


def test_certify_accepts_any_integer_dtype_and_lists():
    a = certify(np.array([0, 100], dtype=np.uint16), np.array([3, 997], dtype=np.int32), 0.25, 0.001)
    b = certify([0, 100], [3, 997], 0.25, 0.001)
    assert a == b and a.prediction == 1


@pytest.mark.parametrize(
    "counts0, counts",
    [
        (np.array([[1, 2]]), np.array([[1, 2]])),  # not 1-D
        (np.array([1.0, 2.0]), np.array([1, 2])),  # not integer
        (np.array([1, 2]), np.array([-1, 2])),  # negative
        (np.array([1, 2]), np.array([1, 2, 3])),  # lengths differ
        (np.array([0, 0]), np.array([1, 2])),  # n0 = 0
        (np.array([1, 2]), np.array([0, 0])),  # n = 0
        (np.array([], dtype=np.int64), np.array([], dtype=np.int64)),  # empty
    ],
)
def test_certify_rejects_malformed_counts(counts0, counts):
    with pytest.raises(ValueError):
        certify(counts0, counts, sigma=0.5, alpha=0.001)


@pytest.mark.parametrize("sigma, alpha", [(0.0, 0.001), (-0.5, 0.001), (float("nan"), 0.001), (0.5, 0.0), (0.5, 1.0)])
def test_certify_rejects_bad_sigma_or_alpha(sigma, alpha):
    with pytest.raises(ValueError):
        certify(np.array([0, 100]), np.array([0, 100]), sigma=sigma, alpha=alpha)


def test_certificate_is_frozen():
    cert = certify(np.array([0, 100]), np.array([0, 100]), 0.5, 0.001)
    with pytest.raises(AttributeError):
        cert.radius = 2.0


def test_predict_hand_checked_confident_case():
    counts = _counts(10, {8: 9_000, 1: 700, 2: 300})
    pred = predict(counts, alpha=0.001)
    p = stats.binomtest(9_000, 9_700, p=0.5).pvalue
    assert pred == Prediction(prediction=8, count1=9_000, count2=700, p_value=pred.p_value)
    assert pred.p_value == pytest.approx(p, rel=1e-12, abs=0)


def test_predict_abstains_when_p_value_exceeds_alpha():
    counts = _counts(10, {0: 52, 9: 48})
    p = stats.binomtest(52, 100, p=0.5).pvalue
    pred = predict(counts, alpha=0.001)
    assert p > 0.001
    assert pred == Prediction(prediction=ABSTAIN, count1=52, count2=48, p_value=pred.p_value)
    assert pred.p_value == pytest.approx(p, rel=1e-12)


def test_predict_p_value_equal_to_alpha_does_not_abstain():
    p = stats.binomtest(9, 9, p=0.5).pvalue  # 2 * 0.5**9
    pred = predict(np.array([0, 9, 0]), alpha=p)
    assert pred.prediction == 1 and pred.p_value == p


def test_predict_tie_orders_lower_class_first_and_abstains():
    pred = predict(_counts(10, {7: 40, 3: 40, 5: 10}), alpha=0.001)
    assert pred == Prediction(prediction=ABSTAIN, count1=40, count2=40, p_value=1.0)
    # Tie for second place: count2 is the same whichever class ranks second.
    pred = predict(_counts(10, {6: 100, 4: 1, 2: 1}), alpha=0.001)
    assert pred.prediction == 6 and pred.count2 == 1
    assert pred.p_value == pytest.approx(stats.binomtest(100, 101, p=0.5).pvalue, rel=1e-12)


def test_predict_handles_no_votes_and_single_class():
    assert predict(np.zeros(10, dtype=np.int64), alpha=0.001) == Prediction(ABSTAIN, 0, 0, 1.0)
    pred = predict(np.array([20]), alpha=0.001)
    assert pred.prediction == 0 and pred.count2 == 0
    assert pred.p_value == pytest.approx(stats.binomtest(20, 20, p=0.5).pvalue, rel=1e-12)


def test_predict_matches_scipy_on_random_counts():
    rng = np.random.default_rng(7)
    for _ in range(200):
        counts = rng.integers(0, 60, size=rng.integers(2, 12))
        alpha = float(rng.choice([1e-3, 1e-2, 0.05]))
        pred = predict(counts, alpha)
        ranked = sorted(range(counts.size), key=lambda c: (-counts[c], c))
        c1, c2 = int(counts[ranked[0]]), int(counts[ranked[1]])
        assert (pred.count1, pred.count2) == (c1, c2)
        if c1 + c2 == 0:
            assert pred.prediction == ABSTAIN
            continue
        p = stats.binomtest(c1, c1 + c2, p=0.5).pvalue
        assert pred.p_value == pytest.approx(p, rel=1e-12)
        assert pred.prediction == (ABSTAIN if p > alpha else ranked[0])


def test_predict_rejects_malformed_counts():
    for bad in (np.array([[1, 2]]), np.array([0.5, 2.0]), np.array([3, -1])):
        with pytest.raises(ValueError):
            predict(bad, alpha=0.001)


def test_validate_params_accepts_published_settings():
    for sigma in (0.25, 0.5, 1.0):
        validate_params(sigma, 0.001, n0=100, n=100_000)
    validate_params(np.float64(0.5), np.float32(0.01), n0=np.int64(1), n=1)
    validate_params(0.5, 0.001)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sigma=-1, alpha=0.001), "--sigma must be > 0 (got -1)"),
        (dict(sigma=0.0, alpha=0.001), "--sigma must be > 0 (got 0.0)"),
        (dict(sigma=float("nan"), alpha=0.001), "--sigma must be finite (got nan)"),
        (dict(sigma=float("inf"), alpha=0.001), "--sigma must be finite (got inf)"),
        (dict(sigma="0.5", alpha=0.001), "--sigma must be a number (got '0.5')"),
        (dict(sigma=0.5, alpha=1.5), "--alpha must be in (0, 1) (got 1.5)"),
        (dict(sigma=0.5, alpha=0), "--alpha must be in (0, 1) (got 0)"),
        (dict(sigma=0.5, alpha=float("nan")), "--alpha must be in (0, 1) (got nan)"),
        (dict(sigma=0.5, alpha=0.001, n0=0), "--n0 must be >= 1 (got 0)"),
        (dict(sigma=0.5, alpha=0.001, n0=100, n=-5), "--n must be >= 1 (got -5)"),
        (dict(sigma=0.5, alpha=0.001, n=2.5), "--n must be an integer (got 2.5)"),
    ],
)
def test_validate_params_raises_config_error_naming_the_flag(kwargs, message):
    from densepure_rt.errors import cli_message

    with pytest.raises(ConfigError) as info:
        validate_params(**kwargs)
    assert cli_message(info.value) == message  # the command line names the flag
    assert str(info.value) == message.replace("--", "", 1)  # the API names its parameter
    assert "\n" not in str(info.value)


def test_importing_certify_and_vote_does_not_import_torch():
    code = "import sys, densepure_rt.stats.cohen, densepure_rt.stats.vote; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
