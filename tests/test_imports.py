"""The runtime never imports torch (checked in a fresh interpreter where torch cannot be imported), and
each heavy dependency is imported in its own room only."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BLOCK_TORCH

REPO = Path(__file__).resolve().parents[1]

RUNTIME_MODULES = [
    "densepure_rt",
    "densepure_rt.schedule",
    "densepure_rt.stats.cohen",
    "densepure_rt.stats.sequential",
    "densepure_rt.stats.vote",
    "densepure_rt.sampling.noise",
    "densepure_rt.sampling.philox",
    "densepure_rt.presets",
    "densepure_rt.errors",
    "densepure_rt.files.data",
    "densepure_rt.files.manifest",
    "densepure_rt.sampling.loop",
    "densepure_rt.sampling.device",
    "densepure_rt.executors.onnxrt",
    "densepure_rt.executors.openvino",
    "densepure_rt.executors.tensorrt",
    "densepure_rt.scale.work",
    "densepure_rt.runtime",
    "densepure_rt.files.results",
    "densepure_rt.files.report",
    "densepure_rt.cli",
]


@pytest.mark.parametrize("module", RUNTIME_MODULES)
def test_runtime_module_imports_without_torch(module):
    code = BLOCK_TORCH + f"import {module}\nassert 'torch' not in sys.modules\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_no_generic_top_level_packages_installed():
    code = "import importlib.util as u; print(u.find_spec('export'), u.find_spec('engine'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert result.stdout.split() == ["None", "None"]


def _imported_modules(path: Path) -> set:
    """Top-level names of every module a source file imports, at any depth of its code."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


#: Which files of the runtime may import each heavy dependency (docs/decisions.md, "Layout").
ALLOWED_IMPORTS = {
    "onnxruntime": {"executors/onnxrt.py"},
    "openvino": {"executors/openvino.py"},
    "tensorrt": {"executors/tensorrt.py"},
    "cupy": {"sampling/device.py"},
    "ray": {"scale/ray.py"},
    "torch": set(),
}


def test_each_dependency_is_imported_in_its_own_room_only():
    package = Path(__file__).resolve().parents[1] / "densepure_rt"
    seen = {name: set() for name in ALLOWED_IMPORTS}
    for path in package.rglob("*.py"):
        for name in _imported_modules(path) & set(ALLOWED_IMPORTS):
            seen[name].add(path.relative_to(package).as_posix())
    assert seen == ALLOWED_IMPORTS


def test_no_runtime_module_is_over_800_lines_and_no_data_reader_over_400():
    package = Path(__file__).resolve().parents[1] / "densepure_rt"
    sizes = {p.relative_to(package).as_posix(): len(p.read_text().splitlines()) for p in package.rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > 800} == {}
    assert {p: n for p, n in sizes.items() if p.startswith("files/data/") and p != "files/data/__init__.py" and n > 400} == {}


def test_the_public_api_is_importable_from_the_package_without_torch():
    code = BLOCK_TORCH + (
        "from densepure_rt import open_engine, Engine, Certificate, Prediction, CountsResult, open_dataset, read_results\n"
        "from densepure_rt.runtime import open_engine as direct\n"
        "assert open_engine is direct and 'torch' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


_ORT_SESSION = """
import densepure_rt, numpy as np, onnxruntime as ort
from onnx import TensorProto, helper
graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
assert session.run(None, {"x": np.array([-1.0], np.float32)})[0].tolist() == [0.0]
"""


@pytest.mark.parametrize("choice", [None, "0"])
def test_onnx_runtime_telemetry_is_off_unless_the_user_chose_it(tmp_path, choice):
    """ONNX Runtime (1.29+) writes a device id under ~/.cache/Microsoft and $TMPDIR/.ses and tries an
    upload at its first session; densepure-rt opts out unless the user set ORT_DISABLE_TELEMETRY.
    ONNX Runtime itself skips telemetry when a CI variable is set (CI, GITHUB_ACTIONS, JENKINS_URL, ...),
    so whether files appear with "0" depends on the machine: that case checks the user's choice is
    kept, the default case checks the variable is set before ONNX Runtime starts and nothing is written."""
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir(), tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME")}
    env.update(HOME=str(home), TMPDIR=str(tmp), **({"ORT_DISABLE_TELEMETRY": choice} if choice else {}))
    code = _ORT_SESSION + "import os; print(os.environ['ORT_DISABLE_TELEMETRY'])\n"
    result = subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO,
                            capture_output=True, text=True)
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    if choice is None:
        assert result.stdout.strip() == "1"
        assert written == []
    else:
        assert result.stdout.strip() == "0"
