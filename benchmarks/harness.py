"""What every benchmark shares: the machine it ran on, a timing loop, relative L2, the record it
writes, engines built for it, and the common command-line options.

    from harness import machine, rel_l2, timeit, write_record

    t = timeit(lambda: session.run(None, feeds), warmup=2, reps=10)   # Timing, seconds
    write_record(out, "cpu_backends", {"median_s": t.median}, markdown=table)

No torch at import (the lean runtime's benchmarks run without it). Importing this module puts the
checkout first on ``sys.path``: the scripts import the checkout's densepure_rt (its ``export`` and
``engine`` subpackages come from the editable install).
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: Prefixes of the CPU flags that decide inference speed on the CPU (vector width, FMA, bf16, AMX).
CPU_FLAGS = ("avx", "amx", "fma", "sse4")
#: Packages whose versions :func:`machine` records, where installed.
PACKAGES = ("densepure-rt", "numpy", "scipy", "onnxruntime", "onnxruntime-gpu", "openvino", "torch", "timm",
            "cupy-cuda12x", "cupy-cuda13x", "ray")


# -- the machine ----------------------------------------------------------------------------------


def cpu() -> dict:
    """The CPU: ``model`` (/proc/cpuinfo's model name), ``arch``, ``logical_cpus``, and ``flags``:
    the flags it has that start with one of :data:`CPU_FLAGS`, sorted."""
    model, flags = None, None
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model is None:
            model = value.strip()
        elif key.strip() == "flags" and flags is None:
            flags = sorted(f for f in value.split() if f.startswith(CPU_FLAGS))
    return {"model": model or platform.processor() or "unknown", "arch": platform.machine(),
            "logical_cpus": os.cpu_count(), "flags": flags or []}


def gpu() -> dict | None:
    """The first NVIDIA GPU as nvidia-smi names it: ``name``, ``driver``, ``memory_mib``; None without one."""
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits"]
    try:
        done = subprocess.run(query, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        return None
    return dict(zip(("name", "driver", "memory_mib"), (part.strip() for part in lines[0].split(","))))


def git_commit() -> str | None:
    """$DENSEPURE_COMMIT where set (a copied tree may carry a stale .git), else the checkout's HEAD."""
    if os.environ.get("DENSEPURE_COMMIT"):
        return os.environ["DENSEPURE_COMMIT"]
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


def utc_now() -> str:
    """The time in UTC, ISO 8601 to the second: ``2026-12-07T04:04:36Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def versions() -> dict[str, str]:
    """The installed versions of :data:`PACKAGES`, read from their metadata (nothing is imported)."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


@functools.cache
def _fixed() -> dict:
    return {"cpu": cpu(), "gpu": gpu(), "platform": platform.platform(), "python": platform.python_version(),
            "packages": versions(), "git_commit": git_commit()}


def machine() -> dict:
    """Where and when a record is made: ``cpu`` (:func:`cpu`), ``gpu`` (:func:`gpu`), ``platform``,
    ``python``, ``packages`` (installed versions of :data:`PACKAGES`), ``git_commit`` and ``date``
    (:func:`utc_now`). All but the date are read once per process."""
    return {**_fixed(), "date": utc_now()}


# -- timing and numerics --------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """Seconds of each timed call, in call order."""

    seconds: tuple[float, ...]

    @property
    def median(self) -> float:
        return float(statistics.median(self.seconds))

    @property
    def min(self) -> float:
        return float(min(self.seconds))

    @property
    def max(self) -> float:
        return float(max(self.seconds))

    @property
    def reps(self) -> int:
        return len(self.seconds)

    def as_ms(self) -> dict:
        """``{"median_ms", "min_ms", "max_ms", "reps"}``, milliseconds."""
        return {"median_ms": 1e3 * self.median, "min_ms": 1e3 * self.min, "max_ms": 1e3 * self.max, "reps": self.reps}


def timeit(fn: Callable[[], object], *, warmup: int, reps: int, sync: Callable[[], object] | None = None) -> Timing:
    """Wall clock of each of ``reps`` calls of ``fn()`` after ``warmup`` untimed calls.

    sync: waits for the work ``fn`` queued on a device (``torch.cuda.synchronize``, a CuPy stream's
    ``synchronize``); called after the warm-up and inside each timed call, so that a call's time
    holds its device work.
    """
    for _ in range(warmup):
        fn()
    if sync is not None:
        sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - start)
    return Timing(tuple(times))


def rel_l2(a, ref) -> float:
    """||a - ref|| / ||ref|| over all elements, in float64; numpy arrays or torch tensors (on any
    device) of one shape."""
    a, ref = (np.asarray(x.detach().double().cpu() if hasattr(x, "detach") else x, dtype=np.float64) for x in (a, ref))
    return float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-300))


# -- records --------------------------------------------------------------------------------------


def write_atomically(path: Path, text: str) -> None:
    """``text`` into ``path`` (its folder made if need be) through a temporary file beside it and
    os.replace: a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _plain(value):
    """JSON for numpy and torch values (their ``tolist()``) and anything else (its str)."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def write_record(out_dir: Path | str, name: str, record: dict | list, markdown: str | None = None) -> Path:
    """Write ``out_dir/name.json`` and, when ``markdown`` is given, ``out_dir/name.md``, each
    atomically; returns the JSON's path. A dict record gets the :func:`machine` of this process under
    ``"environment"``; a list (rows appended across runs) is written as it is."""
    out_dir = Path(out_dir)
    if isinstance(record, dict):
        record = {**record, "environment": machine()}
    path = out_dir / f"{name}.json"
    write_atomically(path, json.dumps(record, indent=1, default=_plain) + "\n")
    if markdown is not None:
        write_atomically(out_dir / f"{name}.md", markdown)
    return path


def read_record(path: Path, empty: dict | list) -> dict | list:
    """The JSON record at ``path`` (to append to), or ``empty`` where there is none yet."""
    return json.loads(path.read_text()) if path.is_file() else empty


def markdown_table(head: Sequence[str], rows: Iterable[Sequence[object]], align: str | None = None) -> list[str]:
    """The lines of a markdown table: ``head``, its rule, and a line per row (each cell its str).
    ``align``: a letter a column, "l" or "r" (right: numbers); default all left."""
    rule = "".join(" ---: |" if a == "r" else " --- |" for a in (align or "l" * len(head)))
    return ["| " + " | ".join(head) + " |", "|" + rule] + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def command(argv: Sequence[str] | None = None) -> str:
    """The command line of this run: ``python script.py ARGS`` (``argv``: the arguments given to
    ``main``, default the process's)."""
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join([Path(sys.executable).name, sys.argv[0], *args])


# -- engines --------------------------------------------------------------------------------------


def cli() -> list[str]:
    """The densepure-rt command line of this interpreter."""
    return [sys.executable, "-m", "densepure_rt.cli"]


def build_engine(out: Path, *build_args: str) -> Path:
    """``densepure-rt build BUILD_ARGS --out OUT`` in a child process; its output is shown only when
    it fails (one-line SystemExit with its last lines). Returns ``out``."""
    print(f"building {' '.join(build_args)} into {out} ...", file=sys.stderr, flush=True)
    done = subprocess.run([*cli(), "build", *build_args, "--out", str(out)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"densepure-rt build {' '.join(build_args)} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return out


# -- command line ---------------------------------------------------------------------------------


def parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose --help is the script's docstring: its first paragraph, then the rest."""
    first, _, rest = doc.strip().partition("\n\n")
    return argparse.ArgumentParser(description=first, epilog=rest or None, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_out(ap: argparse.ArgumentParser, what: str, *, flag: str = "--out", metavar: str = "DIR",
            required: bool = True, default: Path | None = None) -> None:
    """``--out`` (or ``flag``): where the record goes, a folder (``metavar`` DIR) or a file (FILE)."""
    shown = f" (default: {default})" if default is not None else ""
    ap.add_argument(flag, type=Path, required=required and default is None, default=default, metavar=metavar,
                    help=what + shown)


def add_engine(ap: argparse.ArgumentParser, *, many: bool = False, default: Path | None = None) -> None:
    """``--engine DIR`` (``many``: one or more): a built engine folder; required without a default."""
    ap.add_argument("--engine", type=Path, nargs="+" if many else None, required=default is None, default=default, metavar="DIR",
                    help="engine folder" + ("s" if many else "") + (f" (default: {default})" if default else ""))

