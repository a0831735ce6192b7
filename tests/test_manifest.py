"""A hostile engine directory is bad input: one-line EngineError, never a traceback, never a file
opened outside the directory or unverified.

One real tiny engine is built per module; every case copies it, tampers with it and, where the
tamper must get past the self-checksum, re-seals the manifest with the hashing written out below
(independently of densepure_rt.files.manifest).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from densepure_rt.cli import main
from densepure_rt.errors import EngineError
from densepure_rt.runtime import open_engine

SELF_KEY = "manifest_sha256"


# ------------------------------------------------------------------------------------------------ #
# helpers                                                                                            #
# ------------------------------------------------------------------------------------------------ #


def seal(manifest: dict) -> dict:
    """The manifest with manifest_sha256 recomputed over its canonical JSON (written out here)."""
    body = {k: v for k, v in manifest.items() if k != SELF_KEY}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return {**body, SELF_KEY: hashlib.sha256(canonical).hexdigest()}


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text(encoding="utf-8"))


def write(directory: Path, manifest: dict) -> None:
    (directory / "manifest.json").write_text(json.dumps(seal(manifest), indent=2, sort_keys=True) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("manifest") / "engine"
    result = CliRunner().invoke(main, ["build", "--model", "tiny", "--random-weights", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def copy(engine, tmp_path) -> Path:
    """A fresh copy of the engine, at tmp_path/engine (tmp_path itself is "outside" it)."""
    target = tmp_path / "engine"
    shutil.copytree(engine, target)
    return target


def assert_refused(directory: Path, *needles: str) -> str:
    """`info` and open_engine both refuse ``directory`` with one line naming every needle."""
    result = CliRunner().invoke(main, ["info", "--engine", str(directory)])
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.output!r} {result.exception!r}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    with pytest.raises(EngineError) as info:
        open_engine(directory).close()
    assert "\n" not in str(info.value)
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    return lines[0]


def tamper(directory: Path, edit) -> Path:
    manifest = read(directory)
    edit(manifest)
    write(directory, manifest)
    return directory


# ------------------------------------------------------------------------------------------------ #
# 1. file names: plain names inside the directory, listed, regular files, checksummed                #
# ------------------------------------------------------------------------------------------------ #


OUTSIDE_NAMES = {
    "dotdot": "../outside.bin",
    "deep dotdot": "../../../../../../../../etc/passwd",
    "absolute": "ABSOLUTE",
    "subdir dotdot": "sub/../../outside.bin",
    "backslash": "..\\outside.bin",
    "dot slash": "./step.onnx",
    "dot dot": "..",
    "hidden": ".hidden",
    "empty": "",
    "nul": "step.onnx\x00.txt",
    "control": "step\x1b[2J.onnx",
    "drive": "C:outside.bin",
    "windows device": "NUL",
}


@pytest.mark.parametrize("case", list(OUTSIDE_NAMES))
def test_files_entry_that_is_not_a_plain_name_inside_the_directory_is_refused(case, copy):
    outside = copy.parent / "outside.bin"
    outside.write_bytes(b"secret outside the engine directory\n")
    name = OUTSIDE_NAMES[case]
    if name == "ABSOLUTE":
        name = str(outside.resolve())
    (copy / "sub").mkdir()
    (copy / ".hidden").write_bytes(b"hidden")
    # The digest is right wherever the name resolves to a readable file, so only the name is wrong.
    resolved = copy / name if name else None
    digest = sha256(resolved) if resolved is not None and "\x00" not in name and resolved.is_file() else "0" * 64

    def edit(m):
        m["files"][name] = digest

    assert_refused(tamper(copy, edit), "files entry", "is not a plain file name inside the engine directory")


@pytest.mark.parametrize("graph", ["step", "classifier"])
def test_graph_missing_from_files_is_refused_not_loaded_unverified(graph, copy):
    file = f"{graph}.onnx"

    def edit(m):
        del m["files"][file]

    assert_refused(tamper(copy, edit), f"graphs.{graph}.file", "is not listed")


@pytest.mark.parametrize("graph", ["step", "classifier"])
def test_graph_file_outside_the_directory_is_refused(graph, copy):
    outside = copy.parent / f"{graph}.onnx"
    shutil.copy(copy / f"{graph}.onnx", outside)  # a loadable graph, so the old code ran it

    def edit(m):
        m["graphs"][graph]["file"] = f"../{graph}.onnx"
        m["files"][f"../{graph}.onnx"] = sha256(outside)

    assert_refused(tamper(copy, edit), "is not a plain file name inside the engine directory")


def test_symlinked_engine_file_is_refused(copy):
    outside = copy.parent / "classifier.onnx"
    shutil.move(copy / "classifier.onnx", outside)
    os.symlink(outside, copy / "classifier.onnx")  # same bytes, so the sha256 still matches
    assert_refused(copy, "classifier.onnx", "symbolic link")


def test_symlinked_manifest_is_refused(copy):
    outside = copy.parent / "manifest.json"
    shutil.move(copy / "manifest.json", outside)
    os.symlink(outside, copy / "manifest.json")
    assert_refused(copy, "symbolic link")


def test_listed_name_that_is_a_directory_is_refused(copy):
    (copy / "extra").mkdir()

    def edit(m):
        m["files"]["extra"] = "0" * 64

    assert_refused(tamper(copy, edit), "extra", "is not a regular file")


def test_executors_open_only_names_listed_in_files(copy):
    """The executors (and the test oracle), handed a manifest that did not go through load_manifest, still refuse."""
    from densepure_rt.runtime import open_loop
    from oracle import StepByStep

    outside = copy.parent / "step.onnx"
    shutil.copy(copy / "step.onnx", outside)
    manifest = read(copy)
    manifest["graphs"]["step"]["file"] = "../step.onnx"
    with pytest.raises(EngineError, match="not a plain file name inside the engine directory"):
        StepByStep(copy, manifest)
    with pytest.raises(EngineError, match="not a plain file name inside the engine directory"):
        open_loop("auto", copy, manifest)
    manifest["graphs"]["step"]["file"] = "other.onnx"
    shutil.copy(copy / "step.onnx", copy / "other.onnx")
    with pytest.raises(EngineError, match="is not listed"):
        open_loop("auto", copy, manifest)


# ------------------------------------------------------------------------------------------------ #
# 1b. ONNX external data                                                                             #
# ------------------------------------------------------------------------------------------------ #


def to_external_data(graph: Path, location: str) -> None:
    """Rewrite ``graph`` with every initializer in the external-data file ``location``."""
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(graph))
    onnx.save_model(model, str(graph), save_as_external_data=True, all_tensors_to_one_file=True, location=location, size_threshold=0)


def test_external_data_listed_in_files_loads_and_gives_the_same_votes(engine, copy):
    to_external_data(copy / "step.onnx", "step.onnx.data")
    assert (copy / "step.onnx").stat().st_size < 1_000_000 < (copy / "step.onnx.data").stat().st_size

    def edit(m):
        m["files"]["step.onnx"] = sha256(copy / "step.onnx")
        m["files"]["step.onnx.data"] = sha256(copy / "step.onnx.data")

    tamper(copy, edit)
    image = np.random.default_rng(0).random((3, 16, 16), dtype=np.float32)
    with open_engine(engine) as a, open_engine(copy) as b:
        want = a.predict(image, 0.5, steps=2, votes=3, n=16, seed=1, image_index=0)
        got = b.predict(image, 0.5, steps=2, votes=3, n=16, seed=1, image_index=0)
    assert got == want

    # ...and a changed external-data file is caught like any other engine file.
    data = bytearray((copy / "step.onnx.data").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "step.onnx.data").write_bytes(bytes(data))
    assert_refused(copy, "step.onnx.data", "sha256")


def test_external_data_file_not_listed_in_files_is_refused(copy):
    to_external_data(copy / "step.onnx", "weights.bin")

    def edit(m):
        m["files"]["step.onnx"] = sha256(copy / "step.onnx")

    assert_refused(tamper(copy, edit), "weights.bin", "files does not list")


def test_external_data_outside_the_directory_is_refused_before_onnxruntime(copy):
    onnx = pytest.importorskip("onnx")
    to_external_data(copy / "step.onnx", "weights.bin")
    shutil.move(copy / "weights.bin", copy.parent / "weights.bin")
    # onnx will not write a location with '..', so point the tensors outside by hand.
    model = onnx.load(str(copy / "step.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../weights.bin"
    (copy / "step.onnx").write_bytes(model.SerializeToString())

    def edit(m):
        m["files"]["step.onnx"] = sha256(copy / "step.onnx")

    assert_refused(tamper(copy, edit), "external data of graph step.onnx", "'../weights.bin'", "not a plain file name")


def test_graph_that_is_not_a_protobuf_is_refused_by_info(copy):
    (copy / "classifier.onnx").write_bytes(b"\xff" * 64)

    def edit(m):
        m["files"]["classifier.onnx"] = sha256(copy / "classifier.onnx")

    assert_refused(tamper(copy, edit), "classifier.onnx", "is not a valid ONNX model")


def _tiny_external_model(location: str):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.arange(1, 5, dtype=np.float32), "w")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [x], [y], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("where", ["inside", "dotdot", "absolute", "symlink to outside"])
def test_onnxruntime_itself_refuses_external_data_outside_the_model_directory(where, tmp_path):
    """A second line of defence, and a guard on the onnxruntime version: if an upgrade stops refusing
    external data that escapes the model directory, this fails."""
    ort = pytest.importorskip("onnxruntime")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    weights = np.arange(1, 5, dtype=np.float32)
    weights.tofile(tmp_path / "outside.bin")
    weights.tofile(model_dir / "inside.bin")
    os.symlink(tmp_path / "outside.bin", model_dir / "link.bin")
    location = {
        "inside": "inside.bin",
        "dotdot": "../outside.bin",
        "absolute": str(tmp_path / "outside.bin"),
        "symlink to outside": "link.bin",
    }[where]
    path = model_dir / "model.onnx"
    path.write_bytes(_tiny_external_model(location).SerializeToString())
    if where == "inside":
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert session.run(["y"], {"x": np.zeros(4, np.float32)})[0].tolist() == [1, 2, 3, 4]
        return
    with pytest.raises(Exception) as info:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    message = str(info.value)
    assert "External data path validation failed" in message
    assert ("escapes model directory" in message) or ("Absolute path not allowed" in message)


def test_external_data_reader_finds_every_location_the_onnx_package_writes():
    onnx = pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    from densepure_rt.files.manifest import onnx_external_data

    model = _tiny_external_model("a.bin")

    # A Constant node with an external tensor attribute, inside an If subgraph.
    const = numpy_helper.from_array(np.ones(4, np.float32), "c")
    const.ClearField("raw_data")
    const.data_location = onnx.TensorProto.EXTERNAL
    entry = const.external_data.add()
    entry.key, entry.value = "location", "b.bin"
    out = helper.make_tensor_value_info("c_out", onnx.TensorProto.FLOAT, [4])
    branch = helper.make_graph([helper.make_node("Constant", [], ["c_out"], value=const)], "b", [], [out])
    model.graph.node.append(helper.make_node("If", ["cond"], ["z"], then_branch=branch, else_branch=branch))
    assert sorted(onnx_external_data(model.SerializeToString())) == ["a.bin", "b.bin", "b.bin"]
    assert onnx_external_data(b"") == []
    with pytest.raises(ValueError):
        onnx_external_data(b"\x3a\xff\xff")  # field 7, length past the end


# ------------------------------------------------------------------------------------------------ #
# 2. schema: type and range of every field the runtime and the CLI read                              #
# ------------------------------------------------------------------------------------------------ #


def _set(path: str, value):
    def edit(m):
        *parents, leaf = path.split(".")
        node = m
        for key in parents:
            node = node[key]
        node[leaf] = value

    return edit


def _delete(path: str):
    def edit(m):
        *parents, leaf = path.split(".")
        node = m
        for key in parents:
            node = node[key]
        del node[leaf]

    return edit


def _files_as_list(m):
    m["files"] = sorted(m["files"])


BAD_FIELDS = {
    "files as a list": (_files_as_list, "files"),
    "files empty": (_set("files", {}), "files"),
    "file digest not hex": (lambda m: m["files"].update({"step.onnx": "not-a-digest"}), "files['step.onnx']"),
    "no graphs": (_delete("graphs"), "graphs"),
    "graphs a list": (_set("graphs", ["step.onnx"]), "graphs"),
    "no step graph": (_delete("graphs.step"), "graphs.step"),
    "graph file an int": (_set("graphs.classifier.file", 3), "graphs.classifier.file"),
    "unknown schedule kind": (_set("schedule.kind", "quadratic"), "schedule.kind"),
    "schedule a string": (_set("schedule", "linear"), "schedule"),
    "num_timesteps 0": (_set("schedule.num_timesteps", 0), "schedule.num_timesteps"),
    "num_timesteps negative": (_set("schedule.num_timesteps", -5), "schedule.num_timesteps"),
    "num_timesteps huge": (_set("schedule.num_timesteps", 10**9), "schedule.num_timesteps"),
    "num_timesteps a string": (_set("schedule.num_timesteps", "1000"), "schedule.num_timesteps"),
    "num_timesteps a float": (_set("schedule.num_timesteps", 1000.5), "schedule.num_timesteps"),
    "num_timesteps a bool": (_set("schedule.num_timesteps", True), "schedule.num_timesteps"),
    "rescale_timesteps a string": (_set("schedule.rescale_timesteps", "yes"), "schedule.rescale_timesteps"),
    "image_shape too short": (_set("image_shape", [3, 16]), "image_shape"),
    "image_shape too long": (_set("image_shape", [3, 16, 16, 1]), "image_shape"),
    "image_shape zero side": (_set("image_shape", [3, 0, 16]), "image_shape"),
    "image_shape negative side": (_set("image_shape", [3, 16, -16]), "image_shape"),
    "image_shape huge side": (_set("image_shape", [3, 100_000, 16]), "image_shape"),
    "image_shape string side": (_set("image_shape", [3, "16", 16]), "image_shape"),
    "image_shape float side": (_set("image_shape", [3, 16.0, 16]), "image_shape"),
    "image_shape 2 channels": (_set("image_shape", [2, 16, 16]), "image_shape"),
    "image_shape 4 channels": (_set("image_shape", [4, 16, 16]), "image_shape"),
    "image_shape a string": (_set("image_shape", "3x16x16"), "image_shape"),
    "image_shape missing": (_delete("image_shape"), "image_shape"),
    "num_classes 0": (_set("num_classes", 0), "num_classes"),
    "num_classes a string": (_set("num_classes", "10"), "num_classes"),
    "num_classes null": (_set("num_classes", None), "num_classes"),
    "num_classes huge": (_set("num_classes", 10**8), "num_classes"),
    "default_batch 0": (_set("default_batch", 0), "default_batch"),
    "default_batch a string": (_set("default_batch", "32"), "default_batch"),
    "default_data a list": (_set("default_data", ["digits-test"]), "default_data"),
    "backend a string": (_set("backend", "onnxruntime"), "backend"),
    "backend name an int": (_set("backend.name", 5), "backend.name"),
    "backend opset a string": (_set("backend.opset", "17"), "backend.opset"),
    "backend opset missing": (_delete("backend.opset"), "backend.opset"),
    "schema_version a string": (_set("schema_version", "1"), "schema_version"),
    "schema_version a bool": (_set("schema_version", True), "schema_version"),
    "schema_version a float": (_set("schema_version", 1.0), "schema_version"),
    "toolkit_version an int": (_set("toolkit_version", 1), "toolkit_version"),
    "preset null": (_set("preset", None), "preset"),
    "preset with a newline": (_set("preset", "tiny\nerror: forged second line"), "preset"),
    "preset with a terminal escape": (_set("preset", "\x1b[2Jtiny"), "preset"),
    "unet parameters a string": (_set("unet.parameters", "many"), "unet.parameters"),
    "unet missing": (_delete("unet"), "unet"),
    "classifier missing": (_delete("classifier"), "classifier"),
    "classifier name an int": (_set("classifier.name", 7), "classifier.name"),
    "classifier parameters null": (_set("classifier.parameters", None), "classifier.parameters"),
    "precision step fp8": (_set("precision.step", "fp8"), "precision.step"),
    "precision missing": (_delete("precision"), "precision"),
    "cost_gflop a list": (_set("cost_gflop", [1.0, 2.0]), "cost_gflop"),
    "cost_gflop unet a string": (_set("cost_gflop.unet", "12"), "cost_gflop.unet"),
    "cost_gflop classifier negative": (_set("cost_gflop.classifier", -1.0), "cost_gflop.classifier"),
    "build a list": (_set("build", ["date"]), "build"),
    "build null": (_set("build", None), "build"),
    "build date an int": (_set("build.date", 20240101), "build.date"),
    "build torch with a lone surrogate": (_set("build.torch", "\ud800"), "build.torch"),
    "build random_weights a string": (_set("build.random_weights", "false"), "build.random_weights"),
}


@pytest.mark.parametrize("case", list(BAD_FIELDS))
def test_bad_field_is_a_one_line_error_naming_it(case, copy):
    edit, field = BAD_FIELDS[case]
    message = assert_refused(tamper(copy, edit), field)
    assert "rebuild the engine" in message


def test_every_preset_size_passes_the_schema(copy):
    """The limits admit the real engines: 256x256 ImageNet, 4000-step cosine CIFAR-10, 1000 classes."""
    from densepure_rt.files.manifest import load_manifest

    tamper(copy, _set("image_shape", [3, 256, 256]))
    tamper(copy, _set("num_classes", 1000))
    tamper(copy, _set("schedule", {"kind": "cosine", "num_timesteps": 4000, "rescale_timesteps": True}))
    tamper(copy, _set("precision.step", "fp16"))
    tamper(copy, _set("image_shape", [1, 4096, 4096]))
    tamper(copy, _delete("build"))
    assert load_manifest(copy)["num_classes"] == 1000


# ------------------------------------------------------------------------------------------------ #
# 3. the manifest file itself: size, depth, encoding, JSON                                           #
# ------------------------------------------------------------------------------------------------ #


def test_deeply_nested_manifest_is_a_one_line_error(copy):
    (copy / "manifest.json").write_text('{"a":' * 100_000 + "1" + "}" * 100_000)
    assert_refused(copy, "nested")


def test_moderately_nested_sealed_manifest_is_refused(copy):
    # Deep enough to be absurd, shallow enough for json to parse it: caught by the depth limit.
    nested: dict = {}
    node = nested
    for _ in range(200):
        node["a"] = {}
        node = node["a"]
    tamper(copy, _set("validation", nested))
    assert_refused(copy, "nested more than")


def test_oversized_manifest_is_refused_before_it_is_parsed(copy):
    tamper(copy, _set("description", "x" * (17 << 20)))  # a valid, sealed manifest of 17 MiB
    assert_refused(copy, "larger than 16 MiB")


def test_non_utf8_manifest_is_refused(copy):
    manifest = seal(read(copy))
    manifest["description"] = "caf\u00e9"
    manifest = seal(manifest)
    (copy / "manifest.json").write_bytes(json.dumps(manifest, ensure_ascii=False).encode("latin-1"))
    assert_refused(copy, "not valid UTF-8")


def test_manifest_that_is_not_a_json_object_is_refused(copy):
    (copy / "manifest.json").write_text("[1, 2, 3]\n")
    assert_refused(copy, "not a JSON object")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_are_refused(constant, copy):
    manifest = read(copy)
    value = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf"), "1e999": float("inf")}[constant]
    manifest["validation"]["step"]["x_next"]["max_abs"] = value
    # Sealed over what json parses (nan/inf), as a forger would; json writes NaN/Infinity literals.
    text = json.dumps(seal(manifest), sort_keys=True)
    if constant == "1e999":
        text = text.replace("Infinity", "1e999")
    assert constant in text
    (copy / "manifest.json").write_text(text)
    assert_refused(copy, "non-finite")


def test_integer_with_thousands_of_digits_is_a_one_line_error(copy):
    text = (copy / "manifest.json").read_text()
    (copy / "manifest.json").write_text(text.replace('"num_classes": 10', '"num_classes": 1' + "0" * 5000, 1))
    assert_refused(copy, "corrupt")


def test_seal_is_still_checked(copy):
    manifest = read(copy)
    manifest["num_classes"] = 11  # edited, not re-sealed
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert_refused(copy, "was edited after the build")


def test_an_engine_of_the_previous_format_is_refused_with_the_rebuild_command(copy):
    """Format 2 engines took one row of step scalars per call ([8]); this runtime feeds one row per
    image row ([rows x 8]): such an engine is refused in one line that says how to rebuild it."""
    manifest = read(copy)
    assert manifest["schema_version"] == 3
    write(copy, seal({**manifest, "schema_version": 2}))
    assert_refused(copy, "schema_version 2", "schema_version 3", "densepure-rt build --force")
