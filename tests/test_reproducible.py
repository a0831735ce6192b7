"""Reproducible by anyone (issue 20): results are keyed to what the engine computes, not to the
build's date, so a rebuild from the same weights and settings continues old results files, and the
committed digits results continue in a fresh clone.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from densepure_rt.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--sigma", "0.5", "--steps", "2", "--votes", "3", "--n0", "10", "--n", "40", "--skip", "30", "--quiet"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def rows_without_time(path: Path) -> list[list[str]]:
    return [line.split("\t")[:5] + line.split("\t")[6:] for line in Path(path).read_text().splitlines()]


def test_a_rebuilt_engine_continues_results_and_a_changed_graph_is_refused(tmp_path):
    engine = tmp_path / "engines" / "digits"
    assert invoke("build", "--model", "digits", "--out", engine).exit_code == 0
    first_manifest = (engine / "manifest.json").read_bytes()
    whole, part = tmp_path / "whole.tsv", tmp_path / "part.tsv"
    assert invoke("certify", "--engine", engine, *SMALL, "--out", whole).exit_code == 0
    assert invoke("certify", "--engine", engine, *SMALL, "--out", part).exit_code == 0
    lines = part.read_text().splitlines(keepends=True)
    assert len(lines) == 13  # header + 12 images
    part.write_text("".join(lines[:5]))  # a run that stopped after 4 images

    result = invoke("build", "--model", "digits", "--force", "--out", engine)
    assert result.exit_code == 0, result.output
    assert (engine / "manifest.json").read_bytes() != first_manifest  # another build date and timings...
    options = json.loads(Path(f"{part}.json").read_text())
    assert options["engine_manifest_sha256"] == json.loads(first_manifest)["manifest_sha256"]

    result = invoke("certify", "--engine", engine, *SMALL, "--out", part)  # ...but the same graphs
    assert result.exit_code == 0, result.output
    assert rows_without_time(part) == rows_without_time(whole)

    # A changed graph (one byte of the classifier, the manifest sealed again) is another engine.
    tampered = tmp_path / "tampered"
    shutil.copytree(engine, tampered)
    graph = tampered / "classifier.onnx"
    data = bytearray(graph.read_bytes())
    data[-1] ^= 1
    graph.write_bytes(bytes(data))
    manifest = json.loads((tampered / "manifest.json").read_text())
    manifest["files"]["classifier.onnx"] = hashlib.sha256(bytes(data)).hexdigest()
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    manifest["manifest_sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    (tampered / "manifest.json").write_text(json.dumps(manifest))
    result = invoke("certify", "--engine", tampered, *SMALL, "--out", part)
    assert result.exit_code == 2 and "engine_id" in result.stderr, result.output


@pytest.mark.parametrize("folder", ["digits", "digits_k10"])
def test_committed_digits_results_continue_on_a_fresh_engine(folder, tmp_path):
    """The README's digits experiment, run again in a fresh clone: every committed results file of
    the current noise is complete and continues on a freshly built engine (nothing to compute)."""
    from densepure_rt.noise import NOISE_VERSION

    engine = tmp_path / "digits"
    assert invoke("build", "--model", "digits", "--out", engine).exit_code == 0
    checked = 0
    for tsv in sorted((ROOT / "benchmarks" / "results" / folder).glob("*.tsv")):
        options_file = Path(f"{tsv}.json")
        if not options_file.is_file():
            continue  # wall-time tables
        options = json.loads(options_file.read_text())
        if options.get("noise") != NOISE_VERSION or options.get("mode") != "certify":
            continue
        copy = tmp_path / tsv.name
        shutil.copy(tsv, copy)
        shutil.copy(options_file, f"{copy}.json")
        args = ["certify", "--engine", engine, "--sigma", options["sigma"], "--steps", options["steps"], "--votes", options["votes"],
                "--n0", options["n0"], "--n", options["n"], "--alpha", options["alpha"], "--skip", options["skip"],
                "--seed", options["seed"], "--quiet", "--out", copy]
        result = invoke(*args)
        assert result.exit_code == 0, (tsv.name, result.output)
        assert copy.read_bytes() == tsv.read_bytes()  # complete: not one row added or changed
        checked += 1
    assert checked >= 6
