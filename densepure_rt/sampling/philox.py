"""Counter-based Philox4x32-10 (Salmon et al., SC'11; the Random123 generators) and Box-Muller normals.

One definition of the noise for every backend: a vectorised numpy implementation here, and a CUDA
kernel (:data:`CUDA_SOURCE`, compiled by CuPy on a GPU) that does the same integer arithmetic, so
that a GPU run draws the same numbers as the CPU run and as the PyTorch reference.

Philox4x32-10 maps a 128-bit counter (c0, c1, c2, c3) and a 64-bit key (k0, k1) to four 32-bit words
through 10 rounds of

    (c0, c1, c2, c3) <- (hi(M1 c2) ^ c1 ^ k0, lo(M1 c2), hi(M0 c0) ^ c3 ^ k1, lo(M0 c0))

with M0 = 0xD2511F53, M1 = 0xCD9E8D57, and the key bumped by (0x9E3779B9, 0xBB67AE85) between rounds.
It is checked against Random123's published known-answer vectors (``tests/test_philox.py``).

Normals: each block of four words gives four standard normals by Box-Muller on the two pairs
(w0, w1) and (w2, w3): u = (w0 + 1) 2^-32 in (0, 1], v = w1 2^-32 in [0, 1), r = sqrt(-2 ln u),
normals r cos(2 pi v) and r sin(2 pi v); computed in float64 and rounded to float32 (the CUDA
kernel does the same in double precision, so the two agree to within float32 rounding).

How the noise of DensePure is keyed (:func:`noise_block_counters`): key = (seed, image index);
counter = (element block, draw, sample, phase), where draw 0 is the smoothing noise delta and
draw 1 + k * calls + s is the reverse-step noise of run k at step s. Every number is a pure function
of (seed, image, phase, sample, draw, element), so the batch size, resuming, early exit of the vote
and the device never change which number a noisy sample gets.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "PHILOX_M0",
    "PHILOX_M1",
    "PHILOX_W0",
    "PHILOX_W1",
    "philox4x32",
    "box_muller",
    "normals",
    "draw_normals",
    "row_normals",
    "CUDA_SOURCE",
]

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
_MASK32 = np.uint64(0xFFFFFFFF)
_TWO_M32 = 2.0**-32


def philox4x32(counter: np.ndarray, key: np.ndarray, rounds: int = 10) -> np.ndarray:
    """Philox4x32 with ``rounds`` rounds: counter [..., 4] and key [..., 2] (uint32, broadcast)
    -> [..., 4] uint32. Exactly Random123's ``philox4x32_R``."""
    counter = np.asarray(counter, dtype=np.uint32)
    key = np.asarray(key, dtype=np.uint32)
    if counter.shape[-1] != 4 or key.shape[-1] != 2:
        raise ValueError(f"counter must be [..., 4] and key [..., 2] (got {counter.shape} and {key.shape})")
    shape = np.broadcast_shapes(counter.shape[:-1], key.shape[:-1])
    c0, c1, c2, c3 = (np.broadcast_to(counter[..., i], shape).astype(np.uint64) for i in range(4))
    k0, k1 = (np.broadcast_to(key[..., i], shape).astype(np.uint64) for i in range(2))
    m0, m1 = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1)
    w0, w1 = np.uint64(PHILOX_W0), np.uint64(PHILOX_W1)
    shift = np.uint64(32)
    for r in range(rounds):
        if r:
            k0 = (k0 + w0) & _MASK32
            k1 = (k1 + w1) & _MASK32
        p0 = m0 * c0  # a 32 x 32 -> 64-bit product: exact in uint64
        p1 = m1 * c2
        c0, c1, c2, c3 = (p1 >> shift) ^ c1 ^ k0, p1 & _MASK32, (p0 >> shift) ^ c3 ^ k1, p0 & _MASK32
    return np.stack([c0, c1, c2, c3], axis=-1).astype(np.uint32)


def box_muller(words: np.ndarray) -> np.ndarray:
    """Four standard normals (float32) from each block of four uint32 words [..., 4] -> [..., 4]."""
    w = np.asarray(words, dtype=np.uint32).astype(np.float64)
    u = (w[..., 0::2] + 1.0) * _TWO_M32  # (0, 1]: log is finite
    v = w[..., 1::2] * _TWO_M32  # [0, 1)
    r = np.sqrt(-2.0 * np.log(u))
    angle = 2.0 * np.pi * v
    out = np.empty(w.shape, dtype=np.float64)
    out[..., 0::2] = r * np.cos(angle)
    out[..., 1::2] = r * np.sin(angle)
    return out.astype(np.float32)


def normals(counter: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Box-Muller normals of the Philox4x32-10 blocks at ``counter`` [..., 4] with ``key`` [..., 2]."""
    return box_muller(philox4x32(counter, key))


def _u32(value: int, name: str) -> int:
    value = int(value)
    if not 0 <= value < 2**32:
        raise ValueError(f"{name} must be in [0, 2^32) for the Philox key and counter (got {value})")
    return value


def draw_normals(seed: int, image: int, phase: int, samples, draws, size: int) -> np.ndarray:
    """Standard normals [len(samples) x len(draws) x size] float32.

    Row (b, d) holds elements 0 .. size-1 of draw ``draws[d]`` of sample ``samples[b]``: element e
    is normal e % 4 of the Philox4x32-10 block with key (seed, image) and counter (e // 4, draw,
    sample, phase). ``seed``, ``image``, ``phase``, every sample and draw: integers in [0, 2^32).
    """
    key = np.array([_u32(seed, "seed"), _u32(image, "image index")], dtype=np.uint32)
    phase = _u32(phase, "phase")
    samples = np.array([_u32(s, "sample index") for s in samples], dtype=np.uint32)
    draws = np.array([_u32(d, "draw index") for d in draws], dtype=np.uint32)
    blocks = (int(size) + 3) // 4
    counter = np.empty((len(samples), len(draws), blocks, 4), dtype=np.uint32)
    counter[..., 0] = np.arange(blocks, dtype=np.uint32)[None, None, :]
    counter[..., 1] = draws[None, :, None]
    counter[..., 2] = samples[:, None, None]
    counter[..., 3] = phase
    return normals(counter, key).reshape(len(samples), len(draws), blocks * 4)[..., : int(size)]


def row_normals(seed: int, images, phases, samples, draws, size: int, scale: float | None = None) -> np.ndarray:
    """Standard normals [rows x size] float32, one row per (image, phase, sample, draw) tuple.

    Row r holds elements 0 .. size-1 of draw ``draws[r]`` of sample ``samples[r]`` of image
    ``images[r]`` in phase ``phases[r]``: the same numbers as :func:`draw_normals` gives for that
    tuple. Rows of several images can share one call (the batch loop's cross-image batches).
    ``scale``: multiply by this float32 in float32 (delta's sigma), as the CUDA kernel does.
    """
    cols = [np.asarray(a, dtype=np.int64).reshape(-1) for a in (images, phases, samples, draws)]
    rows = len(cols[0])
    if any(len(c) != rows for c in cols):
        raise ValueError("images, phases, samples and draws must have one entry per row")
    for c, name in zip(cols, ("image index", "phase", "sample index", "draw index")):
        if rows and (c.min() < 0 or c.max() >= 2**32):
            raise ValueError(f"{name} must be in [0, 2^32) for the Philox key and counter")
    images, phases, samples, draws = (c.astype(np.uint32) for c in cols)
    blocks = (int(size) + 3) // 4
    counter = np.empty((rows, blocks, 4), dtype=np.uint32)
    counter[..., 0] = np.arange(blocks, dtype=np.uint32)[None, :]
    counter[..., 1] = draws[:, None]
    counter[..., 2] = samples[:, None]
    counter[..., 3] = phases[:, None]
    key = np.empty((rows, 1, 2), dtype=np.uint32)
    key[..., 0] = _u32(seed, "seed")
    key[..., 1] = images[:, None]
    out = normals(counter, key).reshape(rows, blocks * 4)[:, : int(size)]
    if scale is not None:
        out = out * np.float32(scale)
    return np.ascontiguousarray(out, dtype=np.float32)


#: The same generator as a CUDA kernel (compiled with NVRTC by ``cupy.RawKernel``; not compiled or
#: run in CI, which has no GPU). One thread per (row, element block): it writes up to four normals
#: of draw ``draws[row % n_draws]`` of sample ``samples[row // n_draws]`` into ``out[row, 4 * block ...]``.
#: The per-row sample indices live in a device buffer, refreshed per batch, so a captured CUDA graph
#: draws each replay's own noise.
CUDA_SOURCE = r"""
__device__ __forceinline__ void philox4x32_10(unsigned int c[4], unsigned int k0, unsigned int k1)
{
    #pragma unroll
    for (int r = 0; r < 10; ++r) {
        if (r) { k0 += 0x9E3779B9u; k1 += 0xBB67AE85u; }
        const unsigned long long p0 = (unsigned long long)0xD2511F53u * c[0];
        const unsigned long long p1 = (unsigned long long)0xCD9E8D57u * c[2];
        const unsigned int n0 = (unsigned int)(p1 >> 32) ^ c[1] ^ k0;
        const unsigned int n2 = (unsigned int)(p0 >> 32) ^ c[3] ^ k1;
        c[1] = (unsigned int)p1; c[3] = (unsigned int)p0; c[0] = n0; c[2] = n2;
    }
}

/* Raw words, for the known-answer and numpy-equality tests: counters [n x 4], key [2] -> out [n x 4]. */
extern "C" __global__ void philox_words(const unsigned int* __restrict__ counters, const unsigned int* __restrict__ key,
                                        const int n, unsigned int* __restrict__ out)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned int c[4] = {counters[4 * i], counters[4 * i + 1], counters[4 * i + 2], counters[4 * i + 3]};
    philox4x32_10(c, key[0], key[1]);
    for (int j = 0; j < 4; ++j) out[4 * i + j] = c[j];
}

extern "C" __global__ void philox_normals(
    const unsigned int seed, const unsigned int image, const unsigned int phase,
    const unsigned int* __restrict__ samples, const unsigned int* __restrict__ draws,
    const int n_rows, const int n_draws, const int size, float* __restrict__ out)
{
    const int blocks = (size + 3) / 4;
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (tid >= (long long)n_rows * blocks) return;
    const int row = (int)(tid / blocks);
    const unsigned int block = (unsigned int)(tid % blocks);
    unsigned int c[4] = {block, draws[row % n_draws], samples[row / n_draws], phase};
    philox4x32_10(c, seed, image);
    const double two_m32 = 2.3283064365386963e-10;  /* 2^-32 */
    float z[4];
    for (int p = 0; p < 2; ++p) {
        const double u = ((double)c[2 * p] + 1.0) * two_m32;
        const double v = (double)c[2 * p + 1] * two_m32;
        const double rr = sqrt(-2.0 * log(u));
        const double a = 6.283185307179586 * v;
        z[2 * p] = (float)(rr * cos(a));
        z[2 * p + 1] = (float)(rr * sin(a));
    }
    float* dst = out + (long long)row * size + 4 * (long long)block;
    for (int i = 0; i < 4 && 4 * (int)block + i < size; ++i) dst[i] = z[i];
}

/* The batch loop's kernel: row r draws (image images[r], phase phases[r], sample samples[r], draw
   draws[r] + draw_offset), times scale (float32 multiply, as numpy's row_normals), into out[r, :].
   The per-row arrays are device buffers refreshed per batch; draw_offset is the reverse step. */
extern "C" __global__ void philox_rows(
    const unsigned int seed, const unsigned int* __restrict__ images, const unsigned int* __restrict__ phases,
    const unsigned int* __restrict__ samples, const unsigned int* __restrict__ draws, const unsigned int draw_offset,
    const int n_rows, const int size, const float scale, float* __restrict__ out)
{
    const int blocks = (size + 3) / 4;
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (tid >= (long long)n_rows * blocks) return;
    const int row = (int)(tid / blocks);
    const unsigned int block = (unsigned int)(tid % blocks);
    unsigned int c[4] = {block, draws[row] + draw_offset, samples[row], phases[row]};
    philox4x32_10(c, seed, images[row]);
    const double two_m32 = 2.3283064365386963e-10;  /* 2^-32 */
    float z[4];
    for (int p = 0; p < 2; ++p) {
        const double u = ((double)c[2 * p] + 1.0) * two_m32;
        const double v = (double)c[2 * p + 1] * two_m32;
        const double rr = sqrt(-2.0 * log(u));
        const double a = 6.283185307179586 * v;
        z[2 * p] = (float)(rr * cos(a));
        z[2 * p + 1] = (float)(rr * sin(a));
    }
    float* dst = out + (long long)row * size + 4 * (long long)block;
    for (int i = 0; i < 4 && 4 * (int)block + i < size; ++i) dst[i] = z[i] * scale;
}
"""
