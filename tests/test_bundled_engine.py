"""The digits engine shipped inside the package: what `build --model digits` writes, byte for byte,
and enough for an install without torch to certify."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import BLOCK_TORCH, ROOT, build_digits_engine
from densepure_rt.cli import main
from densepure_rt.files.manifest import BUNDLED_ENGINE, engine_identity, load_manifest

FAST = ["--sigma", "0.5", "--steps", "1", "--votes", "1", "--n0", "5", "--n", "20", "--skip", "100", "--max", "250", "--quiet"]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def rows_without_time(path: Path) -> list[list[str]]:
    return [line.split("\t")[:5] + line.split("\t")[6:] for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return build_digits_engine(tmp_path_factory, "bundled")


def test_the_bundled_engine_is_what_build_writes(built):
    shipped = load_manifest(BUNDLED_ENGINE)  # verifies every checksum
    fresh = load_manifest(built)
    assert sorted(shipped["files"]) == sorted(fresh["files"]) == ["classifier.onnx", "step.onnx"]
    for name in shipped["files"]:
        assert sha256(BUNDLED_ENGINE / name) == sha256(built / name), f"{name} differs from a fresh build: rebuild the bundled engine"
    assert engine_identity(shipped) == engine_identity(fresh)
    assert shipped["build"]["inputs"] == fresh["build"]["inputs"]


@pytest.mark.slow
def test_a_wheel_certifies_with_its_bundled_engine_where_torch_cannot_be_imported(built, tmp_path):
    # The wheel is built from a copy of the checkout (its build folder stays out of the tree).
    source = tmp_path / "src"
    source.mkdir()
    for name in ("densepure_rt", "export", "engine"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("densepure_rt-*.whl")
    installed = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        assert {f"densepure_rt/assets/engines/digits/{n}" for n in ("manifest.json", "step.onnx", "classifier.onnx")} <= set(archive.namelist())
        archive.extractall(installed)

    out = tmp_path / "lean.tsv"
    code = BLOCK_TORCH + (
        "import densepure_rt, densepure_rt.cli\n"
        f"assert densepure_rt.__file__.startswith({str(installed)!r}), densepure_rt.__file__\n"
        f"sys.argv = ['densepure-rt', 'certify', *{FAST!r}, '--out', {str(out)!r}]\n"
        "try:\n"
        "    densepure_rt.cli.main()\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "assert 'torch' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={"PYTHONPATH": str(installed), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    options = json.loads(Path(f"{out}.json").read_text())
    assert options["engine"].startswith(str(installed))

    reference = tmp_path / "reference.tsv"
    result = CliRunner().invoke(main, ["certify", "--engine", str(built), *FAST, "--out", str(reference)])
    assert result.exit_code == 0, result.output
    assert rows_without_time(out) == rows_without_time(reference)
    assert len(rows_without_time(out)) == 1 + 3
