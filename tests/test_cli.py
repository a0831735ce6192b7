"""The ``densepure-rt`` command line end to end on the CPU, on the shipped digits engine.

One engine is built per module (``build --model digits``: 1x16x16, 10 classes, trained weights) and
certifies the first 8 digits of its test split at sigma 0.6 with b = 2 steps and K = 2 votes: the
votes split there, so the rows hold abstentions and certificates with n_a < n and n_a = n, and the
row comparisons below compare real statistics, not constants. (An earlier version used the
random-weights ``tiny`` engine at b = 1, whose purified images turned out to be NaN.)
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from conftest import BLOCK_TORCH

from conftest import invoke
from densepure_rt.files.data import DIGITS_TEST_ASSET

#: One test process runs this module (``--dist loadgroup``): its module fixtures (the digits engine it
#: builds and its data) are set up once, not once in each process.
pytestmark = pytest.mark.xdist_group("cli")

HEADER6 = "idx\tlabel\tpredict\tradius\tcorrect\ttime"
SIGMA, N0, N, ALPHA, VOTES, STEPS = 0.6, 5, 20, 0.001, 2, 2
NUM_IMAGES = 8
SMALL = [
    "--sigma", str(SIGMA), "--steps", str(STEPS), "--votes", str(VOTES),
    "--n0", str(N0), "--n", str(N), "--alpha", str(ALPHA), "--quiet",
]
# The console script beside this interpreter, or the module if the venv has no script.
_SCRIPT = Path(sys.executable).with_name("densepure-rt")
CLI = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "densepure_rt.cli"]

# ------------------------------------------------------------------------------------------------ #
# helpers                                                                                            #
# ------------------------------------------------------------------------------------------------ #




def read_tsv(path: Path) -> tuple[list[str], list[dict]]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    return header, [dict(zip(header, line.split("\t"))) for line in lines[1:] if line]


def comparable(rows: list[dict]) -> list[dict]:
    """Rows without the wall-clock columns, sorted by idx."""
    kept = [{k: v for k, v in r.items() if k not in ("time", "seconds")} for r in rows]
    return sorted(kept, key=lambda r: int(r["idx"]))


def data_rows(path: Path) -> int:
    if not path.is_file():
        return 0
    return max(path.read_bytes().count(b"\n") - 1, 0)


def assert_one_line_error(exit_code: int, stderr: str) -> None:
    assert exit_code != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr


def assert_cli_error(result) -> str:
    """An in-process run that ended with the CLI's own one-line error (no uncaught exception)."""
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert_one_line_error(result.exit_code, result.stderr)
    return result.stderr.strip()


def certify_args(engine: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["certify", "--engine", str(engine), "--data", str(data), *SMALL, "--out", str(out), *extra]


# ------------------------------------------------------------------------------------------------ #
# fixtures                                                                                           #
# ------------------------------------------------------------------------------------------------ #


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def engine(work) -> Path:
    out = work / "eng"
    result = invoke("build", "--model", "digits", "--out", out)
    assert result.exit_code == 0, result.output
    assert "checks passed" in result.stdout
    assert (out / "manifest.json").is_file()
    assert not (work / ".eng.partial").exists()
    return out


@pytest.fixture(scope="module")
def images(work) -> Path:
    path = work / "images.npz"
    digits = np.load(DIGITS_TEST_ASSET)
    np.savez(path, images=digits["images"][:NUM_IMAGES], labels=digits["labels"][:NUM_IMAGES])
    return path


@pytest.fixture(scope="module")
def reference(work, engine, images) -> Path:
    """An uninterrupted certify run over all images (seed 0, --batch 7): the rows others must equal."""
    out = work / "reference.tsv"
    result = invoke(*certify_args(engine, images, out, "--batch", "7"))
    assert result.exit_code == 0, result.output
    return out


# ------------------------------------------------------------------------------------------------ #
# 1. end to end                                                                                      #
# ------------------------------------------------------------------------------------------------ #


def test_certify_writes_cohen_tsv_and_options_json(work, engine, images, reference):
    out = work / "e2e.tsv"
    result = invoke(*certify_args(engine, images, out, "--skip", "2", "--max", "7"))
    assert result.exit_code == 0, result.output
    assert "4 images certified" in result.stdout

    text = out.read_text(encoding="utf-8")
    assert text.startswith(HEADER6 + "\t") or text.startswith(HEADER6 + "\n")
    assert text.endswith("\n")
    header, rows = read_tsv(out)
    assert header[:6] == HEADER6.split("\t")
    assert [int(r["idx"]) for r in rows] == [0, 2, 4, 6]  # --skip 2 --max 7: one row per selected image
    labels = np.load(images)["labels"]
    assert [int(r["label"]) for r in rows] == [int(labels[i]) for i in (0, 2, 4, 6)]
    for r in rows:
        assert int(r["correct"]) == int(int(r["predict"]) == int(r["label"]))
    # Which images are selected never changes an image's noise: these rows are the reference's.
    _, ref_rows = read_tsv(reference)
    assert comparable(rows) == [r for r in comparable(ref_rows) if int(r["idx"]) in (0, 2, 4, 6)]

    options = json.loads(Path(str(out) + ".json").read_text())
    assert options["sigma"] == SIGMA
    assert options["steps"] == str(STEPS)
    assert options["votes"] == VOTES
    assert options["n0"] == N0
    assert options["n"] == N
    assert options["alpha"] == ALPHA
    assert options["seed"] == 0


def test_report_table_json_and_plot_match_rows_recomputed_here(work, reference):
    _, rows = read_tsv(reference)
    radii = [0.0, 0.25, 0.5, 0.75, 1.0]
    expected = [
        np.mean([int(r["correct"]) == 1 and float(r["radius"]) >= rad for r in rows]) for rad in radii
    ]
    assert expected[0] > 0 and expected[0] > expected[-1]  # the data give a non-trivial curve

    table_json, plot = work / "report.json", work / "curve.png"
    result = invoke("report", reference, "--json", table_json, "--plot", plot)
    assert result.exit_code == 0, result.output

    lines = result.stdout.splitlines()
    assert lines[0].split() == ["radius", "0.00", "0.25", "0.50", "0.75", "1.00", "images", "labelled"]
    row = next(line for line in lines if line.startswith(reference.name))
    assert row.split()[1:] == [f"{100 * a:.1f}%" for a in expected] + [str(NUM_IMAGES), str(NUM_IMAGES)]

    table = json.loads(table_json.read_text())
    assert table["radii"] == radii
    assert table["files"][str(reference)] == pytest.approx(expected)
    assert table["best"] == pytest.approx(expected)
    assert table["images"][str(reference)] == NUM_IMAGES

    with Image.open(plot) as im:
        assert im.format == "PNG"
        width, height = im.size
        assert 200 <= width <= 4000 and 150 <= height <= 4000
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.std() > 0
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10


def test_predict_and_info(work, engine, images):
    out = work / "pred.tsv"
    result = invoke(
        "predict", "--engine", engine, "--data", images, "--sigma", SIGMA, "--steps", STEPS,
        "--votes", VOTES, "--n", N, "--max", 3, "--out", out, "--quiet",
    )
    assert result.exit_code == 0, result.output
    assert "3 images" in result.stdout and "accuracy" in result.stdout
    header, rows = read_tsv(out)
    assert header[:5] == ["idx", "label", "predict", "correct", "time"]
    assert [int(r["idx"]) for r in rows] == [0, 1, 2]
    for r in rows:
        assert int(r["count1"]) + int(r["count2"]) <= N
        p = stats.binomtest(int(r["count1"]), int(r["count1"]) + int(r["count2"]), 0.5).pvalue
        assert float(r["p_value"]) == pytest.approx(p, rel=1e-5)
        assert (int(r["predict"]) == -1) == (p > ALPHA)

    result = invoke("info", "--engine", engine)
    assert result.exit_code == 0, result.output
    assert "verified" in result.stdout
    assert "digits" in result.stdout and "1x16x16" in result.stdout and "classes 10" in result.stdout
    result = invoke("info", "--engine", engine, "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["preset"] == "digits" and manifest["image_shape"] == [1, 16, 16]


# ------------------------------------------------------------------------------------------------ #
# 2. the certificate, recomputed independently                                                       #
# ------------------------------------------------------------------------------------------------ #


def test_radius_is_sigma_times_phi_inverse_of_clopper_pearson_bound(reference):
    _, rows = read_tsv(reference)
    branches = set()
    for r in rows:
        n_a = int(r["n_a"])
        p_a_lower = 0.0 if n_a == 0 else stats.beta.ppf(ALPHA, n_a, N - n_a + 1)
        assert float(r["p_a_lower"]) == pytest.approx(p_a_lower, rel=1e-5)
        # n_a is the count of c_a among the n estimation samples (top_counts lists class:count).
        counts = dict(map(int, pair.split(":")) for pair in r["top_counts"].split(","))
        assert counts.get(int(r["c_a"]), 0) == n_a and sum(counts.values()) <= N
        if p_a_lower < 0.5:
            assert int(r["predict"]) == -1 and float(r["radius"]) == 0.0
            branches.add("abstain")
        else:
            assert int(r["predict"]) == int(r["c_a"])
            assert float(r["radius"]) == pytest.approx(SIGMA * stats.norm.ppf(p_a_lower), rel=1e-5)
            branches.add("certified" if n_a == N else "certified, n_a < n")
    assert {"abstain", "certified, n_a < n"} <= branches  # both sides of the 0.5 test, n_a < n


# ------------------------------------------------------------------------------------------------ #
# 3. batch independence                                                                              #
# ------------------------------------------------------------------------------------------------ #


def test_rows_do_not_depend_on_batch_size(work, engine, images, reference):
    out = work / "batch3.tsv"
    result = invoke(*certify_args(engine, images, out, "--batch", "3"))
    assert result.exit_code == 0, result.output
    assert json.loads(Path(str(out) + ".json").read_text())["batch"] == 3
    assert json.loads(Path(str(reference) + ".json").read_text())["batch"] == 7
    _, rows3 = read_tsv(out)
    _, rows7 = read_tsv(reference)
    assert len(rows3) == NUM_IMAGES
    assert comparable(rows3) == comparable(rows7)


# ------------------------------------------------------------------------------------------------ #
# 4. resume                                                                                          #
# ------------------------------------------------------------------------------------------------ #


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_uninterrupted_rows(work, engine, images, reference):
    out = work / "killed.tsv"
    cmd = CLI + certify_args(engine, images, out, "--batch", "7")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while proc.poll() is None and time.time() < deadline:
            if data_rows(out) >= 1:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None and time.time() >= deadline:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_rows = data_rows(out)
    assert 1 <= killed_rows < NUM_IMAGES

    resume = CLI + certify_args(engine, images, out, "--batch", "7", "--resume")
    done = subprocess.run(resume, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stderr
    _, rows = read_tsv(out)
    idx = [int(r["idx"]) for r in rows]
    assert sorted(idx) == list(range(NUM_IMAGES))  # no duplicate, no missing index
    _, ref_rows = read_tsv(reference)
    assert comparable(rows) == comparable(ref_rows)


def test_existing_out_continues_with_same_settings_and_refuses_others(work, engine, images, reference):
    out = work / "guarded.tsv"
    shutil.copy(reference, out)
    shutil.copy(str(reference) + ".json", str(out) + ".json")
    before = (out.read_bytes(), Path(str(out) + ".json").read_bytes())

    args = certify_args(engine, images, out, "--batch", "7", "--resume")
    args[args.index("--sigma") + 1] = "0.5"
    message = assert_cli_error(invoke(*args))
    assert "sigma 0.6 -> 0.5" in message
    assert (out.read_bytes(), Path(str(out) + ".json").read_bytes()) == before

    # The same settings without --resume: the run continues the file (here: nothing left to do),
    # which is what a fresh run would write, since noise is a pure function of seed, image, sample.
    result = invoke(*certify_args(engine, images, out, "--batch", "3"))
    assert result.exit_code == 0, result.output
    assert f"{NUM_IMAGES} images done, 0 to go" in result.stderr
    assert (out.read_bytes(), Path(str(out) + ".json").read_bytes()) == before


def test_resume_drops_a_partial_last_line(work, engine, images, reference):
    out = work / "partial.tsv"
    lines = reference.read_text(encoding="utf-8").splitlines(keepends=True)
    # Header and three complete rows, then row idx 3 cut mid-write (no newline).
    partial = lines[4].rstrip("\n")[: len(lines[4]) // 2]
    assert partial.startswith("3\t")
    out.write_text("".join(lines[:4]) + partial, encoding="utf-8")
    shutil.copy(str(reference) + ".json", str(out) + ".json")

    result = invoke(*certify_args(engine, images, out, "--batch", "7", "--resume"))
    assert result.exit_code == 0, result.output
    text = out.read_text(encoding="utf-8")
    assert text.endswith("\n")
    _, rows = read_tsv(out)
    assert [int(r["idx"]) for r in rows] == list(range(NUM_IMAGES))
    assert all(len(r) == len(lines[0].split("\t")) for r in rows)
    _, ref_rows = read_tsv(reference)
    assert comparable(rows) == comparable(ref_rows)


# ------------------------------------------------------------------------------------------------ #
# 5. bad input: one line, non-zero exit, nothing half-written                                        #
# ------------------------------------------------------------------------------------------------ #


@pytest.fixture(scope="module")
def bad_inputs(work, engine) -> dict[str, Path]:
    """Corrupted copies of the engine and bad image files."""
    bad = work / "bad"
    bad.mkdir()
    edited = bad / "edited_manifest"
    shutil.copytree(engine, edited)
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["num_classes"] = 11
    (edited / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    flipped = bad / "flipped_byte"
    shutil.copytree(engine, flipped)
    data = bytearray((flipped / "step.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (flipped / "step.onnx").write_bytes(bytes(data))

    rng = np.random.default_rng(0)
    labels = np.zeros(3, dtype=np.int64)
    np.savez(bad / "size20.npz", images=rng.random((3, 1, 20, 20), dtype=np.float32), labels=labels)
    nan = rng.random((3, 1, 16, 16), dtype=np.float32)
    nan[1, 0, 5, 5] = np.nan
    np.savez(bad / "nan.npz", images=nan, labels=labels)
    return {"edited": edited, "flipped": flipped, "size20": bad / "size20.npz", "nan": bad / "nan.npz"}


CERTIFY_BAD = {
    "missing engine dir": ({"--engine": "missing"}, "does not exist"),
    "edited manifest": ({"--engine": "edited"}, "edited"),
    "changed file hash": ({"--engine": "flipped"}, "sha256"),
    "wrong image size": ({"--data": "size20"}, "1x20x20"),
    "NaN image": ({"--data": "nan"}, "NaN"),
    "sigma 0": ({"--sigma": "0"}, "'--sigma': 0.0 is not in the range x>0"),
    "sigma -1": ({"--sigma": "-1"}, "'--sigma': -1.0 is not in the range x>0"),
    "n0 0": ({"--n0": "0"}, "--n0 must be >= 1"),
    "n 0": ({"--n": "0"}, "--n must be >= 1"),
    "alpha 0": ({"--alpha": "0"}, "'--alpha': 0.0 is not in the range 0<x<1"),
    "alpha 1": ({"--alpha": "1"}, "'--alpha': 1.0 is not in the range 0<x<1"),
    "alpha 1.5": ({"--alpha": "1.5"}, "'--alpha': 1.5 is not in the range 0<x<1"),
}


@pytest.mark.parametrize("case", list(CERTIFY_BAD))
def test_certify_bad_input_is_one_line_error_and_writes_nothing(case, work, engine, images, bad_inputs):
    changes, needle = CERTIFY_BAD[case]
    out = work / "bad" / f"{case.replace(' ', '_')}.tsv"
    args = certify_args(engine, images, out)
    for flag, value in changes.items():
        value = str(work / "no-such-engine") if value == "missing" else str(bad_inputs.get(value, value))
        args[args.index(flag) + 1] = value
    message = assert_cli_error(invoke(*args))
    assert needle in message
    assert not out.exists()
    assert not Path(str(out) + ".json").exists()


def test_bad_input_error_is_one_line_from_the_real_console_script(work, engine, bad_inputs):
    out = work / "bad" / "subprocess.tsv"
    proc = subprocess.run(CLI + certify_args(engine, bad_inputs["nan"], out), capture_output=True, text=True)
    assert proc.returncode == 2
    assert_one_line_error(proc.returncode, proc.stderr)
    assert "NaN" in proc.stderr
    assert not out.exists() and not Path(str(out) + ".json").exists()


@pytest.fixture(scope="module")
def bad_checkpoints(work) -> dict[str, Path]:
    import torch
    from safetensors.torch import save_file

    from densepure_rt.export.unet import create_model

    folder = work / "ckpt"
    folder.mkdir()
    torch.save([1, 2, 3], folder / "list.pt")
    (folder / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    other = create_model(image_size=16, num_channels=64, num_res_blocks=1, channel_mult="1,2", learn_sigma=True)
    state = {k: v.contiguous() for k, v in other.state_dict().items()}
    torch.save(state, folder / "other_config.pt")
    save_file(state, str(folder / "other_config.safetensors"))
    return {p.stem + p.suffix: p for p in folder.iterdir()}


BUILD_BAD = {
    "unknown preset": (["--model", "nope"], "unknown preset"),
    "checkpoint is a list": (["--model", "tiny", "--diffusion-ckpt", "list.pt"], "state dict"),
    "checkpoint is random bytes": (["--model", "tiny", "--diffusion-ckpt", "random.pt"], "state dict"),
    "checkpoint of another config (.pt)": (
        ["--model", "tiny", "--diffusion-ckpt", "other_config.pt"], "does not match",
    ),
    "checkpoint of another config (.safetensors)": (
        ["--model", "tiny", "--diffusion-ckpt", "other_config.safetensors"], "does not match",
    ),
}


@pytest.mark.parametrize("case", list(BUILD_BAD))
def test_build_bad_input_is_one_line_error_and_leaves_no_engine(case, work, bad_checkpoints):
    args, needle = BUILD_BAD[case]
    args = [str(bad_checkpoints[a]) if a in bad_checkpoints else a for a in args]
    out = work / "bad" / ("engine_" + re.sub(r"\W+", "_", case))
    message = assert_cli_error(invoke("build", *args, "--out", out))
    assert needle in message
    assert not out.exists()
    assert not out.with_name(f".{out.name}.partial").exists()


# ------------------------------------------------------------------------------------------------ #
# 6. the runtime and the CLI need no torch                                                           #
# ------------------------------------------------------------------------------------------------ #


def test_cli_certifies_in_an_interpreter_where_torch_cannot_be_imported(work, engine, images, reference):
    out = work / "no_torch.tsv"
    argv = ["densepure-rt"] + certify_args(engine, images, out, "--batch", "7", "--max", "2")
    code = BLOCK_TORCH + (
        "import densepure_rt.cli, densepure_rt.runtime, densepure_rt.sampling.loop, densepure_rt.files.results\n"
        "import densepure_rt.files.report, densepure_rt.files.data, densepure_rt.files.manifest\n"
        "assert 'torch' not in sys.modules\n"
        f"sys.argv = {argv!r}\n"
        "try:\n"
        "    densepure_rt.cli.main()\n"
        "    status = 0\n"
        "except SystemExit as exc:\n"
        "    status = exc.code or 0\n"
        "assert status == 0, status\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('certified without torch')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "certified without torch" in proc.stdout
    _, rows = read_tsv(out)
    _, ref_rows = read_tsv(reference)
    assert comparable(rows) == comparable(ref_rows)[:2]


@pytest.mark.parametrize("steps, calls", [("none", 0), ("one-shot", 1), ("ONE-SHOT", 1)])
def test_the_word_paths_run_from_the_cli(steps, calls, work, engine, images):
    """--steps none (plain smoothing) and one-shot (Carlini et al.) run, and cost what they should."""
    out = work / f"words_{steps}.tsv"
    args = certify_args(engine, images, out, "--max", "2")
    args[args.index("--steps") + 1] = steps
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    _, rows = read_tsv(out)
    assert [int(r["idx"]) for r in rows] == [0, 1]
    assert json.loads(Path(f"{out}.json").read_text())["steps"] == steps.lower()
    # No reverse step for 'none'; one network call per run for one-shot (its K runs are identical,
    # so the vote is decided after the first wave of ceil(K/2) runs).
    assert all(int(r["unet_evals"]) == (N0 + N) * ((VOTES + 1) // 2) * calls for r in rows)
