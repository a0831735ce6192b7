"""Counter-based noise: every draw is a pure function of (seed, image index, phase, sample index).

Changing the batch size, resuming a killed run, or running on another backend that uses this
source never changes which numbers a noisy sample gets. Each noisy sample owns one Philox stream
keyed by a SeedSequence of (seed, image, phase, sample) and draws, in order:

    delta                      [C x H x W]   (the smoothing noise, times sigma)
    z[run k, step s]           [C x H x W]   for k in 0..K-1, s in 0..num_calls-1

The reverse-step draw of the last step (and of the one-shot path) is drawn and multiplied by 0, as
in the official code, so the layout does not depend on which steps add noise.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["SELECTION", "ESTIMATION", "PREDICTION", "NOISE_VERSION", "sample_noise"]

#: Names this definition of the noise. Results files record it, and a file is only continued by a
#: run that draws the same numbers (a change of definition must change this string).
NOISE_VERSION = "seedsequence-philox-v1"

#: Phase ids: the n0 selection samples, the n estimation samples, PREDICT's samples.
SELECTION, ESTIMATION, PREDICTION = 0, 1, 2


def _stream(seed: int, image: int, phase: int, sample: int) -> np.random.Generator:
    key = np.random.SeedSequence([int(seed), int(image), int(phase), int(sample)])
    return np.random.Generator(np.random.Philox(key))


def sample_noise(
    seed: int,
    image: int,
    phase: int,
    samples: Sequence[int],
    votes: int,
    calls: int,
    shape: Sequence[int],
    sigma: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Noise for a batch of noisy samples of one image.

    Returns ``delta`` [B x C x H x W] float32 (already times sigma) and ``z``
    [calls x B*votes x C x H x W] float32, where row b*votes + k of ``z[s]`` is run k of sample b
    (the runs of one sample are adjacent, as in the official code's clustering layout).
    """
    shape = tuple(int(d) for d in shape)
    batch = len(samples)
    delta = np.empty((batch, *shape), dtype=np.float32)
    z = np.empty((calls, batch * votes, *shape), dtype=np.float32)
    for b, sample in enumerate(samples):
        rng = _stream(seed, image, phase, sample)
        delta[b] = rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma)
        draws = rng.standard_normal((votes, calls, *shape), dtype=np.float32)
        z[:, b * votes : (b + 1) * votes] = draws.transpose(1, 0, *range(2, 2 + len(shape)))
    return delta, z
