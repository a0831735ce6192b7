"""How many rows one engine call may hold, and whether the peak memory of a run fits.

A call of the step graph holds rows = noisy samples x K runs. Two limits apply:

- **2^31 elements per tensor.** ONNX Runtime's CUDA kernels index tensors with 32-bit integers (past
  2^31 elements they crash with illegal addresses or return wrong values silently) and TensorRT
  refuses such tensors. At build time every tensor of both graphs is shape-inferred and the largest
  element count per row is recorded in the manifest (``graphs.<graph>.max_elements_per_row``); a
  call may hold at most ``(2^31 - 1) // max_elements_per_row`` rows. The ImageNet UNet holds
  512 x 256 x 256 = 2^25 elements per row in its first decoder concatenation: at most 63 rows, so 6
  noisy samples x K = 10 per call. The limit is applied on every device (it also bounds memory).
- **Memory.** :func:`memory_estimate` models the peak resident memory of a whole run whose step
  calls hold ``rows`` rows (below); a request whose growth beyond what the process already holds
  exceeds the memory available is refused before anything is allocated (:func:`check_rows`).

The memory model (ONNX Runtime on the CPU; bytes, float32)::

    peak = PROCESS_BYTES + WEIGHTS_FACTOR x (bytes of the engine's two graph files)
         + 4 x rows  x (IMAGE_BUFFERS x C*H*W + STEP_ARENA x step's largest tensor per row)
         + 4 x chunk x CLASSIFIER_ARENA x classifier's largest tensor per row
    chunk = min(rows, the classifier's rows per call: 512, or the engine's row limit if lower)

- process: the interpreter, numpy, ONNX Runtime and the CLI, with an engine of (almost) no weights.
- weights: 1.5 bytes per byte of graph file at the peak (the CIFAR-10 engine's 553.8 MB of graphs
  peaked at 979 MB at one row, the digits engine's 4.2 MB at 155 MB: ONNX Runtime's own copy of the
  initializers and the weights it repacks for its kernels, beside what the loading left behind).
- row buffers, at most 16 image-sized float32 buffers per row: the batch loop's x, x_next and noise
  (3 per row) and each sample's start and delta (2 per sample), the scheduler's x, x_next and noise
  (3 per row), start and delta of up to 2 x rows + chunk samples in flight, and its classifier
  queue (chunk + rows). The ``--images-per-call`` staging is checked on its own (runtime).
- step arena: ONNX Runtime's CPU arena (one per session) grows and never shrinks. The first call at
  a row count allocates every intermediate tensor on its own: 4.1 to 5.3 times the largest tensor
  per row were measured on the digits UNet (at 10,000 and 5,000 rows: it depends on how the arena's
  regions fragment), 3.8 on CIFAR-10's. From the second call at that row count on, its memory
  pattern allocates the planned peak as one block (4.0 and 3.8 times the largest), which fits in
  none of the first call's regions: the arena then holds both, 7.7 to 9.3 times the largest tensor
  per row; later calls add nothing (seen over five calls). STEP_ARENA = 9.
- classifier arena: the same two blocks at the classifier's chunk rows: ViT-B/16 at 224 (CIFAR-10)
  3.35 + 3.0 times its largest tensor (the MLP's 197 x 3072 per row); the digits CNN 2.0 + 2.0.
  CLASSIFIER_ARENA = 6.5.

Measured (``/usr/bin/time -v`` maximum resident set size of ``densepure-rt certify --steps 1
--votes 1 --n0 1 --n 2R --batch R --max 1``: two full calls of R rows, the steady state; Intel Xeon
with AVX-512, 2 cores, onnxruntime 1.32.0, numpy 2.4.6, fp32 engines;
benchmarks/memory_peak.py, benchmarks/results/memory/certify_peak_rss.json)::

    engine (image; largest tensor per row: step, classifier)     rows R   predicted    measured   error
    digits (1x16x16; 24,576, 8,192)                                 500      713 MB      678 MB   +5.3%
    digits                                                        2,000    2,068 MB    2,033 MB   +1.7%
    digits                                                        5,000    4,771 MB    5,034 MB   -5.2%
    digits                                                       10,000    9,277 MB    8,622 MB   +7.6%
    digits, --batch 200 --votes 10 --steps 2 (early exit)         2,000    2,068 MB    2,027 MB   +2.0%
    cifar10 --random-weights (3x32x32; 393,216, 605,184)             16    1,462 MB    1,412 MB   +3.5%
    cifar10 --random-weights                                         48    2,425 MB    2,356 MB   +2.9%
    cifar10 --random-weights                                        128    4,832 MB    4,679 MB   +3.3%
    tiny --random-weights (3x16x16; 24,576, 4,096)                  500      676 MB      643 MB   +5.1%
    tiny --random-weights                                         2,000    2,078 MB    2,026 MB   +2.5%
    tiny --random-weights                                         5,000    4,879 MB    5,250 MB   -7.1%

It is a model of ONNX Runtime's CPU sessions, calibrated on these engines: other executors
(OpenVINO, TensorRT), GPUs (whose free memory :func:`check_rows` compares with the part that grows
with the rows) and other architectures (whose largest tensor is a different share of their live
tensors) can differ, and it is not calibrated there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from densepure_rt.errors import ConfigError, param
from densepure_rt.files.manifest import Manifest, row_facts

__all__ = [
    "MAX_ELEMENTS",
    "MemoryEstimate",
    "row_limit",
    "rows_per_call",
    "memory_estimate",
    "available_memory",
    "resident_memory",
    "check_rows",
]

#: The most elements a tensor may hold: 32-bit signed indexing.
MAX_ELEMENTS = 2**31 - 1

#: The memory model's constants (module doc): bytes of a process with an engine of no weights;
#: resident bytes per byte of graph file; image-sized float32 buffers per row; arena bytes per byte
#: of each graph's largest tensor per row; the classifier's rows per call (the batch loop's
#: ``CLASSIFIER_ROWS``) where the executor and the engine allow as many.
PROCESS_BYTES = 150 * 10**6
WEIGHTS_FACTOR = 1.5
IMAGE_BUFFERS = 16
STEP_ARENA = 9.0
CLASSIFIER_ARENA = 6.5
CLASSIFIER_CHUNK = 512


def row_limit(elements_per_row: int) -> int:
    """Rows per call of a graph whose largest tensor holds ``elements_per_row`` elements per row."""
    return MAX_ELEMENTS // max(int(elements_per_row), 1)


def rows_per_call(manifest: Manifest) -> tuple[int, int]:
    """(step, classifier) row limits of an engine, from its manifest."""
    _, step, classifier = row_facts(manifest)
    return row_limit(step), row_limit(classifier)


@dataclass(frozen=True)
class MemoryEstimate:
    """The modelled peak memory of a run (bytes; module doc): ``fixed`` (process and weights) and
    the parts that grow with the rows: ``buffers`` (the loops' row buffers), ``step`` and
    ``classifier`` (ONNX Runtime's arenas)."""

    rows: int
    fixed: int
    buffers: int
    step: int
    classifier: int

    @property
    def variable(self) -> int:
        """The bytes that grow with the rows."""
        return self.buffers + self.step + self.classifier

    @property
    def total(self) -> int:
        return self.fixed + self.variable


def memory_estimate(manifest: Manifest, rows: int, weights_bytes: int = 0, classifier_rows: int | None = None) -> MemoryEstimate:
    """The modelled peak memory of a run whose step calls hold ``rows`` rows (module doc).

    ``weights_bytes``: the size of the engine's graph files (0: weights not counted).
    ``classifier_rows``: the most rows a classifier call holds (the executor's and the engine's
    limit); default :data:`CLASSIFIER_CHUNK` or the engine's classifier row limit if lower."""
    rows = int(rows)
    (c, h, w), step_largest, classifier_largest = row_facts(manifest)
    if classifier_rows is None:
        classifier_rows = min(CLASSIFIER_CHUNK, rows_per_call(manifest)[1])
    chunk = min(rows, max(int(classifier_rows), 1))
    return MemoryEstimate(
        rows=rows,
        fixed=PROCESS_BYTES + round(WEIGHTS_FACTOR * int(weights_bytes)),
        buffers=4 * rows * IMAGE_BUFFERS * c * h * w,
        step=round(4 * rows * STEP_ARENA * step_largest),
        classifier=round(4 * chunk * CLASSIFIER_ARENA * classifier_largest),
    )


def resident_memory() -> int:
    """Bytes this process holds in memory now (its resident set; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * int(os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError, AttributeError):
        return 0


def available_memory(device: str) -> int | None:
    """Bytes of memory available to a new allocation on ``device`` ("cpu": the kernel's
    MemAvailable; "cuda": the GPU's free memory), or None where it cannot be read."""
    if device == "cuda":
        from densepure_rt.sampling.device import free_gpu_bytes

        return free_gpu_bytes()
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _growth(estimate: MemoryEstimate, device: str, in_use: int) -> int:
    """Bytes a run of ``estimate`` still needs: what grows with the rows, plus (on the CPU) the
    part of the fixed cost this process does not hold yet. On a GPU the weights are already there."""
    if device == "cuda":
        return estimate.variable
    return estimate.variable + max(estimate.fixed - in_use, 0)


def check_rows(manifest: Manifest, batch: int, votes: int, device: str | None = "cpu", *, weights_bytes: int = 0,
               classifier_rows: int | None = None) -> None:
    """Refuse ``batch`` noisy samples x ``votes`` runs per call, in one :class:`ConfigError` naming
    both (the CLI shows --batch and --votes), when the rows exceed the step graph's row limit, or
    (``device`` given) when the modelled peak (:func:`memory_estimate`; ``weights_bytes``,
    ``classifier_rows`` as there) needs more memory than the device has available, beyond what this
    process already holds (on a GPU: the part that grows with the rows)."""
    rows = int(batch) * int(votes)
    step_rows, _ = rows_per_call(manifest)
    request = f"{param('batch')} {batch} x {param('votes')} {votes} = {rows} rows per call"
    if rows > step_rows:
        per_row = row_facts(manifest)[1]
        raise ConfigError(
            f"{request}, above this engine's limit of {step_rows} rows "
            f"(its largest tensor holds {per_row:,} elements per row, and no tensor may reach 2^31): "
            f"use {param('batch')} {max(step_rows // int(votes), 1)} or less"
            + ("" if step_rows >= int(votes) else f", and {param('votes')} {step_rows} or less")
        )
    if device is None:
        return
    free = available_memory(device)
    if free is None:
        return
    in_use = resident_memory()

    def needs(b: int) -> tuple[MemoryEstimate, int]:
        estimate = memory_estimate(manifest, b * int(votes), weights_bytes, classifier_rows)
        return estimate, _growth(estimate, device, in_use)

    estimate, more = needs(int(batch))
    if more <= free:
        return
    low, high = 0, int(batch) - 1  # the largest batch that fits (the need grows with the batch)
    while low < high:
        mid = (low + high + 1) // 2
        if needs(mid)[1] <= free:
            low = mid
        else:
            high = mid - 1
    fix = (f"use {param('batch')} {low} or less" if low >= 1
           else f"even {param('batch')} 1 does not fit: use fewer {param('votes')} than {votes}, or free memory")
    if device == "cuda":
        raise ConfigError(f"{request} needs about {_gib(more)} of GPU memory for its rows and the GPU has "
                          f"{_gib(free)} available: {fix}")
    raise ConfigError(
        f"{request} needs about {_gib(estimate.total)} of memory at its peak, "
        f"{_gib(more)} more than this process holds, and the machine has {_gib(free)} available: {fix}"
    )
