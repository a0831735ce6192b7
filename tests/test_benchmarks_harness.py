"""benchmarks/harness.py: the timing loop, relative L2, the record on disk, and an import without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import harness  # noqa: E402


def test_importing_the_harness_imports_no_torch():
    code = "import sys; import harness; print(sorted({'torch', 'onnxruntime', 'openvino'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=BENCHMARKS, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_timeit_times_reps_calls_after_the_warmup_and_syncs_each():
    calls, syncs = [], []
    timing = harness.timeit(lambda: calls.append(len(syncs)), warmup=2, reps=3, sync=lambda: syncs.append(1))
    assert len(calls) == 5 and timing.reps == 3
    assert len(syncs) == 1 + 3  # once after the warm-up, once inside each timed call
    assert timing.min <= timing.median <= timing.max
    assert timing.as_ms()["median_ms"] == pytest.approx(1e3 * timing.median)
    assert set(timing.as_ms()) == {"median_ms", "min_ms", "max_ms", "reps"}


def test_rel_l2_of_numpy_arrays_and_torch_tensors():
    ref = np.array([3.0, 4.0], dtype=np.float32)
    assert harness.rel_l2(ref + np.array([0.3, 0.4]), ref) == pytest.approx(0.1)
    assert harness.rel_l2(ref, ref) == 0.0
    torch = pytest.importorskip("torch")
    assert harness.rel_l2(torch.tensor([3.3, 4.4], dtype=torch.float16), torch.tensor(ref)) == pytest.approx(0.1, rel=1e-2)


def test_write_record_adds_the_machine_and_replaces_the_files_whole(tmp_path):
    path = harness.write_record(tmp_path / "new", "run", {"value": np.float32(1.5), "where": tmp_path}, markdown="| a |\n")
    record = json.loads(path.read_text())
    assert record["value"] == 1.5 and record["where"] == str(tmp_path)
    env = record["environment"]
    assert {"cpu", "gpu", "platform", "python", "packages", "git_commit", "date"} <= set(env)
    assert env["cpu"]["logical_cpus"] >= 1 and env["packages"]["numpy"] == np.__version__
    assert (tmp_path / "new" / "run.md").read_text() == "| a |\n"
    harness.write_record(tmp_path / "new", "run", [{"row": 1}])  # rows: written as they are
    assert json.loads(path.read_text()) == [{"row": 1}]
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["run.json", "run.md"]  # no temporary file left


def test_markdown_table_lines():
    assert harness.markdown_table(["a", "b"], [[1, "x"]], align="lr") == ["| a | b |", "| --- | ---: |", "| 1 | x |"]
