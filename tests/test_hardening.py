"""Hardening: the command line, the engine build, the schedule, the locks and the results file
against a hostile user. Each test pins one defect such a user can provoke: a build that deletes
what is not an engine, a schedule or an engine that yields silent wrong certificates, a tensor
past 2^31 elements, a deleted or planted lock file, racing writers, a full disk, a damaged or
foreign file, a flag that ends in a traceback.

Engines are the tiny random-weights preset, built once per module, plus hostile copies of it:
ONNX graphs written here with the onnx package (a step graph that outputs NaN, a classifier that
answers a class the engine does not have) or an edited manifest, each re-sealed here,
independently of the code under test. Two data sets serve the module: ``images`` (30 images,
seed 7) and ``images12`` (12 images, seed 11), the latter for the runs that certify, interrupt
or resume a whole data set. Everything destructive runs inside pytest's temporary folders.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from conftest import invoke
from densepure_rt.cli import QUICKSTART
from densepure_rt.errors import ConfigError
from densepure_rt.schedule import cosine_schedule, linear_schedule, max_steps, reverse_schedule, t_star

#: One test process runs this module (``--dist loadgroup``): its module fixtures (the tiny engine, its data
#: sets and their reference runs) are set up once, not once in each process.
pytestmark = pytest.mark.xdist_group("hardening")

ROOT = Path(__file__).resolve().parents[1]
_SCRIPT = Path(sys.executable).with_name("densepure-rt")
CLI = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "densepure_rt.cli"]
SMALL = ["--sigma", "1.0", "--steps", "1", "--votes", "2", "--n0", "5", "--n", "20", "--quiet"]
#: Images in the ``images`` fixture (seed 7) and in the ``images12`` fixture (seed 11).
NUM_IMAGES = 30
NUM_IMAGES12 = 12
#: The tiny preset's largest tensor per row, worked out from its architecture by hand: 32 base
#: channels, channel_mult (1, 2), so the first decoder block at 16 x 16 concatenates the upsampled
#: 64 channels with the 32-channel skip: 96 x 16 x 16.
TINY_STEP_PER_ROW = 96 * 16 * 16
#: Its classifier (SmallCNN, width 16): the first convolution's output, 16 x 16 x 16.
TINY_CLASSIFIER_PER_ROW = 16 * 16 * 16


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


def rows_of(path: Path) -> list[list[str]]:
    """Data rows without the time column."""
    return [line.split("\t")[:5] + line.split("\t")[6:] for line in Path(path).read_text().splitlines()[1:]]


def _start_slow_run(engine, images, out, n="3000"):
    args = ["certify", "--engine", str(engine), "--data", str(images), *SMALL, "--out", str(out)]
    args[args.index("--n") + 1] = n
    return CLI + args, subprocess.Popen(CLI + args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, seconds=60.0):
    deadline = time.time() + seconds
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


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


def _random_images(path: Path, count: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, images=rng.random((count, 3, 16, 16), dtype=np.float32), labels=rng.integers(0, 10, count))
    return path


def _certified(engine, images, out: Path) -> Path:
    result = invoke("certify", "--engine", engine, "--data", images, *SMALL, "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def images(work) -> Path:
    return _random_images(work / "images.npz", NUM_IMAGES, seed=7)


@pytest.fixture(scope="module")
def reference(work, engine, images) -> Path:
    return _certified(engine, images, work / "reference.tsv")


@pytest.fixture(scope="module")
def images12(work) -> Path:
    """Fewer images, for the runs that certify, interrupt or resume all of them."""
    return _random_images(work / "images12.npz", NUM_IMAGES12, seed=11)


@pytest.fixture(scope="module")
def reference12(work, engine, images12) -> Path:
    return _certified(engine, images12, work / "reference12.tsv")


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


def hostile_copy(engine: Path, where: Path, edit) -> Path:
    """A copy of ``engine`` whose manifest ``edit(manifest)`` changed, re-sealed."""
    copy = where / f"hostile-{len(list(where.glob('hostile-*')))}"
    shutil.copytree(engine, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(copy, manifest)
    reseal(copy, manifest)
    return copy


# ------------------------------------------------------------------------------------------------ #
# building engines: build --force deletes nothing but an engine's own files                        #
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


def test_force_refuses_a_folder_with_a_copied_manifest_next_to_user_files(engine, tmp_path):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "chapter1.tex").write_text("my work")
    (folder / "manifest.json").write_text(invoke("info", "--engine", engine, "--json").stdout)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    message = one_line_error(invoke("build", "--model", "tiny", "--random-weights", "--force", "--out", folder))
    assert "'chapter1.tex'" in message and "not a file of the engine" in message
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_force_refuses_an_engine_folder_holding_other_files(engine, tmp_path):
    copy = tmp_path / "eng"
    shutil.copytree(engine, copy)
    (copy / "notes.txt").write_text("results of last week")
    (copy / "runs").mkdir()
    message = one_line_error(invoke("build", "--model", "tiny", "--random-weights", "--force", "--out", copy))
    assert "'notes.txt'" in message
    assert (copy / "notes.txt").read_text() == "results of last week" and (copy / "runs").is_dir()
    assert (copy / "step.onnx").read_bytes() == (engine / "step.onnx").read_bytes()


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


def test_a_killed_builds_work_folders_are_removed_and_others_kept(engine, tmp_path):
    from densepure_rt.engine.build import clean_stale_builds

    out = tmp_path / "eng"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)

    def work_folder(name: str, pid: int, host: str = socket.gethostname()) -> Path:
        folder = tmp_path / name
        (folder / "engine").mkdir(parents=True)
        (folder / "engine" / "step.onnx").write_text("half written")
        owner = {"tool": "densepure-rt build", "pid": pid, "host": host, "out": str(out.resolve())}
        (folder / ".owner").write_text(json.dumps(owner))
        return folder

    stale = work_folder(".eng.abc123.partial", dead_pid)
    live = work_folder(".eng.def456.partial", os.getpid())
    elsewhere = work_folder(".eng.ghi789.partial", dead_pid, host="another-host")
    foreign = tmp_path / ".eng.jkl000.partial"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not ours")
    # A build killed between moving the old engine aside and moving the new one in: no out, an .old.
    moved = work_folder(".eng.mno111.old", dead_pid)
    shutil.rmtree(moved / "engine")
    shutil.copytree(engine, moved / "engine")
    clean_stale_builds(out, log=lambda line: None)
    assert not stale.exists() and not moved.exists()
    assert live.is_dir() and elsewhere.is_dir() and (foreign / "keep.txt").is_file()
    assert (out / "manifest.json").read_bytes() == (engine / "manifest.json").read_bytes()  # put back


# ------------------------------------------------------------------------------------------------ #
# building engines: checkpoints, classifiers and what the manifest records                         #
# ------------------------------------------------------------------------------------------------ #


def test_pickled_checkpoint_message_does_not_suggest_running_its_code(tmp_path):
    import torch

    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a whole pickled module
    message = one_line_error(invoke("build", "--model", "tiny", "--diffusion-ckpt", tmp_path / "module.pt", "--out", tmp_path / "e"))
    assert "weights_only" not in message
    assert "state_dict" in message and "safetensors" in message
    assert not (tmp_path / "e").exists()


def test_garbage_checkpoint_is_not_called_pickled_code(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"hello, this is not a checkpoint at all\n" * 10)
    message = one_line_error(invoke("build", "--model", "tiny", "--diffusion-ckpt", garbage, "--out", tmp_path / "e"))
    assert "not a readable checkpoint" in message and "pickled code" not in message


def test_build_with_a_classifier_without_parameters(tmp_path):
    import torch
    from torch import nn

    from densepure_rt.engine.build import BuildOptions, build_engine
    from densepure_rt.export.models import load_unet
    from densepure_rt.presets import get_preset

    class MeanColour(nn.Module):
        """Ten 'classes' from the mean pixel: no parameters at all."""

        def forward(self, x):
            return torch.stack([x.mean(dim=(1, 2, 3)) * k for k in range(10)], dim=1)

    preset = get_preset("tiny")
    manifest = build_engine(tmp_path / "eng", preset, load_unet(preset, random_weights=True), MeanColour(),
                            BuildOptions(validate=True), log=lambda m: None)
    assert manifest["classifier"]["parameters"] == 0 and manifest["cost_gflop"]["classifier"] == 0.0


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


# ------------------------------------------------------------------------------------------------ #
# row limits: no tensor reaches 2^31 elements, no call outgrows memory                             #
# ------------------------------------------------------------------------------------------------ #


def _max_numel_of_torch_ops(module, *inputs) -> int:
    """The largest output of any aten op while ``module`` runs on ``inputs``: an independent count
    of the largest tensor (PyTorch's dispatcher, not ONNX shape inference)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        size = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    Largest.size = max(Largest.size, t.numel())
            return out

    with torch.no_grad(), Largest():
        module(*inputs)
    return Largest.size


def test_manifest_records_the_largest_tensor_per_row_of_each_graph(engine):
    import torch

    from densepure_rt.export.models import load_classifier, load_unet
    from densepure_rt.export.step import DenoiseStep
    from densepure_rt.limits import rows_per_call

    manifest = json.loads((engine / "manifest.json").read_text())
    assert manifest["graphs"]["step"]["max_elements_per_row"] == TINY_STEP_PER_ROW
    assert manifest["graphs"]["classifier"]["max_elements_per_row"] == TINY_CLASSIFIER_PER_ROW
    # The same numbers from PyTorch's own op outputs at one row.
    step = DenoiseStep(load_unet("tiny", random_weights=True)).eval()
    x = torch.zeros(1, 3, 16, 16)
    assert _max_numel_of_torch_ops(step, x, x, torch.zeros(8)) == TINY_STEP_PER_ROW
    assert _max_numel_of_torch_ops(load_classifier("tiny", random_weights=True), x) == TINY_CLASSIFIER_PER_ROW
    assert rows_per_call(manifest) == ((2**31 - 1) // TINY_STEP_PER_ROW, (2**31 - 1) // TINY_CLASSIFIER_PER_ROW)


@pytest.mark.slow
def test_imagenet_unet_holds_2_to_the_25_elements_per_row_so_at_most_63_rows(tmp_path):
    """Shape inference only: the ImageNet preset's UNet (552.8M parameters, left uninitialised and
    not exported) traced at 32 x 32 with dynamic spatial axes, its shapes inferred at 256 x 256."""
    import io
    import warnings

    import onnx
    import torch

    from densepure_rt.export.onnx_export import max_elements_per_row
    from densepure_rt.export.step import DenoiseStep
    from densepure_rt.export.unet import create_model
    from densepure_rt.limits import row_limit
    from densepure_rt.presets import get_preset

    preset = get_preset("imagenet")
    with torch.device("meta"):
        unet = create_model(**preset.unet_kwargs)
    step = DenoiseStep(unet.to_empty(device="cpu")).eval()  # shapes only: the values do not matter
    small = torch.zeros(1, 3, 32, 32)
    axes = {0: "batch", 2: "h", 3: "w"}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(step, (small, small, torch.zeros(1, 8)), buffer, input_names=["x", "noise", "scalars"],
                          output_names=["x_next"], dynamic_axes={"x": axes, "noise": axes, "scalars": {0: "batch"}, "x_next": axes},
                          opset_version=17, do_constant_folding=False, dynamo=False, export_params=False)
    model = onnx.load_from_string(buffer.getvalue())
    full = ["batch", 3, 256, 256]
    per_row = max_elements_per_row(model, {"x": full, "noise": full})
    assert per_row == 512 * 256 * 256 == 2**25  # the first decoder concatenation: 256 + 256 channels at 256 x 256
    assert row_limit(per_row) == 63
    assert preset.default_batch * 10 <= 63  # the preset's default batch at K = 10 fits


def test_row_limit_shape_inference_reads_graphs_with_external_weights(engine, tmp_path, monkeypatch):
    """Graphs over 2 GB keep their weights in a data file (the fp32 ImageNet UNet): the shape
    inference reads the graph without them, from any working folder (it once tried to read the data
    file relative to the working folder and failed at the end of a full ImageNet build)."""
    import onnx

    from densepure_rt.export.onnx_export import max_elements_per_row

    model = onnx.load(str(engine / "step.onnx"))
    onnx.save_model(model, str(tmp_path / "step.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="step.onnx.data", size_threshold=0)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert max_elements_per_row(tmp_path / "step.onnx") == TINY_STEP_PER_ROW


def test_rows_above_the_engine_limit_are_refused_before_anything_is_written(work, engine, images, monkeypatch):
    from densepure_rt import limits

    def shrink(copy, manifest):  # a graph whose largest tensor is 2^31 / 4 elements per row: 3 rows
        manifest["graphs"]["step"]["max_elements_per_row"] = 2**29

    hostile = hostile_copy(engine, work, shrink)
    out = work / "limited.tsv"
    message = one_line_error(invoke("certify", "--engine", hostile, "--data", images, *SMALL, "--batch", "2", "--out", out))
    assert "--batch 2 x --votes 2 = 4 rows per call" in message and "limit of 3 rows" in message and "--batch 1" in message
    assert not out.exists() and not Path(f"{out}.json").exists()
    # One sample of two runs is 2 rows: within the limit. (The memory model takes the claimed 2^29
    # elements per row at its word, about 36 GiB: memory is not what this test is about.)
    monkeypatch.setattr(limits, "available_memory", lambda device: None)
    result = invoke("certify", "--engine", hostile, "--data", images, *SMALL, "--batch", "1", "--max", "2", "--out", out)
    assert result.exit_code == 0, result.output


def test_memory_estimate_refuses_what_the_machine_cannot_hold(engine, monkeypatch):
    from densepure_rt import limits

    manifest = json.loads((engine / "manifest.json").read_text())
    monkeypatch.setattr(limits, "available_memory", lambda device: 2**28)  # a machine with 0.25 GiB free
    with pytest.raises(ConfigError, match="needs about") as caught:
        limits.check_rows(manifest, 1000, 2, "cpu")
    assert "0.2 GiB available" in str(caught.value)  # the model's numbers: tests/test_memory_model.py
    limits.check_rows(manifest, 10, 2, "cpu")  # 20 rows fit


def test_huge_batch_with_few_samples_sizes_buffers_by_the_samples(work, engine, images12, reference12):
    """--batch 10^8 used to allocate 10^8 x K rows (a MemoryError traceback); a call holds at most
    the samples there are, and the rows equal the reference's."""
    out = work / "huge_batch.tsv"
    result = invoke("certify", "--engine", engine, "--data", images12, *SMALL, "--batch", "100000000", "--out", out)
    assert result.exit_code == 0, result.output
    assert rows_of(out) == rows_of(reference12)


def test_huge_votes_is_one_line(work, engine, images):
    out = work / "huge_votes.tsv"
    message = one_line_error(invoke("certify", "--engine", engine, "--data", images, *SMALL, "--votes", "10000000", "--out", out))
    assert "rows per call" in message and "--votes" in message
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ #
# schedules: no silent wrong certificates from non-finite values                                   #
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


def test_no_purification_takes_any_sigma(work, engine, images):
    out = work / "none_big_sigma.tsv"
    args = ["--sigma", "100", "--steps", "none", "--votes", "1", "--n0", "5", "--n", "10", "--quiet", "--max", "1"]
    result = invoke("certify", "--engine", engine, "--data", images, *args, "--out", out)
    assert result.exit_code == 0, result.output


def test_non_finite_purified_images_are_an_engine_error_not_class_0(work, hostile, images):
    out = work / "nan_engine.tsv"
    result = invoke("certify", "--engine", hostile["nan"], "--data", images, *SMALL, "--out", out)
    assert "non-finite" in one_line_error(result)
    # Nothing half-written: the run failed on its first image, so no file blocks a re-run.
    assert not out.exists() and not Path(f"{out}.json").exists() and not Path(f"{out}.lock").exists()


# ------------------------------------------------------------------------------------------------ #
# engines that answer wrong or are not engines                                                     #
# ------------------------------------------------------------------------------------------------ #


def test_out_of_range_labels_are_an_engine_error(work, hostile, images):
    out = work / "label10.tsv"
    message = one_line_error(invoke("certify", "--engine", hostile["label10"], "--data", images, *SMALL, "--out", out))
    assert "label 10" in message and "10 classes" in message
    assert not out.exists()


def test_swapped_graph_files_are_refused_at_load(work, engine, images):
    def swap(copy, manifest):
        step, cls = manifest["graphs"]["step"]["file"], manifest["graphs"]["classifier"]["file"]
        manifest["graphs"]["step"]["file"], manifest["graphs"]["classifier"]["file"] = cls, step

    hostile = hostile_copy(engine, work, swap)
    message = one_line_error(invoke("certify", "--engine", hostile, "--data", images, *SMALL, "--out", work / "swap.tsv"))
    assert "the step graph takes image" in message and "swapped" in message


def test_info_on_a_file_says_it_is_a_file(tmp_path):
    file = tmp_path / "somefile"
    file.write_text("x")
    assert "is a file, not an engine directory" in one_line_error(invoke("info", "--engine", file))


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
# inputs and labels: unlabelled images are never correct                                           #
# ------------------------------------------------------------------------------------------------ #


def test_unlabelled_images_are_never_counted_as_correct(work, engine, tmp_path):
    rng = np.random.default_rng(3)
    data = tmp_path / "unlabelled.npz"
    np.savez(data, images=rng.random((4, 3, 16, 16), dtype=np.float32))  # no labels: all -1
    out = tmp_path / "unlabelled.tsv"
    # sigma 50 with no purification: the votes are noise, so many abstain (prediction -1)
    args = ["--sigma", "50", "--steps", "none", "--votes", "1", "--n0", "5", "--n", "10", "--quiet"]
    result = invoke("certify", "--engine", engine, "--data", data, *args, "--out", out)
    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in out.read_text().splitlines()[1:]]
    assert [r[1] for r in rows] == ["-1"] * 4 and [r[4] for r in rows] == ["0"] * 4
    assert "no image has a label" in result.stdout
    report = invoke("report", out)
    assert report.exit_code == 0, report.output
    assert "n/a" in report.stdout and "4 images without a label" in report.stdout
    predicted = invoke("predict", "--engine", engine, "--data", data, *args[:-5], "--n", "10", "--quiet",
                       "--out", tmp_path / "p.tsv")
    assert predicted.exit_code == 0, predicted.output
    assert "no image has a label" in predicted.stdout and "100.0%" not in predicted.stdout


def test_accuracy_is_over_labelled_images_only(tmp_path):
    from densepure_rt.files.report import certified_accuracy

    rows = [
        {"label": 3, "predict": 3, "radius": 0.5, "correct": 1},
        {"label": 4, "predict": 2, "radius": 0.7, "correct": 0},
        {"label": -1, "predict": -1, "radius": 0.0, "correct": 1},  # an old file's abstention on no label
        {"label": -1, "predict": 5, "radius": 0.9, "correct": 0},
    ]
    assert certified_accuracy(rows, [0.0, 0.6]).tolist() == [0.5, 0.0]


# ------------------------------------------------------------------------------------------------ #
# locks and concurrent writers: one writer per results file                                        #
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


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "not-a-pid"])
def test_a_planted_lock_file_is_refused_and_left_as_it_is(kind, work, engine, images, tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("years of work\n")
    out = tmp_path / f"res-{kind}.tsv"
    lock = Path(f"{out}.lock")
    if kind == "symlink":
        lock.symlink_to(victim)
    elif kind == "hardlink":
        os.link(victim, lock)
    else:
        lock.write_text("not a pid\n")
    message = one_line_error(invoke("certify", "--engine", engine, "--data", images, *SMALL, "--out", out))
    assert "lock file" in message or "not a densepure-rt lock file" in message
    assert victim.read_text() == "years of work\n"
    assert not out.exists()


def test_a_stale_lock_of_a_killed_run_is_taken_over(work, engine, images12, reference12, tmp_path):
    out = tmp_path / "stale.tsv"
    Path(f"{out}.lock").write_text("99999999\n")  # what a run killed with -9 leaves
    result = invoke("certify", "--engine", engine, "--data", images12, *SMALL, "--out", out)
    assert result.exit_code == 0, result.output
    assert rows_of(out) == rows_of(reference12) and not Path(f"{out}.lock").exists()


@pytest.mark.slow
def test_deleting_the_lock_during_a_run_does_not_let_a_second_writer_in(work, engine, images12, tmp_path):
    out = tmp_path / "guarded.tsv"
    args, first = _start_slow_run(engine, images12, out, n="200")
    try:
        _wait_for(lambda: out.exists() and len(out.read_text().splitlines()) >= 2)
        Path(f"{out}.lock").unlink()  # a user tidies up while the run goes on
        second = subprocess.run(args, capture_output=True, text=True, timeout=120)
        assert first.poll() is None, "the first run ended before the second started"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert second.returncode == 2, second.stderr
    assert len(second.stderr.strip().splitlines()) == 1 and "being written by another densepure-rt run" in second.stderr
    # Resumed to the end: every image once.
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    indices = [row[0] for row in rows_of(out)]
    assert indices == [str(i) for i in range(NUM_IMAGES12)]


@pytest.mark.slow
def test_a_second_writer_racing_for_a_new_file_loses_without_touching_its_options(work, engine, images12, tmp_path):
    out = tmp_path / "race.tsv"
    args, first = _start_slow_run(engine, images12, out, n="3000")
    try:
        _wait_for(lambda: Path(f"{out}.lock").exists())
        Path(f"{out}.lock").unlink()  # before the first row exists
        other = args + ["--seed", "7"]  # other settings, same --out
        second = subprocess.Popen(other, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _wait_for(lambda: out.exists(), seconds=300)
        time.sleep(0.5)
        winner_seed = json.loads(Path(f"{out}.json").read_text())["seed"]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    if winner_seed != 0:  # the second run wrote the file: how it ends does not matter, only the options below
        second.kill()
    _, errors = second.communicate(timeout=300)
    if winner_seed == 0:  # the first run wrote the file: the second must stop without writing
        assert second.returncode == 2, errors
        assert "created by another densepure-rt run" in errors or "being written" in errors
    assert json.loads(Path(f"{out}.json").read_text())["seed"] == winner_seed  # options stay the file's


# ------------------------------------------------------------------------------------------------ #
# interruption and resume                                                                          #
# ------------------------------------------------------------------------------------------------ #


@pytest.mark.slow
def test_sigterm_is_handled_like_ctrl_c(work, engine, images12, tmp_path):
    out = tmp_path / "term.tsv"
    args, run = _start_slow_run(engine, images12, out, n="600")
    try:
        _wait_for(lambda: out.exists() and len(out.read_text().splitlines()) >= 2)
        run.send_signal(signal.SIGTERM)
        _, stderr = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 143
    assert stderr.strip().splitlines()[-1].startswith("terminated (SIGTERM): rows written so far are kept")
    assert not Path(f"{out}.lock").exists()
    assert len(out.read_text().splitlines()) >= 2


@pytest.mark.slow
def test_deleting_the_results_file_during_a_run_stops_it(work, engine, images12, tmp_path):
    out = tmp_path / "vanishing.tsv"
    args, run = _start_slow_run(engine, images12, out, n="300")
    try:
        _wait_for(lambda: out.exists() and len(out.read_text().splitlines()) >= 2)
        out.unlink()
        _, stderr = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 2, stderr
    assert "was deleted or replaced while this run wrote it" in stderr and len(stderr.strip().splitlines()) == 1


def test_a_sequential_run_resumed_with_another_round_size_is_refused(work, engine, images, tmp_path):
    """--radius decides after rounds of --round samples, so the round size is part of the experiment
    there (fixed-n rows do not depend on it, and their resume ignores it)."""
    args = ["certify", "--engine", engine, "--data", images, *SMALL[:-5], "--radius", "0.1", "--n-max", "40", "--quiet"]
    started = tmp_path / "round16.tsv"
    assert invoke(*args, "--max", "1", "--round", "16", "--batch", "16", "--out", started).exit_code == 0
    # Without --round a resumed file keeps its round (the next test): another --batch does not change it.
    result = invoke(*args, "--max", "1", "--batch", "8", "--out", started)
    assert result.exit_code == 0 and "resuming with --round 16" in result.stderr, result.output
    # An explicit other --round is refused (--batch is not part of the experiment).
    assert "round 16 -> 8" in one_line_error(invoke(*args, "--max", "1", "--round", "8", "--out", started))


def test_a_resumed_sequential_run_without_round_keeps_its_files_round(work, engine, images, tmp_path):
    """A file started with another round than the default (1) continues with that round when --round
    is not given, and its rows equal those of one uninterrupted run with that round (the file cut
    after its first row, as a kill leaves it, then resumed with other calls: --batch 8). An
    impossible recorded round (a hostile options file) is a one-line error."""
    args = ["certify", "--engine", engine, "--data", images, *SMALL[:-5], "--radius", "0.1", "--n-max", "40", "--quiet"]
    whole = tmp_path / "whole.tsv"
    assert invoke(*args, "--max", "3", "--round", "16", "--out", whole).exit_code == 0
    resumed = tmp_path / "resumed.tsv"
    assert invoke(*args, "--max", "3", "--round", "16", "--batch", "16", "--out", resumed).exit_code == 0
    assert json.loads((tmp_path / "resumed.tsv.json").read_text())["round"] == 16
    lines = resumed.read_text().splitlines(keepends=True)
    resumed.write_text("".join(lines[:2]))  # as if killed after the first image's row
    result = invoke(*args, "--max", "3", "--batch", "8", "--out", resumed)
    assert result.exit_code == 0, result.output
    assert "resuming with --round 16" in result.stderr
    def decisions(path):  # every column but the time and the UNet evaluations (dropped work depends on the calls)
        rows = [line.split("\t") for line in path.read_text().splitlines()[1:]]
        return sorted(row[:5] + row[6:-1] for row in rows)

    assert len(decisions(whole)) == 3 and decisions(resumed) == decisions(whole)
    options = json.loads((tmp_path / "resumed.tsv.json").read_text())
    options["round"] = "sixteen"
    (tmp_path / "resumed.tsv.json").write_text(json.dumps(options))
    assert "records an impossible round ('sixteen')" in one_line_error(invoke(*args, "--max", "3", "--out", resumed))


# ------------------------------------------------------------------------------------------------ #
# damaged results and options files: one line, left untouched                                      #
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


def test_report_refuses_a_file_with_duplicate_images(work, reference):
    dup = work / "dup.tsv"
    lines = reference.read_text().splitlines(keepends=True)
    dup.write_text("".join(lines + [lines[3]]))
    message = one_line_error(invoke("report", dup))
    assert "twice" in message and f"image {lines[3].split()[0]}" in message


# ------------------------------------------------------------------------------------------------ #
# output paths                                                                                     #
# ------------------------------------------------------------------------------------------------ #


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


def test_out_as_a_folder_or_with_a_tilde(work, engine, images, tmp_path, monkeypatch):
    message = one_line_error(invoke("certify", "--engine", engine, "--data", images, *SMALL, "--out", f"{tmp_path}/newdir/"))
    assert "is a folder" in message and not (tmp_path / "newdir").exists()
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    result = invoke("certify", "--engine", engine, "--data", images, *SMALL, "--max", "1", "--out", "~/x.tsv")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "x.tsv").is_file() and not (tmp_path / "~").exists()


def test_results_with_undecodable_names_report_and_plot(work, reference, tmp_path):
    name = os.fsdecode(b"res\xff.tsv")
    odd = tmp_path / name
    shutil.copy(reference, odd)
    shutil.copy(f"{reference}.json", f"{odd}.json")
    result = invoke("report", odd, "--plot", tmp_path / "curve.png")
    assert result.exit_code == 0, result.output
    assert "res\\xff.tsv" in result.stdout and (tmp_path / "curve.png").stat().st_size > 1000


# ------------------------------------------------------------------------------------------------ #
# disk full                                                                                        #
# ------------------------------------------------------------------------------------------------ #


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


def test_a_full_disk_while_creating_the_lock_leaves_no_lock_file(work, engine, images, tmp_path):
    """RLIMIT_FSIZE = 0 stands in for a full disk: the lock file is created but its PID cannot be
    written (EFBIG, the path ENOSPC takes); the run stops in one line and removes what it created."""
    out = tmp_path / "full.tsv"
    args = CLI + ["certify", "--engine", str(engine), "--data", str(images), *SMALL, "--out", str(out)]
    proc = subprocess.run(args, capture_output=True, text=True, preexec_fn=_limit_file_size(0))
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "lock" in proc.stderr
    assert not Path(f"{out}.lock").exists() and not out.exists()


# ------------------------------------------------------------------------------------------------ #
# flags: one error line, never a traceback                                                         #
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


@pytest.mark.parametrize("flag, value, needle", [
    ("--seed", "-1", "--seed"),
    ("--seed", "1e20", "--seed"),
    ("--seed", str(2**32), "--seed"),
    ("--n", "99999999999999999999", "--n"),
    ("--nosuchflag", None, "nosuchflag"),
])
def test_bad_flags_are_one_error_line(flag, value, needle, work, engine, images):
    out = work / "bad_flag.tsv"
    args = ["certify", "--engine", engine, "--data", images, *SMALL, "--out", out]
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag] + ([value] if value is not None else [])
    message = one_line_error(invoke(*args))
    assert needle in message and "Traceback" not in message
    assert not out.exists()


def test_threads_beyond_the_cpus_are_capped(work, engine, images, reference):
    out = work / "threads.tsv"
    result = invoke("certify", "--engine", engine, "--data", images, *SMALL, "--threads", "2000", "--max", "1", "--out", out)
    assert result.exit_code == 0, result.output
    cpus = len(os.sched_getaffinity(0))
    assert f"--threads 2000 is more than the {cpus} CPUs available here: using {cpus}" in result.stderr


def test_a_changed_n_max_is_named_n_max(work, engine, images, tmp_path):
    out = tmp_path / "nmax.tsv"
    args = ["certify", "--engine", engine, "--data", images, *SMALL[:-5], "--radius", "0.1", "--quiet", "--max", "1", "--out", out]
    assert invoke(*args, "--n-max", "50").exit_code == 0
    message = one_line_error(invoke(*args, "--n-max", "51"))
    assert "n-max 50 -> 51" in message


def test_report_refuses_bad_radii_and_plot_names_before_any_work(work, reference, tmp_path):
    assert "--radii" in one_line_error(invoke("report", reference, "--radii", "nan,inf"))
    message = one_line_error(invoke("report", reference, "--plot", tmp_path / "out.xyz"))
    assert "matplotlib cannot write .xyz" in message and ".png" in message
    adir = tmp_path / "adir"
    adir.mkdir()
    assert "is a folder" in one_line_error(invoke("report", reference, "--plot", adir))


def test_sigma_help_says_what_sigma_is():
    text = " ".join(invoke("certify", "--help").stdout.split())
    assert "standard deviation of the Gaussian noise" in text and "[0, 1] pixel units" not in text


# ------------------------------------------------------------------------------------------------ #
# the README's quick start and what a run prints and records                                       #
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


def test_quick_start_outputs_are_ignored_by_git():
    if not (ROOT / ".git").exists():
        pytest.fail("the tests run from a git checkout (CI clones the repository)")
    for name in ("quickstart.tsv", "quickstart.tsv.json", "quickstart.png", "quickstart.tsv.lock", "engines/digits/step.onnx"):
        proc = subprocess.run(["git", "check-ignore", "-q", name], cwd=ROOT)
        assert proc.returncode == 0, f"{name} is not ignored by git"
