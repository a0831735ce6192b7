"""Progress on long runs: the time left comes from the throughput measured once the first samples
are voted, and the sequential modes count images decided and samples used."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import densepure_rt.run as run_module
from conftest import build_digits_engine
from densepure_rt.run import Progress

_SCRIPT = Path(sys.executable).with_name("densepure-rt")
CLI = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "densepure_rt.cli"]


class Clock:
    def __init__(self):
        self.now = 1000.0

    def time(self):
        return self.now


def test_the_time_left_ignores_the_pipeline_fill_and_follows_the_rate(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(run_module.time, "time", clock.time)
    progress = Progress("certify", images=10, samples_per_image=100, quiet=True, every=30)
    clock.now += 20.0  # opening the engine and filling the pipeline: no sample voted yet
    assert progress.seconds_left() is None
    progress.update(50)  # the first call's samples
    for _ in range(9):  # then 50 samples every 2 s: 25 samples/s
        clock.now += 2.0
        progress.update(50)
    # 500 of 1000 samples done; 500 left at 25 samples/s is 20 s (a rate from the start would say 38 s).
    assert progress.seconds_left() == pytest.approx(20.0)


def test_sequential_runs_project_the_images_left(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(run_module.time, "time", clock.time)
    progress = Progress("certify", images=8, samples_per_image=2000, quiet=True, every=30, sequential=True)
    clock.now += 5.0
    progress.update(10)
    clock.now += 6.0
    progress.update(40)
    progress.image_done(skipped=1950)
    progress.image_done(skipped=1990)
    # 2 images decided in the 6 s since the first samples: 6 left take 18 s.
    assert progress.seconds_left() == pytest.approx(18.0)
    assert progress.samples == 50  # the budget a test did not use is not counted as used


@pytest.mark.slow
def test_the_time_left_is_within_30_percent_after_the_first_tenth(tmp_path_factory, tmp_path):
    engine = build_digits_engine(tmp_path_factory, "progress")
    args = [*CLI, "certify", "--engine", str(engine), "--sigma", "0.5", "--steps", "2", "--votes", "3", "--n0", "20",
            "--n", "150", "--skip", "10", "--max", "100", "--progress-every", "0.5", "--out", str(tmp_path / "r.tsv")]
    run = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in run.stderr:
        match = re.search(r"\((\d+)%\).*about (\d+):(\d\d):(\d\d) left", line)
        if match:
            done, h, m, s = map(int, match.groups())
            seen.append((time.monotonic(), done, 3600 * h + 60 * m + s))
    run.wait(timeout=600)
    end = time.monotonic()
    assert run.returncode == 0
    checked = [(eta, end - at) for at, done, eta in seen if done >= 10 and end - at >= 3.0]
    assert len(checked) >= 5, seen
    errors = [abs(eta - actual) / actual for eta, actual in checked]
    # ETAs are printed rounded to whole seconds: allow that second on top of 30%.
    assert all(abs(eta - actual) <= 0.3 * actual + 1.0 for eta, actual in checked), list(zip(checked, errors))
