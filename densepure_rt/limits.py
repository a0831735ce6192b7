"""How many rows one engine call may hold, and whether the buffers of a run fit in memory.

A call of the step graph holds rows = noisy samples x K runs. Two limits apply:

- **2^31 elements per tensor.** ONNX Runtime's CUDA kernels index tensors with 32-bit integers (past
  2^31 elements they crash with illegal addresses or return wrong values silently) and TensorRT
  refuses such tensors. At build time every tensor of both graphs is shape-inferred and the largest
  element count per row is recorded in the manifest (``graphs.<graph>.max_elements_per_row``); a
  call may hold at most ``(2^31 - 1) // max_elements_per_row`` rows. The ImageNet UNet holds
  512 x 256 x 256 = 2^25 elements per row in its first decoder concatenation: at most 63 rows, so 6
  noisy samples x K = 10 per call. The limit is applied on every device (it also bounds memory).
- **Memory.** A run allocates its buffers (x, x_next and the noise, each rows x C x H x W float32)
  and the backend needs at least the largest tensor's input and output at once; a request whose
  estimate exceeds the memory available is refused before anything is allocated. The estimate is a
  lower bound: a run can still need more (ONNX Runtime's arenas keep other tensors alive too).
"""

from __future__ import annotations

import os

from densepure_rt.errors import ConfigError

__all__ = ["MAX_ELEMENTS", "row_limit", "rows_per_call", "memory_estimate", "available_memory", "check_rows"]

#: The most elements a tensor may hold: 32-bit signed indexing.
MAX_ELEMENTS = 2**31 - 1


def row_limit(elements_per_row: int) -> int:
    """Rows per call of a graph whose largest tensor holds ``elements_per_row`` elements per row."""
    return MAX_ELEMENTS // max(int(elements_per_row), 1)


def rows_per_call(manifest: dict) -> tuple[int, int]:
    """(step, classifier) row limits of an engine, from its manifest."""
    graphs = manifest["graphs"]
    return row_limit(graphs["step"]["max_elements_per_row"]), row_limit(graphs["classifier"]["max_elements_per_row"])


def memory_estimate(manifest: dict, rows: int) -> int:
    """Bytes a call of ``rows`` rows needs at least: the loop's three float32 row buffers plus the
    input and output of the step graph's largest tensor (float32)."""
    c, h, w = manifest["image_shape"]
    image = int(c) * int(h) * int(w)
    largest = int(manifest["graphs"]["step"]["max_elements_per_row"])
    return 4 * int(rows) * (3 * image + 2 * largest)


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


def check_rows(manifest: dict, batch: int, votes: int, device: str | None = "cpu") -> None:
    """Refuse, in one :class:`ConfigError` naming the flags, ``batch`` noisy samples x ``votes`` runs
    per call when the rows exceed the step graph's row limit, or (``device`` given) when the
    estimated memory exceeds what the device has available."""
    rows = int(batch) * int(votes)
    step_rows, _ = rows_per_call(manifest)
    if rows > step_rows:
        per_row = manifest["graphs"]["step"]["max_elements_per_row"]
        raise ConfigError(
            f"--batch {batch} x --votes {votes} = {rows} rows per call, above this engine's limit of {step_rows} rows "
            f"(its largest tensor holds {per_row:,} elements per row, and no tensor may reach 2^31): "
            f"use --batch {max(step_rows // int(votes), 1)} or less"
            + ("" if step_rows >= int(votes) else f", and --votes {step_rows} or less")
        )
    if device is None:
        return
    needed, free = memory_estimate(manifest, rows), available_memory(device)
    if free is not None and needed > free:
        fits = max(free // max(memory_estimate(manifest, int(votes)), 1), 1)
        raise ConfigError(
            f"--batch {batch} x --votes {votes} = {rows} rows per call needs at least {_gib(needed)} of memory and the "
            f"{'GPU' if device == 'cuda' else 'machine'} has {_gib(free)} available: use --batch {fits} or less"
        )
