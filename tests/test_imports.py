"""The runtime never imports torch: checked in a fresh interpreter where torch cannot be imported."""

import subprocess
import sys

import pytest

from conftest import BLOCK_TORCH

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
