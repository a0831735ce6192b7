"""Philox4x32-10 and its Box-Muller normals: Random123's known answers, moments and tails, purity."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from conftest import gpu_cupy
from densepure_rt.sampling.philox import CUDA_SOURCE, box_muller, draw_normals, philox4x32

# Random123's kat_vectors (philox4x32, as reproduced in DEShawResearch/fs123 core123/ut/ut_philox.cpp):
# rounds, counter (4 words), key (2 words), expected output (4 words).
KAT = [
    (7, "00000000 00000000 00000000 00000000", "00000000 00000000", "5f6fb709 0d893f64 4f121f81 4f730a48"),
    (7, "ffffffff ffffffff ffffffff ffffffff", "ffffffff ffffffff", "5207ddc2 45165e59 4d8ee751 8c52f662"),
    (7, "243f6a88 85a308d3 13198a2e 03707344", "a4093822 299f31d0", "4dfccaba 190a87f0 c47362ba b6b5242a"),
    (10, "00000000 00000000 00000000 00000000", "00000000 00000000", "6627e8d5 e169c58d bc57ac4c 9b00dbd8"),
    (10, "ffffffff ffffffff ffffffff ffffffff", "ffffffff ffffffff", "408f276d 41c83b0e a20bc7c6 6d5451fd"),
    (10, "243f6a88 85a308d3 13198a2e 03707344", "a4093822 299f31d0", "d16cfe09 94fdcceb 5001e420 24126ea1"),
]


def _words(text: str) -> np.ndarray:
    return np.array([int(w, 16) for w in text.split()], dtype=np.uint32)


@pytest.mark.parametrize("rounds, counter, key, expected", KAT)
def test_known_answer_vectors(rounds, counter, key, expected):
    out = philox4x32(_words(counter), _words(key), rounds=rounds)
    np.testing.assert_array_equal(out, _words(expected))


def test_vectorised_equals_one_at_a_time():
    rng = np.random.default_rng(0)
    counters = rng.integers(0, 2**32, size=(64, 4), dtype=np.uint64).astype(np.uint32)
    key = rng.integers(0, 2**32, size=2, dtype=np.uint64).astype(np.uint32)
    batch = philox4x32(counters, key)
    for i in range(len(counters)):
        np.testing.assert_array_equal(batch[i], philox4x32(counters[i], key))


def test_normals_have_standard_moments_and_tails():
    # 2^22 normals from consecutive counters, the way the noise uses them.
    z = draw_normals(seed=7, image=3, phase=1, samples=range(16), draws=range(16), size=2**14).ravel().astype(np.float64)
    n = z.size
    assert abs(z.mean()) < 5 / np.sqrt(n)
    assert abs(z.var() - 1) < 5 * np.sqrt(2 / n)
    assert abs(stats.skew(z)) < 5 * np.sqrt(6 / n)
    assert abs(stats.kurtosis(z)) < 5 * np.sqrt(24 / n)
    assert stats.kstest(z[: 2**20], "norm").pvalue > 1e-4
    for t in (2.0, 3.0, 4.0):  # two-sided tails against Phi, within 5 binomial standard deviations
        p = 2 * stats.norm.sf(t)
        assert abs(np.mean(np.abs(z) > t) - p) < 5 * np.sqrt(p * (1 - p) / n), t
    assert np.abs(z).max() < 6.7  # sqrt(-2 ln 2^-32) = 6.66 bounds Box-Muller on 32-bit words


def test_box_muller_pairs_are_uncorrelated_and_words_map_as_documented():
    words = np.array([[0xFFFFFFFF, 0, 0, 0x40000000]], dtype=np.uint32)
    z = box_muller(words)[0]
    # u = 1 -> r = 0; u = 2^-32 -> r = sqrt(2 * 32 ln 2); v = 0 -> angle 0; v = 1/4 -> angle pi/2.
    np.testing.assert_allclose(z[:2], [0.0, 0.0], atol=1e-6)
    r = np.sqrt(64 * np.log(2))
    np.testing.assert_allclose(z[2:], [r * np.cos(np.pi / 2), r * np.sin(np.pi / 2)], rtol=1e-6, atol=1e-6)
    z = draw_normals(0, 0, 0, range(64), range(8), 4096).reshape(-1, 4).astype(np.float64)
    corr = np.corrcoef(z.T)
    assert np.abs(corr - np.eye(4)).max() < 5 / np.sqrt(len(z))


def test_draws_are_a_pure_function_of_their_keys():
    full = draw_normals(11, 5, 1, samples=range(10), draws=range(6), size=37)
    part = draw_normals(11, 5, 1, samples=[3, 4, 5], draws=[2, 5], size=37)
    np.testing.assert_array_equal(part, full[3:6][:, [2, 5]])
    assert full.shape == (10, 6, 37) and full.dtype == np.float32
    # Any change of seed, image, phase, sample or draw gives other numbers.
    for other in (draw_normals(12, 5, 1, range(1), range(1), 37), draw_normals(11, 6, 1, range(1), range(1), 37),
                  draw_normals(11, 5, 2, range(1), range(1), 37), draw_normals(11, 5, 1, [1], range(1), 37),
                  draw_normals(11, 5, 1, range(1), [1], 37)):
        assert not np.allclose(other[0, 0], full[0, 0])


@pytest.mark.parametrize("bad", [dict(seed=-1), dict(seed=2**32), dict(image=-3), dict(samples=[2**32])])
def test_out_of_range_keys_are_refused(bad):
    args = dict(seed=0, image=0, phase=0, samples=[0], draws=[0], size=4) | bad
    with pytest.raises(ValueError):
        draw_normals(**args)


def _cupy():
    return gpu_cupy()


@pytest.mark.gpu
def test_cuda_kernel_equals_numpy_integers_exactly_and_normals_to_1e6():
    cupy = _cupy()
    module = cupy.RawModule(code=CUDA_SOURCE)
    words, normals = module.get_function("philox_words"), module.get_function("philox_normals")
    for rounds, counter, key, expected in KAT:
        if rounds != 10:
            continue
        out = cupy.zeros(4, dtype=cupy.uint32)
        words((1,), (32,), (cupy.asarray(_words(counter)), cupy.asarray(_words(key)), np.int32(1), out))
        np.testing.assert_array_equal(out.get(), _words(expected))
    samples, draws, size = np.arange(5, 21, dtype=np.uint32), np.arange(0, 13, dtype=np.uint32), 3 * 32 * 32
    out = cupy.zeros((len(samples) * len(draws), size), dtype=cupy.float32)
    total = len(samples) * len(draws) * ((size + 3) // 4)
    normals(((total + 255) // 256,), (256,), (np.uint32(9), np.uint32(4), np.uint32(1), cupy.asarray(samples),
                                            cupy.asarray(draws), np.int32(len(samples) * len(draws)), np.int32(len(draws)),
                                            np.int32(size), out))
    want = draw_normals(9, 4, 1, samples, draws, size).reshape(len(samples) * len(draws), size)
    np.testing.assert_allclose(out.get(), want, rtol=0, atol=1e-6)


def test_sample_noise_lays_out_the_documented_draws():
    from densepure_rt.sampling.noise import ESTIMATION, sample_noise

    shape, sigma, votes, calls = (1, 5, 3), 0.25, 3, 2
    samples = [4, 9]
    delta, z = sample_noise(21, 8, ESTIMATION, samples, votes, calls, shape, sigma)
    assert delta.shape == (2, 1, 5, 3) and z.shape == (calls, 2 * votes, 1, 5, 3)
    for b, sample in enumerate(samples):
        want_delta = draw_normals(21, 8, ESTIMATION, [sample], [0], 15)[0, 0] * np.float32(sigma)
        np.testing.assert_array_equal(delta[b].ravel(), want_delta)
        for k in range(votes):
            for s in range(calls):
                want = draw_normals(21, 8, ESTIMATION, [sample], [1 + k * calls + s], 15)[0, 0]
                np.testing.assert_array_equal(z[s, b * votes + k].ravel(), want)
    # A sample's noise does not depend on the batch it is drawn in.
    delta1, z1 = sample_noise(21, 8, ESTIMATION, [9], votes, calls, shape, sigma)
    np.testing.assert_array_equal(delta1[0], delta[1])
    np.testing.assert_array_equal(z1, z[:, votes:])


def test_certify_on_philox_noise_keeps_its_false_certificate_rate_at_a_known_p_a():
    """Monte-Carlo: a base classifier whose p_A is known exactly (a half-space in delta), fed the
    runtime's noise; CERTIFY at the threshold radius must not certify more often than alpha."""
    from densepure_rt.stats.cohen import certify
    from densepure_rt.sampling.noise import ESTIMATION, SELECTION, sample_noise

    sigma, radius, alpha, n0, n, trials = 0.5, 0.25, 0.05, 10, 60, 3000
    p0 = stats.norm.cdf(radius / sigma)  # p_A exactly at the threshold: any certificate >= R is false
    u = np.full(16, 0.25)  # a unit vector: delta . u / sigma ~ N(0, 1)
    cut = stats.norm.ppf(p0)

    def counts(image: int, phase: int, num: int) -> np.ndarray:
        delta, _ = sample_noise(3, image, phase, range(num), 1, 0, (1, 4, 4), sigma)
        labels = (delta.reshape(num, 16) @ u / sigma >= cut).astype(np.int64)  # 0 with probability p0
        return np.bincount(labels, minlength=2)

    false = 0
    for image in range(trials):
        cert = certify(counts(image, SELECTION, n0), counts(image, ESTIMATION, n), sigma, alpha)
        false += cert.prediction == 0 and cert.radius > radius
    rate = false / trials
    print(f"false-certificate rate at p_A = Phi(R / sigma): {false}/{trials} = {rate:.4f} (alpha {alpha})")
    assert stats.binomtest(false, trials, alpha, alternative="greater").pvalue > 1e-3
    assert false > 0  # the threshold case is live: some certificates do come out false, within alpha
