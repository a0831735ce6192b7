"""Counter-based noise: every draw is a pure function of (seed, image index, phase, sample index).

Changing the batch size, resuming a killed run, stopping a vote early, or running on another
backend that uses this definition never changes which numbers a noisy sample gets. The numbers come
from Philox4x32-10 (:mod:`densepure_rt.sampling.philox`, the Random123 generator, with a CUDA twin), keyed
(seed, image) with counter (element block, draw, sample, phase); a noisy sample's draws are

    draw 0                     delta       [C x H x W]   (the smoothing noise, times sigma)
    draw 1 + k * calls + s     z[run k, step s]  [C x H x W]   for k in 0..K-1, s in 0..calls-1

The reverse-step draw of the last step (and of the one-shot path) is drawn and multiplied by 0, as
in the official code, so the layout does not depend on which steps add noise.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from densepure_rt.sampling.philox import draw_normals

__all__ = ["SELECTION", "ESTIMATION", "PREDICTION", "NOISE_VERSION", "sample_noise", "draw_index"]

#: Names this definition of the noise. Results files record it, and a file is only continued by a
#: run that draws the same numbers (a change of definition must change this string).
NOISE_VERSION = "philox4x32-10-boxmuller-v1"

#: Phase ids: the n0 selection samples, the n estimation samples, PREDICT's samples.
SELECTION, ESTIMATION, PREDICTION = 0, 1, 2


def draw_index(run: int, step: int, calls: int) -> int:
    """The Philox draw index of the reverse-step noise of run ``run`` at step ``step`` (0 is delta)."""
    return 1 + int(run) * int(calls) + int(step)


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
    batch, votes, calls = len(samples), int(votes), int(calls)
    size = int(np.prod(shape))
    draws = [0] + [draw_index(k, s, calls) for k in range(votes) for s in range(calls)]
    normals = draw_normals(seed, image, phase, samples, draws, size)  # [B x (1 + K*calls) x size]
    delta = (normals[:, 0] * np.float32(sigma)).reshape(batch, *shape)
    z = normals[:, 1:].reshape(batch, votes, calls, *shape)  # [B, K, calls, ...]
    z = np.ascontiguousarray(np.moveaxis(z, 2, 0)).reshape(calls, batch * votes, *shape)
    return delta, z
