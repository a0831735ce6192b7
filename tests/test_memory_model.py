"""The memory model of densepure_rt.limits: hand-worked numbers for the tiny preset, and refusals in
one line when the modelled peak does not fit (the machine's memory is monkeypatched; nothing large
is allocated). The model's agreement with measured peaks is a benchmark
(benchmarks/memory_peak.py, benchmarks/results/memory/), not a test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from densepure_rt import limits
from densepure_rt.cli import main
from densepure_rt.errors import ConfigError, cli_message

#: The tiny preset as its manifest records it (worked out by hand in tests/test_hardening.py
#: and checked against the built manifest there): 3 x 16 x 16 images; the UNet's largest tensor
#: per row is its first decoder concatenation, 96 x 16 x 16; the classifier's its first
#: convolution's output, 16 x 16 x 16.
TINY = {"image_shape": [3, 16, 16],
        "graphs": {"step": {"max_elements_per_row": 96 * 16 * 16}, "classifier": {"max_elements_per_row": 16 * 16 * 16}}}


def test_tiny_preset_estimate_equals_hand_worked_numbers():
    # 2,000 rows, graph files of 1,000,000 bytes, classifier chunk 512 (its default: the engine allows
    # (2^31 - 1) // 4096 = 524,287 rows):
    #   fixed      150,000,000 + 1.5 x 1,000,000                  =   151,500,000
    #   buffers    4 x 2,000 x 16 x 768                           =    98,304,000
    #   step       4 x 2,000 x 9 x 24,576                         = 1,769,472,000
    #   classifier 4 x 512 x 6.5 x 4,096                          =    54,525,952
    estimate = limits.memory_estimate(TINY, 2000, weights_bytes=1_000_000)
    assert (estimate.fixed, estimate.buffers, estimate.step, estimate.classifier) == (
        151_500_000, 98_304_000, 1_769_472_000, 54_525_952)
    assert estimate.total == 2_073_801_952
    assert estimate.variable == 1_922_301_952
    # 100 rows: the classifier's chunk is the 100 rows; no weights given.
    small = limits.memory_estimate(TINY, 100)
    assert (small.fixed, small.buffers, small.step, small.classifier) == (150_000_000, 4_915_200, 88_473_600, 10_649_600)
    # A classifier of at most 64 rows per call (an executor's limit).
    assert limits.memory_estimate(TINY, 2000, classifier_rows=64).classifier == 4 * 64 * 6.5 * 4096


def test_rows_whose_modelled_peak_exceeds_the_available_memory_are_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(limits, "available_memory", lambda device: 2**30)  # 1 GiB available
    monkeypatch.setattr(limits, "resident_memory", lambda: 151_500_000)  # the process holds the fixed part
    with pytest.raises(ConfigError) as caught:
        limits.check_rows(TINY, 1000, 2, "cpu", weights_bytes=1_000_000)
    # 2,073,801,952 bytes = 1.93 GiB at the peak, 1,922,301,952 = 1.79 GiB more than held. The largest
    # batch that fits: 2b rows need 2b x (4 x 16 x 768 + 4 x 9 x 24,576) + 54,525,952 = 2b x 933,888
    # + 54,525,952 <= 2^30, so 2b <= 1,091.4 and b = 545. The API names its parameters, the CLI its flags.
    assert str(caught.value) == ("batch 1000 x votes 2 = 2000 rows per call needs about 1.9 GiB of memory at its peak, "
                                 "1.8 GiB more than this process holds, and the machine has 1.0 GiB available: use batch 545 or less")
    assert cli_message(caught.value) == (
        "--batch 1000 x --votes 2 = 2000 rows per call needs about 1.9 GiB of memory at its peak, "
        "1.8 GiB more than this process holds, and the machine has 1.0 GiB available: use --batch 545 or less")
    limits.check_rows(TINY, 545, 2, "cpu", weights_bytes=1_000_000)  # 1,072,463,872 bytes: fits
    with pytest.raises(ConfigError, match="use batch 545 or less"):
        limits.check_rows(TINY, 546, 2, "cpu", weights_bytes=1_000_000)  # 1,074,331,648 bytes: does not


def test_fixed_cost_not_yet_held_counts_and_the_gpu_counts_only_what_grows(monkeypatch):
    monkeypatch.setattr(limits, "available_memory", lambda device: 2**30)
    monkeypatch.setattr(limits, "resident_memory", lambda: 0)
    # 1,072,463,872 bytes grow with 1,090 rows; on the CPU another 151,500,000 are not held yet.
    with pytest.raises(ConfigError, match="1.1 GiB more than this process holds, and the machine has 1.0 GiB"):
        limits.check_rows(TINY, 545, 2, "cpu", weights_bytes=1_000_000)
    limits.check_rows(TINY, 545, 2, "cuda", weights_bytes=1_000_000)  # the GPU holds the weights already
    with pytest.raises(ConfigError, match="needs about 1.0 GiB of GPU memory for its rows and the GPU has 1.0 GiB "
                                          "available: use batch 545 or less"):
        limits.check_rows(TINY, 546, 2, "cuda", weights_bytes=1_000_000)


def test_even_one_sample_too_many_says_to_use_fewer_votes(monkeypatch):
    monkeypatch.setattr(limits, "available_memory", lambda device: 10**6)
    monkeypatch.setattr(limits, "resident_memory", lambda: 10**9)
    with pytest.raises(ConfigError, match=r"even batch 1 does not fit: use fewer votes than 10, or free memory$"):
        limits.check_rows(TINY, 4, 10, "cpu")


# ------------------------------------------------------------------------------------------------ #
# Through the engine and the CLI                                                                     #
# ------------------------------------------------------------------------------------------------ #


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("memory") / "eng"
    result = CliRunner().invoke(main, ["build", "--model", "tiny", "--random-weights", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow
def test_engine_counts_its_graph_files_and_classifier_chunk(engine, monkeypatch):
    from densepure_rt.runtime import open_engine

    manifest = json.loads((engine / "manifest.json").read_text())
    weights = (engine / "step.onnx").stat().st_size + (engine / "classifier.onnx").stat().st_size
    # 20 rows, chunk 20; nothing held yet: everything is needed.
    need = (150_000_000 + round(1.5 * weights) + 4 * 20 * 16 * 768 + round(4 * 20 * 9 * 24576) + round(4 * 20 * 6.5 * 4096))
    assert need == limits.memory_estimate(manifest, 20, weights).total
    monkeypatch.setattr(limits, "resident_memory", lambda: 0)
    with open_engine(engine) as opened:
        monkeypatch.setattr(limits, "available_memory", lambda device: need)
        opened.check_rows(10, 2)
        monkeypatch.setattr(limits, "available_memory", lambda device: need - 1)
        with pytest.raises(ConfigError, match="20 rows per call needs about"):
            opened.check_rows(10, 2)


@pytest.mark.slow
def test_certify_refuses_rows_that_do_not_fit_before_writing_anything(engine, tmp_path, monkeypatch):
    import numpy as np

    images = tmp_path / "images.npz"
    np.savez(images, images=np.zeros((2, 3, 16, 16), np.float32))
    monkeypatch.setattr(limits, "available_memory", lambda device: 2**28)  # 0.25 GiB
    out = tmp_path / "r.tsv"
    result = CliRunner().invoke(main, ["certify", "--engine", str(engine), "--data", str(images), "--sigma", "0.5", "--steps", "1",
                                       "--votes", "2", "--n0", "5", "--n", "100000", "--batch", "5000", "--quiet", "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --batch 5000 x --votes 2 = 10000 rows per call needs about"), lines
    assert "the machine has 0.2 GiB available: use --batch" in lines[0]
    assert not out.exists() and not Path(f"{out}.json").exists()
