"""Reproducible by anyone (issue 20): results are keyed to what the engine computes, not to the
build's date, so a rebuild from the same weights and settings continues old results files, and the
committed digits results continue in a fresh clone.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from densepure_rt.cli import main

from conftest import invoke

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--sigma", "0.5", "--steps", "2", "--votes", "3", "--n0", "10", "--n", "40", "--skip", "30", "--quiet"]




def rows_without_time(path: Path) -> list[list[str]]:
    return [line.split("\t")[:5] + line.split("\t")[6:] for line in Path(path).read_text().splitlines()]


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["digits", "digits_k10"])
def test_committed_digits_results_continue_on_a_fresh_engine(folder, tmp_path):
    """The digits experiment (docs/benchmarks.md), run again in a fresh clone: every committed results file of
    the current noise and engine format is complete and continues on a freshly built engine
    (nothing to compute). The K = 10 sweep (digits_k10) was recorded with format-2 engines (one row
    of step scalars per call): such a file is refused in one line that names the format change."""
    from densepure_rt.files.manifest import SCHEMA_VERSION
    from densepure_rt.sampling.noise import NOISE_VERSION

    engine = tmp_path / "digits"
    assert invoke("build", "--model", "digits", "--out", engine).exit_code == 0
    checked = old_format = 0
    for tsv in sorted((ROOT / "benchmarks" / "results" / folder).glob("*.tsv")):
        options_file = Path(f"{tsv}.json")
        if not options_file.is_file():
            continue  # wall-time tables
        options = json.loads(options_file.read_text())
        if options.get("noise") != NOISE_VERSION or options.get("mode") != "certify":
            continue
        copy = tmp_path / tsv.name
        if options.get("engine_format", 2) != SCHEMA_VERSION:
            shutil.copy(tsv, copy)
            shutil.copy(options_file, f"{copy}.json")
            result = invoke("certify", "--engine", engine, "--sigma", options["sigma"], "--steps", options["steps"],
                            "--votes", options["votes"], "--n0", options["n0"], "--n", options["n"], "--alpha", options["alpha"],
                            "--skip", options["skip"], "--seed", options["seed"], "--quiet", "--out", copy)
            assert result.exit_code == 2 and f"engine format 2 -> {SCHEMA_VERSION}" in result.stderr, result.output
            assert copy.read_bytes() == tsv.read_bytes()
            old_format += 1
            continue
        shutil.copy(tsv, copy)
        shutil.copy(options_file, f"{copy}.json")
        args = ["certify", "--engine", engine, "--sigma", options["sigma"], "--steps", options["steps"], "--votes", options["votes"],
                "--n0", options["n0"], "--n", options["n"], "--alpha", options["alpha"], "--skip", options["skip"],
                "--seed", options["seed"], "--quiet", "--out", copy]
        result = invoke(*args)
        assert result.exit_code == 0, (tsv.name, result.output)
        assert copy.read_bytes() == tsv.read_bytes()  # complete: not one row added or changed
        checked += 1
    if folder == "digits":
        assert checked >= 6 and old_format == 0
    else:
        assert old_format >= 6 and checked == 0


# ------------------------------------------------------------------------------------------------ #
# the newcomer's friction (issue 20, items 5-10)                                                    #
# ------------------------------------------------------------------------------------------------ #

import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

_SCRIPT = Path(sys.executable).with_name("densepure-rt")
CLI = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "densepure_rt.cli"]


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated (SIGTERM)"), (signal.SIGINT, 130, "interrupted")])
def test_an_interrupted_build_leaves_nothing_and_says_so(sig, code, word, tmp_path):
    out = tmp_path / "eng"
    build = subprocess.Popen(CLI + ["build", "--model", "digits", "--out", str(out)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".eng.*.partial")):  # the export has started
        assert build.poll() is None and time.time() < deadline, build.stderr.read() if build.poll() is not None else "timeout"
        time.sleep(0.02)
    build.send_signal(sig)
    _, stderr = build.communicate(timeout=120)
    assert build.returncode == code, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(word) and "no engine was written" in last and "rows" not in last
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no engine, no work folder


def test_random_weights_engines_say_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert invoke("build", "--model", "tiny", "--random-weights").exit_code == 0
    engine = tmp_path / "engines" / "tiny-random"
    assert (engine / "manifest.json").is_file() and not (tmp_path / "engines" / "tiny").exists()
    import numpy as np

    np.savez(tmp_path / "x.npz", images=np.full((1, 3, 16, 16), 0.5, dtype=np.float32), labels=np.array([1]))
    result = CliRunner().invoke(main, ["certify", "--engine", "engines/tiny-random", "--data", "x.npz", "--sigma", "0.5",
                                       "--steps", "1", "--votes", "1", "--n0", "2", "--n", "5", "--quiet", "--out", "r.tsv"])
    assert result.exit_code == 0, result.output
    assert "[random-weights engine: these numbers mean nothing]" in result.stdout  # --quiet: the summary says it
    loud = CliRunner().invoke(main, ["certify", "--engine", "engines/tiny-random", "--data", "x.npz", "--sigma", "0.5",
                                     "--steps", "1", "--votes", "1", "--n0", "2", "--n", "5", "--out", "r2.tsv"])
    assert re.search(r"warning: \S*engines/tiny-random was built with --random-weights", loud.stderr), loud.stderr
    assert json.loads((tmp_path / "r.tsv.json").read_text())["random_weights"] is True


@pytest.mark.slow
def test_report_summarises_predict_files_and_they_are_ignored_by_git(tmp_path):
    engine = tmp_path / "digits"
    assert invoke("build", "--model", "digits", "--out", engine).exit_code == 0
    out = tmp_path / "predict.tsv"
    result = invoke("predict", "--engine", engine, "--sigma", "0.25", "--steps", "2", "--votes", "3", "--n", "20",
                    "--max", "40", "--skip", "10", "--quiet", "--out", out)
    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in out.read_text().splitlines()[1:]]
    accuracy = sum(r[3] == "1" for r in rows) / len(rows)
    abstained = sum(r[2] == "-1" for r in rows)
    report = invoke("report", out)
    assert report.exit_code == 0, report.output
    line = next(x for x in report.stdout.splitlines() if x.startswith("predict.tsv"))
    assert line.split() == ["predict.tsv", f"{100 * accuracy:.1f}%", str(len(rows)), str(len(rows)), str(abstained)]
    # The default outputs of certify and predict (COMMAND.tsv and its options) are ignored by git.
    names = ["certify.tsv", "certify.tsv.json", "predict.tsv", "predict.tsv.json"]
    ignored = subprocess.run(["git", "check-ignore", *names], cwd=ROOT, capture_output=True, text=True)
    assert ignored.stdout.split() == names


def test_build_checks_its_flags_before_importing_torch(tmp_path):
    """A missing checkpoint, or a preset without weights, is one line from an interpreter where torch
    cannot even be imported: the check comes first (importing torch and timm takes seconds)."""
    from conftest import BLOCK_TORCH

    program = BLOCK_TORCH + "import sys; from densepure_rt.cli import main; sys.exit(main())"
    cases = [
        (["--model", "cifar10", "--diffusion-ckpt", str(tmp_path / "missing.pt")], "--diffusion-ckpt"),
        (["--model", "tiny"], "the tiny preset has no weights to load: build it with --random-weights"),
        (["--model", "imagenet"], "needs a diffusion checkpoint"),
    ]
    for args, needle in cases:
        proc = subprocess.run([sys.executable, "-c", program, "build", *args, "--out", str(tmp_path / "e")], capture_output=True,
                              text=True, cwd=tmp_path, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and needle in proc.stderr and "random-weights (or --random-weights" not in proc.stderr


def test_an_openvino_bf16_build_says_what_it_runs_in(tmp_path):
    pytest.importorskip("openvino")
    result = invoke("build", "--model", "tiny", "--random-weights", "--backend", "openvino", "--precision", "bf16",
                    "--no-validate", "--out", tmp_path / "ov")
    assert result.exit_code == 0, result.output
    assert "exporting the denoise-step graph (fp32; OpenVINO runs it in bf16)" in result.stderr


@pytest.mark.slow
def test_the_readme_python_snippets_run_as_written(tmp_path, monkeypatch):
    """Every ```python block of the README's "Python API" section, verbatim, in an empty folder
    (the blocks open the digits engine shipped in the package)."""
    import re

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    section = section[: section.index("\n## ", 4)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    pairs = [s.result for s in sorted(namespace["done"], key=lambda s: s.idx)]
    certs = [c for c, _ in pairs]
    assert len(certs) == 4 and [s.idx for s in sorted(namespace["done"], key=lambda s: s.idx)] == [0, 1, 2, 3]
    assert int(pairs[0][1].counts.sum()) == 100
    assert namespace["cert"] == certs[0]  # image 0 alone and within the batch of four: one certificate
    # Each certificate is CERTIFY of its counts, recomputed with scipy (alpha 0.001, sigma 0.5).
    from scipy import stats

    for cert, counts in pairs:
        c_a = int(np.argmax(counts.counts0))
        n_a = int(counts.counts[c_a])
        p_a = stats.beta.ppf(0.001, n_a, 100 - n_a + 1) if n_a > 0 else 0.0
        assert cert.c_a == c_a and cert.n_a == n_a
        if p_a < 0.5:
            assert cert.prediction == -1 and cert.radius == 0.0
        else:
            assert cert.prediction == c_a and cert.radius == pytest.approx(0.5 * stats.norm.ppf(p_a), rel=1e-9)
