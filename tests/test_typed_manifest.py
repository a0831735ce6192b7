"""The manifest is parsed and verified once into a typed, frozen Manifest that every consumer takes;
nothing else in the runtime reads its JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

import densepure_rt.files.manifest as manifest_module
from densepure_rt.cli import main
from densepure_rt.files.manifest import BUNDLED_ENGINE, GraphInfo, Manifest, ScheduleInfo, load_manifest

ROOT = Path(__file__).resolve().parents[1]


def test_the_manifest_is_typed_and_frozen():
    raw = json.loads((BUNDLED_ENGINE / "manifest.json").read_text())  # read here, independently
    m = load_manifest(BUNDLED_ENGINE)
    assert isinstance(m, Manifest)
    assert m.preset == raw["preset"] == "digits"
    assert m.image_shape == tuple(raw["image_shape"]) == (1, 16, 16)
    assert m.num_classes == raw["num_classes"] == 10
    assert m.schedule == ScheduleInfo(raw["schedule"]["kind"], raw["schedule"]["num_timesteps"], raw["schedule"]["rescale_timesteps"])
    assert m.graphs["step"] == GraphInfo(raw["graphs"]["step"]["file"], raw["graphs"]["step"]["max_elements_per_row"])
    assert m.backend == raw["backend"]["name"] and m.step_precision == raw["precision"]["step"]
    assert m.manifest_sha256 == raw["manifest_sha256"] and dict(m.files) == raw["files"]
    assert m.directory == BUNDLED_ENGINE and m.random_weights is False
    assert m.to_dict() == raw
    with pytest.raises(AttributeError):
        m.preset = "cifar10"
    with pytest.raises(TypeError):
        m["graphs"]["step"]["file"] = "other.onnx"
    with pytest.raises(TypeError):
        m.files["extra.onnx"] = "0" * 64
    copy = m.to_dict()
    copy["preset"] = "changed"  # a copy is a plain dict
    assert m.preset == "digits"


def test_one_certify_run_parses_the_manifest_once(tmp_path, monkeypatch):
    reads = []
    real = manifest_module._read_manifest
    monkeypatch.setattr(manifest_module, "_read_manifest", lambda directory: reads.append(directory) or real(directory))
    result = CliRunner().invoke(main, ["certify", "--sigma", "0.5", "--steps", "1", "--votes", "1", "--n0", "5", "--n", "20",
                                       "--skip", "90", "--quiet", "--out", str(tmp_path / "r.tsv")])
    assert result.exit_code == 0, result.output
    assert len(reads) == 1, reads


#: A read of the manifest's JSON: an index or .get on something named manifest, or json.load(s) of manifest.json.
READS = re.compile(r"manifest\s*(\[|\.get\()|manifest\.json.*json\.load|json\.load.*manifest\.json|MANIFEST\)\.read")


def test_no_runtime_module_reads_the_manifest_json_but_files_manifest():
    found = []
    for path in sorted((ROOT / "densepure_rt").rglob("*.py")):
        if path == ROOT / "densepure_rt" / "files" / "manifest.py":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#")[0]
            if READS.search(code) and not code.strip().startswith(('"""', "``")):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, found
