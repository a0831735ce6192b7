"""Shared test helpers: where the parity fixtures live, and loading them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Two test processes share the machine's cores (README: "Run the tests"): each runs its engines, torch
# and BLAS on one thread, as a user running several processes on one machine would
# (docs/backends.md, "Threads"), rather than two pools spinning on every core each. Subprocesses
# the tests start inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _variable in ("DENSEPURE_RT_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_variable, "1")

ROOT = Path(__file__).resolve().parents[1]
# The fixtures ship with the repository (tests/fixtures, see its README.md); DENSEPURE_FIXTURES
# points the tests at another copy.
FIXTURES = Path(os.environ.get("DENSEPURE_FIXTURES", ROOT / "tests" / "fixtures"))

#: Code to prepend to a ``python -c`` program so that any import of torch fails in it.
BLOCK_TORCH = (
    "import sys\n"
    "class _Block:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'torch' or name.startswith('torch.'):\n"
    "            raise ImportError('torch is blocked in this test')\n"
    "sys.meta_path.insert(0, _Block())\n"
)

UNET_FIXTURES = ("guided_diffusion_unet", "improved_diffusion_unet")
REVERSE_FIXTURES = (
    "densepure_guided_sigma0.5_b4",
    "densepure_guided_sigma0.25_onestep",
    "densepure_improved_sigma0.25_b3",
)


def fixture_dir(name: str) -> Path:
    """Path of one fixture folder; a missing folder is a failure, never a skip."""
    path = FIXTURES / name
    if not path.is_dir():
        pytest.fail(
            f"parity fixture {path} is missing: the tests read tests/fixtures/ in the repository "
            "(or the folder DENSEPURE_FIXTURES names)"
        )
    return path


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def load_fixture_unet(name: str, fp16: bool = False):
    """The fixture UNet (strictly loaded) and its config."""
    from safetensors.torch import load_file

    from densepure_rt.export.checkpoints import load_strict
    from densepure_rt.export.unet import create_model

    folder = fixture_dir(name)
    cfg = read_json(folder / "config.json")
    model = create_model(**cfg["create_model_kwargs"]).eval()
    load_strict(model, load_file(str(folder / "state_dict.safetensors")))
    if fp16:
        model.convert_to_fp16()
    return model, cfg


def fixture_schedule(cfg: dict):
    """The BetaSchedule named by a reverse fixture's ``schedule`` entry (e.g. 'linear-1000')."""
    from densepure_rt.schedule import make_schedule

    kind, steps = cfg["schedule"].split("-")
    return make_schedule(kind, int(steps))


def run_labels(engine, image, sigma, steps, votes, seed: int, image_index: int, phase: int, samples):
    """Per-run labels [len(samples) x votes] int64 of noisy samples ``samples`` of ``image`` through an
    opened engine's graphs (its loop's purify and classify) with the sampling path's noise
    (:func:`densepure_rt.sampling.noise.sample_noise`: run k of sample b is row b * K + k), on the host."""
    from densepure_rt.sampling.noise import sample_noise

    rs = engine._prepare(sigma, steps, votes, len(samples))
    delta, z = sample_noise(seed, image_index, phase, samples, votes, rs.num_calls, image.shape, sigma)
    x_t = rs.input_scale * (2 * (image[None] + delta) - 1)
    purified = engine.loop.purify(x_t.repeat(votes, axis=0), z)
    return engine.loop.classify(purified).reshape(len(samples), votes)


def run_label_agreement(reference, other, images, cupy, sigma, steps, votes, count: int = 6, samples: int = 32) -> tuple[int, int]:
    """(agreeing, all) per-run labels of two opened engines on the same noise: ``samples``
    estimation samples x ``votes`` runs of each of the first ``count`` images (:func:`run_labels`).
    For the `gpu` tests that compare a reduced-precision GPU engine with the fp32 CPU one
    (``cupy``: kept for their calls; the labels come back on the host)."""
    from densepure_rt.sampling.noise import ESTIMATION

    agree = rows = 0
    for i in range(count):
        a = run_labels(reference, images[i], sigma, steps, votes, 0, i, ESTIMATION, range(samples))
        b = run_labels(other, images[i], sigma, steps, votes, 0, i, ESTIMATION, range(samples))
        agree += int((a == b).sum())
        rows += a.size
    return agree, rows


def gpu_cupy():
    """CuPy with a usable CUDA device, or a skip (the `gpu` tests run wherever both exist)."""
    import pytest

    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except Exception:  # noqa: BLE001 - no driver
        pytest.skip("no CUDA driver")
    return cupy


def invoke(*args, **kwargs):
    """The CLI in this process (click's CliRunner; stdout and stderr kept apart): arguments may be
    str, Path or bytes (a path that is not UTF-8), keyword arguments go to ``CliRunner.invoke``."""
    from click.testing import CliRunner

    from densepure_rt.cli import main

    return CliRunner().invoke(main, [os.fsdecode(a) if isinstance(a, (bytes, Path)) else str(a) for a in args], **kwargs)


def build_digits_engine(tmp_path_factory, folder: str) -> Path:
    """The digits engine (shipped weights, fp32) in a fresh temporary folder of its own: built through
    the CLI once per test session, then copied (the build is deterministic: tests/test_bundled_engine.py
    checks that its graphs are the shipped ones), so a test may change its copy."""
    import shutil

    from click.testing import CliRunner

    from densepure_rt.cli import main

    built = tmp_path_factory.getbasetemp() / "digits-engine-built" / "digits"
    if not (built / "manifest.json").is_file():
        result = CliRunner().invoke(main, ["build", "--model", "digits", "--out", str(built)])
        assert result.exit_code == 0, result.output
    out = tmp_path_factory.mktemp(folder) / "digits"
    shutil.copytree(built, out)
    return out


def digits_test_images(count: int):
    """The first ``count`` images of the shipped digits test split, [N x 1 x 16 x 16] float32 in [0, 1]."""
    import numpy as np

    from densepure_rt.files.data import DIGITS_TEST_ASSET

    imgs = np.load(DIGITS_TEST_ASSET)["images"][:count].astype(np.float32)
    if imgs.ndim == 3:
        imgs = imgs[:, None]
    return imgs / 255.0 if imgs.max() > 1.5 else imgs


def sample_counts(engine, image, num: int, phase: int, *, seed: int, image_index: int):
    """Per-class counts [num_classes] int64 of the voted labels of samples 0 .. num - 1 of ``phase`` of
    ``image`` through an opened engine's scheduler, after ``engine._prepare(...)`` (its settings and
    rows per call): the parity tests' view of an engine."""
    from densepure_rt.sampling.scheduler import Job

    image = engine._image(image, image_index)
    staged = engine.loop.device.stage(image[None])
    return engine.scheduler().counts(staged, [Job(0, int(image_index), int(phase), int(num))], seed)[0]
