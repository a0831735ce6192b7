"""Many images through one scheduler run (densepure_rt/sampling/stream.py, ``Engine.stream``, the CLI)
against each image computed alone.

On the shipped digits engine (trained weights, sigma 0.5 where votes split): every image's
certificate, prediction, counts and test decisions equal what the engine's per-image methods give
for it alone (whose counts and decisions equal the step-by-step oracle's: tests/test_loop.py), for
any bound on the images in flight and any round; fixed-n UNet evaluations are equal too. Rows are
written as images finish; a run killed mid-stream resumes to the same rows.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import build_digits_engine, digits_test_images
from densepure_rt.cli import main
from densepure_rt.files.results import read_results
from densepure_rt.runtime import open_engine
from densepure_rt.spec import RunSpec

SIGMA, STEPS, VOTES, SEED = 0.5, 2, 3, 3
CLI = [sys.executable, "-m", "densepure_rt.cli"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    return build_digits_engine(tmp_path_factory, "stream")


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return digits_test_images(4)


def _alone(eng, mode, image, idx, round_size):
    common = dict(seed=SEED, image_index=idx, batch=8)
    if mode == "certify":
        cert, counts = eng.certify_counts(image, SIGMA, STEPS, VOTES, 10, 40, 0.001, **common)
        return (cert, tuple(counts.counts0), tuple(counts.counts)), counts.unet_evals
    if mode == "predict":
        return eng.predict(image, SIGMA, STEPS, VOTES, 40, 0.001, **common), None
    if mode == "certify-radii":
        r = eng.certify_radii(image, SIGMA, [0.25, 0.5], STEPS, VOTES, 10, 120, 0.001, round_size=round_size, **common)
        return (r.prediction, r.radius, r.c_a, r.n_a, r.n, r.decisions), None
    r = eng.certify_until(image, SIGMA, 0.05, STEPS, VOTES, 10, 120, 0.001, round_size=round_size, **common)
    return (r.prediction, r.radius, r.c_a, r.n_a, r.n, r.reason, r.p_a_lower), None


def _streamed(result, mode):
    if mode == "certify":
        cert, counts = result
        return cert, tuple(counts.counts0), tuple(counts.counts)
    if mode == "predict":
        return result
    if mode == "certify-radii":
        return result.prediction, result.radius, result.c_a, result.n_a, result.n, result.decisions
    return result.prediction, result.radius, result.c_a, result.n_a, result.n, result.reason, result.p_a_lower


@pytest.mark.parametrize("mode,in_flight,round_size", [
    ("certify", None, None), ("certify", 1, None), ("predict", 2, None),
    ("certify-radii", None, 1), ("certify-radii", 1, 4), ("certify-until", 2, 1),
])
@pytest.mark.slow
def test_each_streamed_image_equals_the_image_alone(engine, images, mode, in_flight, round_size):
    with open_engine(engine) as eng:
        got = []
        n = 120 if mode.startswith("certify-") else 40
        extra = {"certify-radii": dict(radii=(0.25, 0.5), round_size=round_size),
                 "certify-until": dict(tol=0.05, round_size=round_size)}.get(mode, {})
        spec = RunSpec(mode, SIGMA, STEPS, VOTES, n0=10, n=n, alpha=0.001, seed=SEED, batch=8, **extra)
        stats = eng.stream(spec, [(20 + k, img) for k, img in enumerate(images)], got.append, in_flight=in_flight)
        assert sorted(s.idx for s in got) == [20 + k for k in range(len(images))]  # each image once
        for s in got:
            want, evals = _alone(eng, mode, images[s.idx - 20], s.idx, round_size)
            assert _streamed(s.result, mode) == want
            if evals is not None:  # fixed n: every sample runs, so the work is the image's own
                assert s.unet_evals == evals
        assert stats.idle_rows == 0 or stats.calls <= 2  # every call full but at the very end


@pytest.mark.slow
def test_the_stream_fills_calls_with_other_images(engine, images):
    """Rounds of one vote: one image at a time (in flight alone, as each single-image call runs), a
    test's bounded samples leave most of each call's rows free; streamed together, those rows go to
    the other images' samples. The same decisions, in fewer engine calls, for no more work."""
    spec = RunSpec("certify-radii", SIGMA, STEPS, VOTES, n0=10, n=150, alpha=0.001, radii=(0.25,), seed=SEED, batch=8,
                   round_size=1)
    with open_engine(engine) as eng:
        alone, together = [], []
        one_by_one = eng.stream(spec, list(enumerate(images)), alone.append, in_flight=1)
        streamed = eng.stream(spec, list(enumerate(images)), together.append)
    decided = lambda got: {s.idx: (s.result.c_a, s.result.n, s.result.n_a, s.result.decisions) for s in got}  # noqa: E731
    assert decided(together) == decided(alone) and len(alone) == len(images)
    print(f"calls: {one_by_one.calls} one image at a time, {streamed.calls} streamed; UNet evaluations "
          f"{one_by_one.unet_evals} and {streamed.unet_evals}")
    assert streamed.calls < 0.75 * one_by_one.calls
    assert streamed.unet_evals <= 1.02 * one_by_one.unet_evals


def test_stream_refuses_bad_bounds(engine, images):
    from densepure_rt.errors import ConfigError

    with open_engine(engine) as eng:
        with pytest.raises(ConfigError, match="images in flight"):
            eng.stream("certify", [(0, images[0])], print, sigma=SIGMA, in_flight=0)
        with pytest.raises(ConfigError, match="round_size must be an integer"):
            eng.stream("certify-radii", [(0, images[0])], print, sigma=SIGMA, radii=[0.25], round_size=0)
        bad = images[0].copy()
        bad[0, 0, 0] = np.nan
        got = []
        with pytest.raises(Exception, match="(?i)nan|finite"):
            eng.stream("certify", [(0, images[0]), (1, bad)], got.append, sigma=SIGMA, steps=STEPS, votes=VOTES, n0=5, n=5,
                       in_flight=1)
        assert [s.idx for s in got] == [0]  # the image before the bad one finished and was emitted


def _certify(out: Path, *extra: str) -> list[str]:
    return ["certify", "--engine", str(extra[0]), "--sigma", str(SIGMA), "--steps", str(STEPS), "--votes", str(VOTES),
            "--max", "5", "--batch", "8", "--seed", str(SEED), "--out", str(out), "--quiet", *extra[1:]]


def _rows(path: Path) -> dict:
    """Rows by image index, without the wall-clock time and the work (sequential tests' dropped
    samples depend on what else was in flight)."""
    text = path.read_text().splitlines()
    header = text[0].split("\t")
    rows = {}
    for line in text[1:]:
        cells = dict(zip(header, line.split("\t")))
        assert cells["idx"] not in rows
        rows[cells["idx"]] = {k: v for k, v in cells.items() if k not in ("time", "unet_evals")}
    return rows


@pytest.mark.parametrize("extra", [["--n0", "10", "--n", "40"], ["--radius", "0.25", "--n-max", "100", "--round", "4"],
                                   ["--tol", "0.05", "--n-max", "100", "--round", "4"]])
@pytest.mark.slow
def test_cli_rows_do_not_depend_on_the_images_in_flight(engine, tmp_path, extra):
    one, three = tmp_path / "one.tsv", tmp_path / "three.tsv"
    runner = CliRunner()
    r1 = runner.invoke(main, _certify(one, engine, *extra))
    assert r1.exit_code == 0, r1.output
    r2 = runner.invoke(main, _certify(three, engine, *extra, "--images-per-call", "3"))
    assert r2.exit_code == 0, r2.output
    assert _rows(three) == _rows(one) and len(_rows(one)) == 5
    options = json.loads(Path(str(three) + ".json").read_text())
    assert options["images_per_call"] == 3 and "scheduling" not in options
    if "--n" in extra:  # fixed n: the work is each image's own, so unet_evals match too
        evals = [{r["idx"]: r["unet_evals"] for r in read_results(path)} for path in (three, one)]
        assert evals[0] == evals[1]


def test_cli_round_defaults_to_one(engine, tmp_path):
    out = tmp_path / "r.tsv"
    result = CliRunner().invoke(main, _certify(out, engine, "--radius", "0.25", "--n-max", "100"))
    assert result.exit_code == 0, result.output
    assert json.loads(Path(str(out) + ".json").read_text())["round"] == 1


def test_a_file_of_the_scheduler_resumes_and_one_of_the_wave_loop_is_refused(engine, tmp_path):
    """A results file whose options were written by 0.2.0 with "scheduling": "continuous" continues
    (its rows are this version's); one with "scheduling": "waves" is refused in one line naming the
    change, and left as it was."""
    args = ["--n0", "10", "--n", "40"]
    out = tmp_path / "r.tsv"
    assert CliRunner().invoke(main, _certify(out, engine, *args, "--max", "3")).exit_code == 0
    rows = out.read_bytes()
    options_file = Path(f"{out}.json")
    options = json.loads(options_file.read_text())
    for written_by, ok in (("continuous", True), ("waves", False)):
        out.write_bytes(rows)
        options_file.write_text(json.dumps({**options, "scheduling": written_by, "version": "0.2.0"}, indent=2))
        result = CliRunner().invoke(main, _certify(out, engine, *args, "--max", "3"))
        assert out.read_bytes() == rows  # complete: nothing added, nothing changed
        if ok:
            assert result.exit_code == 0, result.output
        else:
            assert result.exit_code == 2 and "--scheduling waves" in result.stderr and "choose another --out" in result.stderr
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.slow
def test_a_streamed_run_killed_mid_stream_resumes_to_the_same_rows(engine, tmp_path):
    args = ["--radius", "0.25", "--n-max", "200", "--images-per-call", "2"]
    reference = tmp_path / "reference.tsv"
    done = subprocess.run(CLI + _certify(reference, engine, *args), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "killed.tsv"
    proc = subprocess.Popen(CLI + _certify(out, engine, *args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while proc.poll() is None and time.time() < deadline:
            if out.exists() and len(out.read_text().splitlines()) >= 2:  # header and one row
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert 1 <= len(_rows(out)) < 5
    resumed = subprocess.run(CLI + _certify(out, engine, *args, "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert _rows(out) == _rows(reference)
