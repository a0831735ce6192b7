"""Hardening: the defects a hostile run found against the CLI, the schedule and the results file.

Each test here failed on the code before the fix. Engines are the tiny random-weights preset
(built once per module), plus "hostile" engines whose ONNX graphs are written here with the onnx
package (a step graph that outputs NaN, a classifier that answers a class the engine does not
have) and whose manifest is re-sealed here, independently of the code under test.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from densepure_rt.cli import QUICKSTART

from conftest import invoke
from densepure_rt.errors import ConfigError
from densepure_rt.schedule import cosine_schedule, linear_schedule, max_steps, reverse_schedule, t_star

ROOT = Path(__file__).resolve().parents[1]
_SCRIPT = Path(sys.executable).with_name("densepure-rt")
CLI = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "densepure_rt.cli"]
SMALL = ["--sigma", "1.0", "--steps", "1", "--votes", "2", "--n0", "5", "--n", "20", "--quiet"]
NUM_IMAGES = 30




def one_line_error(result) -> str:
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def reseal(directory: Path, manifest: dict) -> None:
    """Recompute every file checksum and the manifest's own checksum, as a hostile user would."""
    manifest = dict(manifest)
    manifest["files"] = {name: sha256(directory / name) for name in manifest["files"]}
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    manifest["manifest_sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ #
# fixtures                                                                                           #
# ------------------------------------------------------------------------------------------------ #


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hardening")


@pytest.fixture(scope="module")
def engine(work) -> Path:
    out = work / "eng"
    result = invoke("build", "--model", "tiny", "--random-weights", "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def images(work) -> Path:
    rng = np.random.default_rng(7)
    path = work / "images.npz"
    np.savez(path, images=rng.random((NUM_IMAGES, 3, 16, 16), dtype=np.float32), labels=rng.integers(0, 10, NUM_IMAGES))
    return path


@pytest.fixture(scope="module")
def reference(work, engine, images) -> Path:
    out = work / "reference.tsv"
    result = invoke("certify", "--engine", engine, "--data", images, *SMALL, "--out", out)
    assert result.exit_code == 0, result.output
    return out


def _hostile_graphs(directory: Path, step: str, label: int) -> None:
    """Write step.onnx (``step``: 'nan' -> x_next = x / 0 - x / 0, i.e. NaN) and classifier.onnx
    (every image gets class ``label``) with the engine's input and output names."""
    import onnx
    from onnx import TensorProto, helper

    img = ["batch", 3, 16, 16]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, img)
    noise = helper.make_tensor_value_info("noise", TensorProto.FLOAT, img)
    scalars = helper.make_tensor_value_info("scalars", TensorProto.FLOAT, ["batch", 8])
    out = helper.make_tensor_value_info("x_next", TensorProto.FLOAT, img)
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    nodes = [
        helper.make_node("Div", ["x", "zero"], ["inf"]),
        helper.make_node("Sub", ["inf", "inf"], ["nan"]),
        helper.make_node("Add", ["nan", "noise"], ["x_next"]),
    ]
    if step != "nan":
        nodes = [helper.make_node("Identity", ["x"], ["x_next"])]
    graph = helper.make_graph(nodes, "step", [x, noise, scalars], [out], initializer=[zero] if step == "nan" else [])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), directory / "step.onnx")

    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, img)
    labels = helper.make_tensor_value_info("labels", TensorProto.INT64, ["batch"])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["mean"], axes=[1, 2, 3], keepdims=0),  # [batch]
        helper.make_node("Mul", ["mean", "fzero"], ["zeros"]),
        helper.make_node("Cast", ["zeros"], ["izeros"], to=TensorProto.INT64),
        helper.make_node("Add", ["izeros", "label"], ["labels"]),
        helper.make_node("Unsqueeze", ["zeros", "axis1"], ["col"]),
        helper.make_node("Tile", ["col", "reps"], ["logits"]),
    ]
    init = [
        helper.make_tensor("fzero", TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor("label", TensorProto.INT64, [], [label]),
        helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
        helper.make_tensor("reps", TensorProto.INT64, [2], [1, 10]),
    ]
    graph = helper.make_graph(nodes, "classifier", [image], [labels, logits], initializer=init)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), directory / "classifier.onnx")


@pytest.fixture(scope="module")
def hostile(work, engine):
    """Re-sealed copies of the engine with hostile graphs: 'nan' (NaN purified images, class 0)
    and 'label10' (an identity step and a classifier that answers class 10 of 10)."""
    made = {}
    for name, step, label in (("nan", "nan", 0), ("label10", "identity", 10)):
        folder = work / f"hostile_{name}"
        shutil.copytree(engine, folder)
        _hostile_graphs(folder, step, label)
        reseal(folder, json.loads((folder / "manifest.json").read_text()))
        made[name] = folder
    return made


# ------------------------------------------------------------------------------------------------ #
# 1. build --force never deletes what is not an engine                                               #
# ------------------------------------------------------------------------------------------------ #


def test_force_refuses_the_working_folder_and_deletes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "precious.txt").write_text("keep me")
    before = tree(tmp_path)
    result = invoke("build", "--model", "tiny", "--random-weights", "--force", "--out", ".")
    message = one_line_error(result)
    assert "working folder" in message
    assert "building" not in result.stderr
    assert tree(tmp_path) == before


# Never run a build at "/" from a test: if a regression let it through, it would delete the machine
# (an early check of this very test against the old code did exactly that to a developer machine).
# "/" is checked on the decision function alone, which deletes nothing whatever it answers.
def test_root_is_never_replaceable():
    from densepure_rt.engine.build import check_out_dir

    for force in (False, True):
        with pytest.raises(ConfigError, match="root of the file system"):
            check_out_dir("/", force=force)


@pytest.mark.parametrize("target", ["..", "home"])
def test_force_refuses_ancestors_and_home(target, tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "work").mkdir(parents=True)
    (home / "notes.txt").write_text("keep me")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home / "work")
    out = str(home) if target == "home" else target
    before = tree(home)
    message = one_line_error(invoke("build", "--model", "tiny", "--random-weights", "--force", "--out", out))
    assert "cannot be replaced" in message
    assert tree(home) == before


def test_force_refuses_a_folder_that_is_not_an_engine(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / "manifest.json").write_text('{"name": "someone else\'s manifest"}')
    before = tree(folder)
    message = one_line_error(invoke("build", "--model", "tiny", "--random-weights", "--force", "--out", folder))
    assert "not a densepure-rt engine" in message
    assert tree(folder) == before
    assert [p.name for p in tmp_path.iterdir()] == ["photos"]  # no staging folder left behind


@pytest.mark.slow
def test_force_replaces_an_engine_and_reuse_skips_an_identical_build(tmp_path):
    out = tmp_path / "eng"
    assert invoke("build", "--model", "tiny", "--random-weights", "--out", out).exit_code == 0
    first = tree(out)
    # Identical settings and weights: verified and reused, nothing rewritten.
    result = invoke("build", "--model", "tiny", "--random-weights", "--out", out)
    assert result.exit_code == 0, result.output
    assert "up to date" in result.stdout and "building" not in result.stderr
    assert tree(out) == first
    # Other weights (another seed) without --force: refused, the engine untouched.
    message = one_line_error(invoke("build", "--model", "tiny", "--random-weights", "--seed", "1", "--out", out))
    assert "--force" in message
    assert tree(out) == first
    # With --force: replaced by the new build.
    result = invoke("build", "--model", "tiny", "--random-weights", "--seed", "1", "--force", "--out", out)
    assert result.exit_code == 0, result.output
    assert tree(out)["step.onnx"] != first["step.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eng"]


# ------------------------------------------------------------------------------------------------ #
# 2. no silent wrong certificates from a non-finite schedule                                         #
# ------------------------------------------------------------------------------------------------ #


def _official_taus(ts: float, b: int) -> list[int]:
    """DensePure's fast-sampling timesteps, written out here from docs/design.md section 1.4."""
    return [round(ts - i * ts / b) for i in range(b)]


def test_valid_steps_give_finite_schedules_and_one_more_is_refused():
    rng = np.random.default_rng(3)
    for schedule in (linear_schedule(1000), cosine_schedule(4000)):
        for sigma in np.exp(rng.uniform(np.log(0.004), np.log(4.0), 25)):
            ts = t_star(schedule, sigma)
            top = max_steps(schedule, sigma)
            assert top == int(np.floor(ts + 1e-9))
            for b in sorted({1, top // 2, top} & set(range(1, top + 1))):
                rs = reverse_schedule(schedule, sigma, b)
                assert np.isfinite(rs.scalars).all()
                assert list(rs.taus) == _official_taus(ts, b)
                assert len(set(rs.taus)) == b and min(rs.taus) >= 1
            with pytest.raises(ValueError, match=f"between 1 and {top}|no multi-step run fits"):
                reverse_schedule(schedule, sigma, top + 1)


@pytest.mark.parametrize(
    "sigma, steps, needle",
    [("0.01", "4", "between 1 and 2"), ("0.02", "10", "between 1 and 8"), ("0.5", "300", "between 1 and 258"), ("100", "4", "beyond")],
)
def test_certify_refuses_a_schedule_that_would_be_nan(sigma, steps, needle, work, engine, images):
    out = work / f"nan_sched_{sigma}_{steps}.tsv"
    args = ["certify", "--engine", engine, "--data", images, *SMALL, "--out", out]
    args[args.index("--sigma") + 1], args[args.index("--steps") + 1] = sigma, steps
    assert needle in one_line_error(invoke(*args))
    assert not out.exists() and not Path(f"{out}.json").exists()


def test_non_finite_purified_images_are_an_engine_error_not_class_0(work, hostile, images):
    out = work / "nan_engine.tsv"
    result = invoke("certify", "--engine", hostile["nan"], "--data", images, *SMALL, "--out", out)
    assert "non-finite" in one_line_error(result)
    # Nothing half-written: the run failed on its first image, so no file blocks a re-run.
    assert not out.exists() and not Path(f"{out}.json").exists() and not Path(f"{out}.lock").exists()


# ------------------------------------------------------------------------------------------------ #
# 5. labels outside the engine's classes                                                             #
# ------------------------------------------------------------------------------------------------ #


def test_out_of_range_labels_are_an_engine_error(work, hostile, images):
    out = work / "label10.tsv"
    message = one_line_error(invoke("certify", "--engine", hostile["label10"], "--data", images, *SMALL, "--out", out))
    assert "label 10" in message and "10 classes" in message
    assert not out.exists()


def test_api_counts_sum_to_the_samples_drawn(engine, images):
    from densepure_rt.runtime import open_engine

    image = np.load(images)["images"][0]
    with open_engine(engine) as eng:
        cert, counts = eng.certify_counts(image, 1.0, 1, 2, 7, 23, 0.001, batch=5, image_index=0)
    assert counts.counts0.sum() == 7 and counts.counts.sum() == 23
    assert cert.n_a == counts.counts[cert.c_a]
    p_low = stats.beta.ppf(0.001, cert.n_a, 23 - cert.n_a + 1) if cert.n_a else 0.0
    assert cert.p_a_lower == pytest.approx(p_low, rel=1e-9)


# ------------------------------------------------------------------------------------------------ #
# 3. one writer per results file; report refuses duplicates                                          #
# ------------------------------------------------------------------------------------------------ #


@pytest.mark.slow
def test_second_run_on_the_same_out_is_refused_naming_the_holder(work, engine, images, reference):
    import fcntl

    out = work / "locked.tsv"
    slow = ["certify", "--engine", str(engine), "--data", str(images), *SMALL, "--out", str(out)]
    slow[slow.index("--n") + 1] = "2000"  # long enough to be caught running
    first = subprocess.Popen(CLI + slow, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not Path(f"{out}.lock").exists() and time.time() < deadline:
            time.sleep(0.05)
        second = subprocess.run(CLI + slow, capture_output=True, text=True)
        assert first.poll() is None, "the first run ended before the second started"
        rows_before = out.read_text() if out.exists() else ""
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [second.stderr.strip()]
    assert f"PID {first.pid}" in second.stderr
    assert (out.read_text() if out.exists() else "").startswith(rows_before)  # the second run wrote nothing
    # The kernel dropped the killed holder's lock: the next run can take it.
    fd = os.open(f"{out}.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_report_refuses_a_file_with_duplicate_images(work, reference):
    dup = work / "dup.tsv"
    lines = reference.read_text().splitlines(keepends=True)
    dup.write_text("".join(lines + [lines[3]]))
    message = one_line_error(invoke("report", dup))
    assert "twice" in message and f"image {lines[3].split()[0]}" in message


# ------------------------------------------------------------------------------------------------ #
# tracebacks that became one line                                                                    #
# ------------------------------------------------------------------------------------------------ #


def _damaged(work: Path, reference: Path, name: str, edit) -> Path:
    out = work / f"damaged_{name}.tsv"
    shutil.copy(reference, out)
    shutil.copy(f"{reference}.json", f"{out}.json")
    edit(out)
    return out


DAMAGE = {
    "garbage middle row": (lambda p: p.write_text(_replace_line(p, 4, "garbage\n")), "line 4"),
    "edited middle row": (lambda p: p.write_text(_replace_line(p, 3, _edit_field(p, 3, 3, "-0.5"))), "radius"),
    "too few columns": (lambda p: p.write_text(_replace_line(p, 2, "\t".join(_fields(p, 2)[:4]) + "\n")), "columns"),
    "binary file": (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe" * 10), "not"),
    "corrupt options json": (lambda p: Path(f"{p}.json").write_text('{"sigma": 1.0, '), "corrupt"),
    "options json not an object": (lambda p: Path(f"{p}.json").write_text("[1, 2, 3]\n"), "not a JSON object"),
    "foreign image index": (lambda p: p.write_text(_replace_line(p, 2, _edit_field(p, 2, 0, "999"))), "999"),
}


def _fields(path: Path, line: int) -> list[str]:
    return path.read_text().splitlines()[line - 1].split("\t")


def _edit_field(path: Path, line: int, column: int, value: str) -> str:
    fields = _fields(path, line)
    fields[column] = value
    return "\t".join(fields) + "\n"


def _replace_line(path: Path, line: int, text: str) -> str:
    lines = path.read_text().splitlines(keepends=True)
    lines[line - 1] = text
    return "".join(lines)


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_results_or_options_are_one_line_and_left_untouched(case, work, engine, images, reference):
    edit, needle = DAMAGE[case]
    out = _damaged(work, reference, case.replace(" ", "_"), edit)
    before = (out.read_bytes(), Path(f"{out}.json").read_bytes())
    message = one_line_error(invoke("certify", "--engine", engine, "--data", images, *SMALL, "--out", out, "--resume"))
    assert needle in message
    assert (out.read_bytes(), Path(f"{out}.json").read_bytes()) == before


def test_unwritable_out_is_one_line(work, engine, images):
    blocker = work / "a_file"
    blocker.write_text("not a folder")
    message = one_line_error(invoke("certify", "--engine", engine, "--data", images, *SMALL, "--out", blocker / "r.tsv"))
    assert "a_file" in message


def test_out_that_is_not_a_regular_file_is_refused(work, engine, images):
    link = work / "devnull.tsv"
    link.symlink_to("/dev/null")
    Path(f"{link}.json").write_text("{}")
    message = one_line_error(invoke("certify", "--engine", engine, "--data", images, *SMALL, "--out", link))
    assert "not a regular file" in message


def test_long_out_names_work_up_to_the_limit_and_are_refused_beyond(work, engine, images, reference):
    ok = work / ("r" * 246 + ".tsv")  # 250 bytes: the old '.tsv.json.tmp' name overflowed NAME_MAX
    result = invoke("certify", "--engine", engine, "--data", images, *SMALL, "--max", "2", "--out", ok)
    assert result.exit_code == 0, result.output
    assert [line.split("\t")[0] for line in ok.read_text().splitlines()[1:]] == ["0", "1"]
    too_long = work / ("r" * 247 + ".tsv")
    assert "shorter name" in one_line_error(invoke("certify", "--engine", engine, "--data", images, *SMALL, "--out", too_long))
    assert not too_long.exists()


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow
def test_full_disk_mid_run_is_one_line_and_the_rerun_completes(work, engine):
    """A file-size limit (RLIMIT_FSIZE) stands in for a full disk: writes past it fail with EFBIG,
    through the same code path as ENOSPC."""
    out = work / "full.tsv"
    # More images than the module's, so that the results file outgrows the options file.
    many = work / "full-disk-images.npz"
    rng = np.random.default_rng(8)
    np.savez(many, images=rng.random((3 * NUM_IMAGES, 3, 16, 16), dtype=np.float32), labels=rng.integers(0, 10, 3 * NUM_IMAGES))
    args = CLI + ["certify", "--engine", str(engine), "--data", str(many), *SMALL, "--out", str(out)]
    # A probe run with the same arguments gives the sizes of this run's options file and results,
    # and the rows an uninterrupted run writes.
    assert subprocess.run(args, capture_output=True).returncode == 0
    options_size, results_size = len(Path(f"{out}.json").read_bytes()), out.stat().st_size
    reference = work / "full-reference.tsv"
    out.rename(reference)
    Path(f"{out}.json").unlink()
    limit = options_size + 100  # the options and the first rows fit; the whole file does not
    assert limit < results_size - 100
    proc = subprocess.run(args, capture_output=True, text=True, preexec_fn=_limit_file_size(limit))
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "File too large" in proc.stderr
    kept = out.read_text().splitlines()
    assert 1 < len(kept) < 3 * NUM_IMAGES + 1
    proc = subprocess.run(args, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    strip = lambda p: [line.split("\t")[:5] + line.split("\t")[6:] for line in p.read_text().splitlines()]  # noqa: E731
    assert strip(out) == strip(reference)


# ------------------------------------------------------------------------------------------------ #
# smaller                                                                                            #
# ------------------------------------------------------------------------------------------------ #


@pytest.mark.parametrize(
    "flag, value, needle",
    [("--batch", "0", "--batch"), ("--steps", "0", "one-shot"), ("--steps", "-1", "none"), ("--votes", "0", "--votes")],
)
def test_zero_and_negative_counts_are_refused(flag, value, needle, work, engine, images):
    out = work / f"zero_{flag}_{value}.tsv"
    args = ["certify", "--engine", engine, "--data", images, *SMALL, "--out", out]
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    result = invoke(*args)
    assert result.exit_code == 2 and needle in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_pickled_checkpoint_message_does_not_suggest_running_its_code(tmp_path):
    import torch

    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a whole pickled module
    message = one_line_error(invoke("build", "--model", "tiny", "--diffusion-ckpt", tmp_path / "module.pt", "--out", tmp_path / "e"))
    assert "weights_only" not in message
    assert "state_dict" in message and "safetensors" in message
    assert not (tmp_path / "e").exists()


# ------------------------------------------------------------------------------------------------ #
# found by running the README as a new user                                                          #
# ------------------------------------------------------------------------------------------------ #


def test_readme_quick_start_is_the_help_quick_start():
    readme = (ROOT / "README.md").read_text()
    help_text = invoke("--help").stdout
    for command in QUICKSTART:
        assert command in readme
        assert command in help_text


def test_info_takes_the_engine_as_every_command_does(engine):
    result = invoke("info", "--engine", engine)
    assert result.exit_code == 0, result.output
    assert "verified" in result.stdout and "tiny" in result.stdout
    shipped = invoke("info", "--json")  # no --engine: the shipped digits engine, as certify's default
    assert shipped.exit_code == 0 and json.loads(shipped.stdout)["preset"] == "digits"


def test_certify_prints_a_summary_not_the_table_and_logs_progress_lines(work, engine, images, reference):
    out = work / "logged.tsv"
    args = CLI + ["certify", "--engine", str(engine), "--data", str(images), *SMALL[:-1], "--max", "4", "--progress-every", "0", "--out", str(out)]
    proc = subprocess.run(args, capture_output=True, text=True)  # stderr is a pipe, not a terminal
    assert proc.returncode == 0, proc.stderr
    progress = [line for line in proc.stderr.splitlines() if line.startswith("certify: ")]
    assert len(progress) >= 4 and "4/4 images, 100/100 samples (100%)" in progress[-1]
    assert "radius  " not in proc.stdout and len(proc.stdout.strip().splitlines()) == 1
    rows = [line.split("\t") for line in out.read_text().splitlines()[1:]]
    acc0 = np.mean([r[4] == "1" for r in rows])
    assert f"certified accuracy {100 * acc0:.1f}% at radius 0" in proc.stdout


def test_sigma_help_says_what_sigma_is():
    text = " ".join(invoke("certify", "--help").stdout.split())
    assert "standard deviation of the Gaussian noise" in text and "[0, 1] pixel units" not in text


def test_results_have_one_time_column_and_options_record_the_engine_absolute_and_the_data_as_given(work, engine, images, monkeypatch):
    monkeypatch.chdir(work)
    result = invoke("certify", "--engine", "eng", "--data", "images.npz", *SMALL, "--max", "1", "--out", "given.tsv")
    assert result.exit_code == 0, result.output
    assert (work / "given.tsv").read_text().splitlines()[0].split("\t") == [
        "idx", "label", "predict", "radius", "correct", "time", "n_a", "p_a_lower", "c_a", "top_counts", "unet_evals",
    ]
    options = json.loads((work / "given.tsv.json").read_text())
    assert options["engine"] == str(engine.resolve()) and options["data"] == "images.npz"
    assert options["engine_manifest_sha256"] == json.loads((engine / "manifest.json").read_text())["manifest_sha256"]
    # The data's identity is what was certified: index, label, shape and float32 pixels of image 0.
    with np.load(images) as arrays:
        image, label = arrays["images"][0].astype("<f4"), int(arrays["labels"][0])
    content = np.array([0, label, *image.shape], dtype="<i8").tobytes() + image.tobytes()
    assert options["data_content_sha256"] == hashlib.sha256(content).hexdigest()
    assert str(work) not in json.dumps({k: v for k, v in options.items() if k != "engine"})


def test_manifest_records_the_real_input_shape_and_counted_flops(engine, tmp_path):
    manifest = json.loads((engine / "manifest.json").read_text())
    # The tiny classifier (SmallCNN, width 16, 3 x 16 x 16 input) counted by hand, 2 FLOPs per MAC:
    # conv 3->16 3x3 at 16x16, avg-pool, conv 16->32 3x3 at 8x8, linear 32->10.
    by_hand = 2 * (3 * 16 * 9 * 16 * 16 + 16 * 32 * 9 * 8 * 8 + 32 * 10)
    assert manifest["cost_gflop"]["classifier"] == pytest.approx(by_hand / 1e9, rel=1e-5)
    assert manifest["cost_gflop"]["unet"] > 0.01
    out = tmp_path / "digits"
    assert invoke("build", "--model", "digits", "--out", out).exit_code == 0
    digits = json.loads((out / "manifest.json").read_text())
    assert digits["classifier"]["preprocessing"]["input"]["shape"] == [1, 16, 16]
    assert digits["graphs"]["classifier"]["inputs"][0]["shape"] == ["batch", 1, 16, 16]
    assert digits["cost_gflop"]["unet"] > 0 and digits["cost_gflop"]["classifier"] > 0


def test_quick_start_outputs_are_ignored_by_git():
    if not (ROOT / ".git").exists():
        pytest.fail("the tests run from a git checkout (CI clones the repository)")
    for name in ("quickstart.tsv", "quickstart.tsv.json", "quickstart.png", "quickstart.tsv.lock", "engines/digits/step.onnx"):
        proc = subprocess.run(["git", "check-ignore", "-q", name], cwd=ROOT)
        assert proc.returncode == 0, f"{name} is not ignored by git"
