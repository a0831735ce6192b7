"""TensorRT plans (issue 13): what can be checked without TensorRT, and GPU tests for where it runs.

TensorRT cannot be installed in this project's workplace, so its code (engine/tensorrt.py,
densepure_rt/executors/tensorrt.py) is checked in three ways, none standing in for another:

(a) API conformance against the REAL ``tensorrt-cu13-bindings`` wheel pinned in the dev extra: it
    cannot be imported without libnvinfer, but its compiled module holds the name of every bound
    class, method, property and enum value. Every TensorRT name the project's code uses (found by a
    walk of its syntax tree, so a newly used misspelt or removed name fails) must be one of them.
(b) The build and load logic (profiles, timing-cache reuse, manifest fields, parser errors, refusal
    of foreign plans, TensorRT's own refusal, the executor's contexts and shapes) against :class:`FakeTensorRT`, a FAKE of the few TensorRT objects used. The
    fake proves nothing about TensorRT itself; (a) checks that it offers only real names.
(c) GPU tests, run wherever ``tensorrt`` and CuPy import and a GPU exists (skipped elsewhere, i.e.
    everywhere this project has run so far): the TensorRT executor against ONNX Runtime on the same
    noise, fp16 labels agreeing on at least 99% of rows.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import BLOCK_TORCH, ROOT, build_digits_engine, gpu_cupy, run_label_agreement
from densepure_rt.cli import main
from densepure_rt.files.data import DIGITS_TEST_ASSET
from densepure_rt.errors import ConfigError, EngineError
from densepure_rt.files.manifest import load_manifest
from densepure_rt.runtime import open_engine
from densepure_rt.executors.tensorrt import (
    INSTALL_TENSORRT,
    TensorRTExecutor,
    check_plans,
    open_plans,
)
from test_manifest import assert_refused, read, write

#: The bindings wheel the conformance test reads (pyproject.toml's dev extra pins the same).
PINNED_BINDINGS = ("tensorrt-cu13-bindings", "11.4.0.106")
TRT_SOURCES = (ROOT / "engine" / "tensorrt.py", ROOT / "densepure_rt" / "executors" / "tensorrt.py")
SIGMA, STEPS, VOTES = 0.6, 2, 3


# ================================================================================================ #
# (a) API conformance against the real bindings wheel                                               #
# ================================================================================================ #


def _bindings():
    """(compiled module bytes, names its Python wrapper defines) of the pinned wheel, read from its
    installed files without importing it (it would need libnvinfer)."""
    name, version = PINNED_BINDINGS
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        if sys.platform != "linux" or platform.machine() != "x86_64":
            pytest.skip(f"{name} is pinned for Linux x86_64 only")
        pytest.fail(f"{name}=={version} is not installed: pip install -e '.[dev]'")
    assert dist.version == version, f"{name} {dist.version} is installed; the test pins {version}: pip install -e '.[dev]'"
    files = [f for f in dist.files or () if f.parts[0] == "tensorrt_bindings"]
    compiled = [f for f in files if f.name.startswith("tensorrt.") and f.suffix in (".so", ".pyd")]
    assert len(compiled) == 1, compiled
    data = Path(dist.locate_file(compiled[0])).read_bytes()
    assert len(data) > 1_000_000  # the real module, not a stub
    wrapper = ast.parse(Path(dist.locate_file(next(f for f in files if str(f) == "tensorrt_bindings/__init__.py"))).read_text())
    defined = {n.name for n in ast.walk(wrapper) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    defined |= {n.id for n in ast.walk(wrapper) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    defined |= {n.attr for n in ast.walk(wrapper) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)}
    return data, defined


@pytest.fixture(scope="module")
def bindings():
    return _bindings()


def exists(bindings, name: str) -> bool:
    """Whether ``name`` is a name of the bindings: a NUL-terminated string of the compiled module
    (the linker may store a short name only as the tail of a longer string, e.g. INPUT inside
    CONDITIONAL_INPUT, so a tail match counts) or a name the package's Python wrapper defines.
    Verified: the name exists in the module. Not verified: which class it belongs to, its signature."""
    data, defined = bindings
    return name in defined or (name.encode() + b"\0") in data


def _dotted(node) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def trt_names(source: str) -> dict[str, int]:
    """Every name the code takes of the ``trt`` module or of an object that came from it: name -> line.

    An object comes from TensorRT when it is ``trt`` itself, a parameter annotated with a ``trt.``
    type, or the value of an expression over one: an attribute, a call, an item, a tuple element, a
    conditional. Names assigned such a value (variables, ``self.`` attributes, containers through
    their items) and functions returning one carry it on. Flow-insensitive, per module: a name that
    holds a TensorRT object anywhere counts as one everywhere (over-inclusion shows up as a failing
    name, never as a silently skipped one). Method calls on Python values a TensorRT call returned
    (``str``, ``int``) must go through ``str()``/``int()`` first.
    """
    tree = ast.parse(source)
    tainted, functions, names = {"trt"}, set(), {}

    def taint(node) -> bool:
        if isinstance(node, (ast.Name, ast.Attribute)) and _dotted(node) in tainted:
            return True
        if isinstance(node, ast.Attribute):
            return taint(node.value)
        if isinstance(node, ast.Call):
            return _dotted(node.func) in functions or taint(node.func)
        if isinstance(node, ast.Subscript):
            return taint(node.value)
        if isinstance(node, ast.IfExp):
            return taint(node.body) or taint(node.orelse)
        if isinstance(node, (ast.Tuple, ast.List)):
            return any(taint(e) for e in node.elts)
        return False

    def mark(target) -> bool:
        if isinstance(target, (ast.Tuple, ast.List)):
            return any([mark(e) for e in target.elts])
        while isinstance(target, ast.Subscript):
            target = target.value
        path = _dotted(target)
        if path is None or path in tainted:
            return False
        tainted.add(path)
        return True

    def assign(target, value) -> bool:
        if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple) and len(target.elts) == len(value.elts):
            return any([assign(t, v) for t, v in zip(target.elts, value.elts)])
        return taint(value) and mark(target)

    methods = {n for c in ast.walk(tree) if isinstance(c, ast.ClassDef) for n in c.body if isinstance(n, ast.FunctionDef)}
    for function in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
        for arg in function.args.args + function.args.kwonlyargs:
            text = ast.unparse(arg.annotation) if arg.annotation is not None else ""
            if "trt." in text:
                tainted.add(arg.arg)
                for name in text.strip("'\"").split("trt.")[1:]:
                    names.setdefault(name.split("|")[0].strip(" '\"[]"), function.lineno)
    changed = True
    while changed:
        changed = False
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                changed |= any([assign(t, node.value) for t in node.targets])
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                changed |= assign(node.target, node.value)
            elif isinstance(node, (ast.For, ast.comprehension)):
                changed |= taint(node.iter) and mark(node.target)
            elif isinstance(node, ast.FunctionDef) and node.name not in functions:
                if any(isinstance(r, ast.Return) and r.value is not None and taint(r.value) for r in ast.walk(node)):
                    functions.update({node.name, f"self.{node.name}"} if node in methods else {node.name})
                    changed = True
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and taint(node.value):
            names.setdefault(node.attr, node.lineno)
    return names


def test_the_pinned_bindings_wheel_is_installed_and_read_without_importing_it(bindings):
    data, defined = bindings
    assert "tensorrt" not in sys.modules and "tensorrt_bindings" not in sys.modules
    assert {"nptype", "volume", "__version__"} <= defined


def test_every_tensorrt_name_the_project_uses_exists_in_the_pinned_bindings(bindings):
    used = {}
    for path in TRT_SOURCES:
        for name, line in trt_names(path.read_text()).items():
            used.setdefault(name, f"{path.relative_to(ROOT)}:{line}")
    # The walk finds the calls that matter (so it cannot pass by finding nothing) ...
    for name in ("OnnxParser", "parse_from_file", "get_error", "create_network", "STRONGLY_TYPED", "create_optimization_profile",
                 "set_shape", "set_memory_pool_limit", "WORKSPACE", "create_timing_cache", "set_timing_cache",
                 "hardware_compatibility_level", "build_serialized_network", "deserialize_cuda_engine",
                 "create_execution_context", "USER_MANAGED", "set_device_memory", "device_memory_size_v2",
                 "set_input_shape", "set_tensor_address", "execute_async_v3", "get_tensor_mode", "ILogger", "Severity"):
        assert name in used, f"the name walk no longer sees {name}"
    # ... and every one of them is a name of TensorRT 11.4's bindings. The ILogger override is a
    # method we define, not an attribute we take, so it is checked by name.
    missing = sorted(f"{name} ({where})" for name, where in used.items() if not exists(bindings, name))
    assert not missing, f"not in {PINNED_BINDINGS[0]} {PINNED_BINDINGS[1]}: {', '.join(missing)}"
    assert exists(bindings, "log")
    print(f"{len(used)} TensorRT names used, all in the pinned bindings")


def test_the_check_fails_for_names_tensorrt_does_not_have(bindings):
    """A made-up name, and real names of older TensorRT versions that 11.x removed, are absent."""
    for gone in ("execute_async_v4", "platform_has_fast_fp16", "device_memory_size", "EXPLICIT_BATCH", "FP16", "build_engine"):
        assert not exists(bindings, gone), gone
    assert exists(bindings, "execute_async_v3") and exists(bindings, "INPUT")


def test_the_name_walk_catches_a_misspelt_call(bindings):
    source = (
        "def run(trt, data, stream):\n"
        "    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))\n"
        "    engine = runtime.deserialize_cuda_engine(data)\n"
        "    self._contexts['step'] = engine.create_execution_context()\n"
        "    context = self._contexts['step']\n"
        "    context.execute_async_v4(stream)\n"
    )
    used = trt_names(source)
    assert {"Runtime", "Logger", "WARNING", "deserialize_cuda_engine", "create_execution_context", "execute_async_v4"} <= set(used)
    assert [n for n in used if not exists(bindings, n)] == ["execute_async_v4"]


def test_the_fake_offers_only_real_tensorrt_names(bindings):
    """Every public name of :class:`FakeTensorRT` and of the objects it hands out is a real one."""
    fake = FakeTensorRT()
    objects = [fake, fake.ILogger, fake.ILogger.Severity, FakeBuilder, FakeNetwork, FakeTensor, FakeParser, FakeParserError,
               FakeConfig, FakeProfile, FakeCache, FakeRuntime, FakeEngine, FakeContext]
    objects += [getattr(fake, n) for n in ("NetworkDefinitionCreationFlag", "MemoryPoolType", "HardwareCompatibilityLevel",
                                           "BuilderFlag", "TensorIOMode", "ExecutionContextAllocationStrategy")]
    objects += [FakeTensor("x", (1,), "float32"), FakeConfig(fake)]  # instance attributes too
    public = {n for o in objects for n in vars(o) if not n.startswith("_")} | {"__version__"}
    assert not sorted(n for n in public if not exists(bindings, n))


# ================================================================================================ #
# (b) FakeTensorRT: a FAKE of the TensorRT objects the project uses                                  #
# ================================================================================================ #

PLAN_MAGIC = b"FAKE-TENSORRT-PLAN\n"
_ONNX_TYPES = {1: "float32", 10: "float16", 6: "int32", 7: "int64"}


class _Enum:
    def __init__(self, **values):
        self.__dict__.update(values)


class FakeTensor:
    def __init__(self, name, shape, dtype):
        self.name, self.shape, self.dtype = name, shape, dtype


class FakeNetwork:
    def __init__(self, flags):
        self._flags, self._inputs, self._outputs, self._source = flags, [], [], None

    @property
    def num_inputs(self):
        return len(self._inputs)

    def get_input(self, index):
        return self._inputs[index]


class FakeParserError:
    def __init__(self, text):
        self._text = text

    def desc(self):
        return self._text

    def __str__(self):
        return self._text


class FakeParser:
    """Reads the ONNX graph's inputs and outputs with the onnx package (no TensorRT involved)."""

    _fake: "FakeTensorRT"  # set per fake instance (FakeTensorRT binds its own subclass)

    def __init__(self, network, logger):
        self._network, self._errors = network, []

    def parse_from_file(self, path):
        import onnx

        if self._fake._parser_errors:
            self._errors = [FakeParserError(e) for e in self._fake._parser_errors]
            return False
        model = onnx.load(path, load_external_data=False)

        def tensors(values):
            return [FakeTensor(v.name, tuple(d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim),
                               _ONNX_TYPES[v.type.tensor_type.elem_type]) for v in values]

        self._network._inputs, self._network._outputs = tensors(model.graph.input), tensors(model.graph.output)
        self._network._source = Path(path).name
        return True

    @property
    def num_errors(self):
        return len(self._errors)

    def get_error(self, index):
        return self._errors[index]


class FakeProfile:
    def __init__(self):
        self._shapes = {}

    def set_shape(self, name, low, opt, high):
        self._shapes[name] = (tuple(low), tuple(opt), tuple(high))


class FakeCache:
    """Entries keyed by network; what a real timing cache holds is TensorRT's business."""

    def __init__(self, entries):
        self._entries = dict(entries)

    def serialize(self):
        return json.dumps(self._entries, sort_keys=True).encode()


class FakeConfig:
    def __init__(self, fake):
        self._fake, self._limits, self._profiles, self._cleared, self._cache = fake, {}, [], set(), None
        self.hardware_compatibility_level = fake.HardwareCompatibilityLevel.NONE
        fake._configs.append(self)

    def set_memory_pool_limit(self, pool, size):
        self._limits[pool] = size

    def add_optimization_profile(self, profile):
        self._profiles.append(profile)
        return len(self._profiles) - 1

    def clear_flag(self, flag):
        self._cleared.add(flag)

    def create_timing_cache(self, data):
        try:
            return FakeCache(json.loads(bytes(data).decode()) if data else {})
        except ValueError:
            return None

    def set_timing_cache(self, cache, ignore_mismatch):
        self._cache = cache
        return True

    def get_timing_cache(self):
        return self._cache


class FakeBuilder:
    _fake: "FakeTensorRT"

    def __init__(self, logger):
        self._logger = logger

    def create_network(self, flags):
        network = FakeNetwork(flags)
        self._fake._networks.append(network)
        return network

    def create_builder_config(self):
        return FakeConfig(self._fake)

    def create_optimization_profile(self):
        return FakeProfile()

    def build_serialized_network(self, network, config):
        if self._fake._fail_build:
            return None
        key = f"{network._source}:{[t.shape for t in network._inputs]}"
        self._fake._hits.append(key in config._cache._entries)  # this plan's timings came from the cache
        config._cache._entries[key] = "timings"
        io = {t.name: (True, t.dtype) for t in network._inputs} | {t.name: (False, t.dtype) for t in network._outputs}
        return PLAN_MAGIC + json.dumps({"io": io, "profiles": [p._shapes for p in config._profiles]}).encode()


class FakeContext:
    def __init__(self, engine, strategy):
        self._engine, self._strategy, self._shapes, self._addresses, self._runs, self._memory = engine, strategy, [], {}, [], None

    def set_device_memory(self, memory, size):
        self._memory = (memory, size)

    def set_input_shape(self, name, shape):
        low, _, high = self._engine._profile[name]
        self._shapes.append((name, tuple(shape)))
        return low[0] <= shape[0] <= high[0]

    def set_tensor_address(self, name, memory):
        self._addresses[name] = memory
        return name in self._engine._io

    def execute_async_v3(self, stream_handle):
        self._runs.append(stream_handle)
        return not self._engine._fake._fail_run


class FakeEngine:
    def __init__(self, fake, description):
        self._fake, self._io, self._profile, self._contexts = fake, description["io"], description["profiles"][0], []
        self._names = sorted(self._io)

    @property
    def num_io_tensors(self):
        return len(self._names)

    def get_tensor_name(self, index):
        return self._names[index]

    def get_tensor_mode(self, name):
        return self._fake.TensorIOMode.INPUT if self._io[name][0] else self._fake.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return self._io[name][1]

    @property
    def device_memory_size_v2(self):
        return 4096

    def create_execution_context(self, strategy):
        context = FakeContext(self, strategy)
        self._contexts.append(context)
        return context


class FakeRuntime:
    _fake: "FakeTensorRT"

    def __init__(self, logger):
        self._logger = logger

    def deserialize_cuda_engine(self, data):
        self._fake._deserialized += 1
        if self._fake._refuse or not bytes(data).startswith(PLAN_MAGIC):
            self._logger.log(self._fake.ILogger.Severity.ERROR, "IRuntime::deserializeCudaEngine: Error Code 1: Serialization "
                             "(Serialization assertion plan magic failed.)\nsecond line of the report")
            return None
        return FakeEngine(self._fake, json.loads(bytes(data)[len(PLAN_MAGIC):]))


class FakeTensorRT:
    """A FAKE of the ``tensorrt`` module: only the objects and methods the project calls, recording
    what they are asked; NOT TensorRT. Plans are JSON descriptions of the parsed ONNX I/O and the
    profile; the timing cache is JSON. ``version`` picks 10.x (STRONGLY_TYPED flag) or 11.x."""

    def __init__(self, version: str = "10.13.3.9"):
        self.__version__ = version

        class ILogger:
            Severity = _Enum(INTERNAL_ERROR="internal_error", ERROR="error", WARNING="warning", INFO="info", VERBOSE="verbose")

            def __init__(self):
                pass

        self.ILogger = ILogger
        # The classes TensorRT constructs from (Builder(logger), ...), each bound to this fake.
        self.Builder = type("Builder", (FakeBuilder,), {"_fake": self})
        self.OnnxParser = type("OnnxParser", (FakeParser,), {"_fake": self})
        self.Runtime = type("Runtime", (FakeRuntime,), {"_fake": self})
        self.NetworkDefinitionCreationFlag = _Enum(STRONGLY_TYPED=0 if version.startswith("11.") else 1)
        self.MemoryPoolType = _Enum(WORKSPACE="workspace")
        self.HardwareCompatibilityLevel = _Enum(NONE="none", AMPERE_PLUS="ampere_plus", SAME_COMPUTE_CAPABILITY="same_cc")
        self.BuilderFlag = _Enum(TF32="tf32")
        self.TensorIOMode = _Enum(INPUT="input", OUTPUT="output")
        self.ExecutionContextAllocationStrategy = _Enum(USER_MANAGED="user_managed")
        self.float32, self.float16, self.int32, self.int64 = "float32", "float16", "int32", "int64"
        # Bookkeeping of the fake (private names: not TensorRT's).
        self._networks, self._configs, self._hits, self._deserialized = [], [], [], 0
        self._parser_errors, self._fail_build, self._refuse, self._fail_run = [], False, False, False


FAKE_GPU = {"gpu": "Fake GPU (test)", "compute_capability": "9.0", "cuda_version": "13.0"}


@pytest.fixture
def fake(monkeypatch):
    """A FakeTensorRT that ``build --backend tensorrt`` gets in place of TensorRT, on a fake GPU."""
    import densepure_rt.engine.tensorrt as builder_module

    trt = FakeTensorRT()
    monkeypatch.setattr(builder_module, "require_tensorrt", lambda: trt)
    monkeypatch.setattr(builder_module, "gpu_properties", lambda: dict(FAKE_GPU))
    return trt


def _build(out, *extra):
    return CliRunner().invoke(main, ["build", "--model", "digits", "--backend", "tensorrt", "--precision", "fp16", "--out", str(out), *extra])


@pytest.fixture(scope="module")
def trt_engine(tmp_path_factory):
    """A digits engine built through the CLI with the fake: fp16 ONNX graphs, fake plans, the real manifest."""
    import densepure_rt.engine.tensorrt as builder_module

    root = tmp_path_factory.mktemp("trt")
    trt = FakeTensorRT()
    patch = pytest.MonkeyPatch()
    patch.setattr(builder_module, "require_tensorrt", lambda: trt)
    patch.setattr(builder_module, "gpu_properties", lambda: dict(FAKE_GPU))
    try:
        result = _build(root / "digits", "--batch", "8", "--opt-batch", "24", "--max-batch", "40", "--workspace", "256",
                        "--timing-cache", str(root / "timing.cache"))
    finally:
        patch.undo()
    assert result.exit_code == 0, result.output
    return root / "digits", trt


def test_build_writes_sealed_plans_and_the_manifest_records_them(trt_engine):
    engine, trt = trt_engine
    manifest = load_manifest(engine)  # every file verified, the tensorrt section validated
    section = manifest["tensorrt"]
    assert manifest["backend"]["name"] == "tensorrt" and manifest["precision"] == {"step": "fp16", "classifier": "fp32"}
    assert section["version"] == "10.13.3.9" and manifest["gpu"] == section["gpu"] == "Fake GPU (test)"
    assert (section["compute_capability"], section["cuda_version"], section["hardware_compatibility"]) == ("9.0", "13.0", "none")
    assert section["profile"] == {"min": 1, "opt": 24, "max": 40} and section["workspace_bytes"] == 256 << 20
    assert section["timing_cache"] == {"path": str((engine.parent / "timing.cache").resolve()), "reused": False}
    for graph in ("step", "classifier"):
        plan = section["plans"][graph]
        assert plan["file"] == f"{graph}.plan" and plan["file"] in manifest["files"]
        assert plan["onnx_sha256"] == manifest["files"][f"{graph}.onnx"]  # the ONNX it came from, in the engine
        assert (engine / plan["file"]).read_bytes().startswith(PLAN_MAGIC)
    # TensorRT 10.x: strongly typed through the creation flag; fp16 engines keep TF32 for fp32 layers.
    assert [n._flags for n in trt._networks] == [1 << 1, 1 << 1]
    assert [c._limits for c in trt._configs] == [{"workspace": 256 << 20}] * 2
    assert all(not c._cleared and c.hardware_compatibility_level == "none" for c in trt._configs)
    step, classifier = (c._profiles[0]._shapes for c in trt._configs)
    assert step == {"x": ((1, 1, 16, 16), (24, 1, 16, 16), (40, 1, 16, 16)), "noise": ((1, 1, 16, 16), (24, 1, 16, 16), (40, 1, 16, 16)),
                    "scalars": ((1, 8), (24, 8), (40, 8))}  # one row of step scalars per image row (format 3)
    assert classifier == {"image": ((1, 1, 16, 16), (24, 1, 16, 16), (40, 1, 16, 16))}
    # The plan's step ONNX has its 25 norms as GroupNormalization-21, TensorRT's native normalisation.
    import onnx

    ops = [n.op_type for n in onnx.load(str(engine / "step.onnx")).graph.node]
    assert ops.count("GroupNormalization") == manifest["group_normalization"]["group_normalization"] == 25
    assert "InstanceNormalization" not in ops


def test_info_shows_the_plans(trt_engine):
    engine, _ = trt_engine
    result = CliRunner().invoke(main, ["info", "--engine", str(engine)])
    assert result.exit_code == 0, result.output
    assert "tensorrt    10.13.3.9 plans for Fake GPU (test) (compute capability 9.0, CUDA 13.0, hardware compatibility none)" in result.output
    assert "rows 1/24/40" in result.output and "step.plan, classifier.plan" in result.output


def _onnx_copy(engine: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "graphs"
    folder.mkdir()
    for name in ("step.onnx", "classifier.onnx"):
        shutil.copy(engine / name, folder / name)
    return folder


def _plan_builder(options, trt, batch=8):
    from densepure_rt.engine.tensorrt import PlanBuilder

    return PlanBuilder(options, batch, trt=trt, device=dict(FAKE_GPU))


def test_the_timing_cache_persists_and_is_reused_by_the_next_build(trt_engine, tmp_path):
    from densepure_rt.engine.tensorrt import TensorRTOptions

    engine, _ = trt_engine
    folder = _onnx_copy(engine, tmp_path)
    files, cache = {"step": "step.onnx", "classifier": "classifier.onnx"}, tmp_path / "cache" / "timing.cache"
    trt = FakeTensorRT()
    first, _ = _plan_builder(TensorRTOptions(timing_cache=str(cache)), trt).build(folder, files, "fp16", log=lambda m: None)
    assert first["timing_cache"]["reused"] is False and trt._hits == [False, False] and cache.is_file()
    written = cache.read_bytes()
    second, _ = _plan_builder(TensorRTOptions(timing_cache=str(cache)), trt).build(folder, files, "fp16", log=lambda m: None)
    assert second["timing_cache"]["reused"] is True
    assert trt._hits == [False, False, True, True]  # both plans of the second build found their timings
    assert cache.read_bytes() == written  # nothing new to add
    # A cache this TensorRT cannot read is replaced, with a message, not fatal.
    cache.write_bytes(b"\x00garbage")
    messages = []
    third, _ = _plan_builder(TensorRTOptions(timing_cache=str(cache)), trt).build(folder, files, "fp16", log=messages.append)
    assert third["timing_cache"]["reused"] is False and any("does not fit" in m for m in messages)
    assert json.loads(cache.read_bytes())  # a valid cache again


def test_default_profile_and_timing_cache_and_the_tensorrt_11_network(trt_engine, tmp_path, monkeypatch):
    from densepure_rt.engine.tensorrt import TensorRTOptions

    engine, _ = trt_engine
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    folder = _onnx_copy(engine, tmp_path)
    trt = FakeTensorRT("11.4.0.106")
    section, plans = _plan_builder(TensorRTOptions(hardware_compatibility="ampere_plus"), trt, batch=5).build(
        folder, {"step": "step.onnx", "classifier": "classifier.onnx"}, "fp32", log=lambda m: None)
    assert section["profile"] == {"min": 1, "opt": 50, "max": 50}  # K = 10 x --batch
    assert section["timing_cache"]["path"] == str((tmp_path / "xdg" / "densepure-rt" / "tensorrt" / "timing-11.4.0.106-sm90.cache").resolve())
    assert [n._flags for n in trt._networks] == [0, 0]  # TensorRT 11: strongly typed always, no flag
    assert all(c._cleared == {"tf32"} and c.hardware_compatibility_level == "ampere_plus" for c in trt._configs)  # fp32: no TF32
    assert section["workspace_bytes"] is None and plans == ["step.plan", "classifier.plan"]


@pytest.mark.parametrize("options, needle", [
    ({"min_rows": 10, "max_rows": 5}, "--min-batch <= --opt-batch <= --max-batch"),
    ({"opt_rows": 0}, "--opt-batch must be an integer >= 1"),
    ({"workspace_mib": 0}, "--workspace must be an integer >= 1"),
    ({"hardware_compatibility": "any"}, "--hardware-compatibility must be one of"),
])
def test_impossible_build_options_are_refused_before_tensorrt_is_asked(options, needle):
    from densepure_rt.engine.tensorrt import TensorRTOptions

    trt = FakeTensorRT()
    with pytest.raises(ConfigError, match=needle.replace("+", r"\+")):
        _plan_builder(TensorRTOptions(**options), trt)
    assert trt._networks == []


def test_every_parser_error_is_reported_in_one_line(trt_engine, tmp_path):
    from densepure_rt.engine.tensorrt import TensorRTOptions

    engine, _ = trt_engine
    trt = FakeTensorRT()
    trt._parser_errors = ["In node 12 (parseGraph): UNSUPPORTED_NODE: No importer registered for op: GroupNormalization",
                          "In node 40 (importConv):\nINVALID_NODE: kernel weights are not an initializer"]
    with pytest.raises(EngineError) as info:
        _plan_builder(TensorRTOptions(timing_cache=str(tmp_path / "c")), trt).build(
            _onnx_copy(engine, tmp_path), {"step": "step.onnx", "classifier": "classifier.onnx"}, "fp16", log=lambda m: None)
    message = str(info.value)
    assert "\n" not in message and "could not parse the step graph step.onnx (2 errors)" in message
    assert "GroupNormalization" in message and "kernel weights are not an initializer" in message


@pytest.mark.slow
def test_a_failed_build_is_one_line_and_leaves_no_engine(fake, tmp_path):
    fake._fail_build = True
    result = _build(tmp_path / "e", "--timing-cache", str(tmp_path / "c"))
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()  # progress lines, then the error
    assert lines[-1] == "error: TensorRT could not build the step plan: TensorRT logged no reason"
    assert sum(line.startswith("error:") for line in lines) == 1
    assert not (tmp_path / "e").exists() and not list(tmp_path.glob(".e.*"))


def test_missing_tensorrt_is_one_line_naming_the_install_before_any_export(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt fails, also where it is installed
    result = _build(tmp_path / "e")
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and INSTALL_TENSORRT in lines[0] and "TensorRT is not installed" in lines[0], result.stderr
    assert not (tmp_path / "e").exists()


def test_tensorrt_build_flags_go_with_the_tensorrt_backend(tmp_path):
    result = CliRunner().invoke(main, ["build", "--model", "digits", "--max-batch", "64", "--out", str(tmp_path / "e")])
    assert result.exit_code == 2 and result.stderr.strip() == "error: --max-batch goes with --backend tensorrt"
    result = CliRunner().invoke(main, ["build", "--model", "digits", "--backend", "tensorrt", "--precision", "bf16", "--out", str(tmp_path / "e")])
    assert result.exit_code == 2 and "--precision bf16 is not one the tensorrt backend runs: choose fp16 or fp32" in result.stderr


# -- refusal of foreign plans, TensorRT's own refusal ----------------------------------------------


def test_plans_of_another_tensorrt_version_are_refused_before_deserializing(trt_engine):
    engine, _ = trt_engine
    manifest = load_manifest(engine)
    trt = FakeTensorRT("10.14.1.48")
    with pytest.raises(EngineError) as info:
        open_plans(engine, manifest, trt, "9.0")
    message = str(info.value)
    assert "built by TensorRT 10.13.3.9 but this machine runs TensorRT 10.14.1.48" in message and "rebuild the engine on this machine" in message
    assert "\n" not in message and trt._deserialized == 0


@pytest.mark.parametrize("level, here, fits", [
    ("none", "9.0", True), ("none", "8.9", False), ("none", "10.0", False),
    ("same_compute_capability", "9.0", True), ("same_compute_capability", "8.0", False),
    ("ampere_plus", "8.0", True), ("ampere_plus", "12.0", True), ("ampere_plus", "7.5", False),
])
def test_plans_for_another_compute_capability_are_refused_before_deserializing(trt_engine, level, here, fits):
    engine, _ = trt_engine
    manifest = load_manifest(engine).to_dict()
    manifest["tensorrt"] = {**manifest["tensorrt"], "hardware_compatibility": level}
    trt = FakeTensorRT()
    if fits:
        runtime, engines = open_plans(engine, manifest, trt, here)
        assert set(engines) == {"step", "classifier"} and trt._deserialized == 2
        return
    with pytest.raises(EngineError) as info:
        open_plans(engine, manifest, trt, here)
    assert f"this GPU has compute capability {here}" in str(info.value) and "Fake GPU (test)" in str(info.value)
    assert trt._deserialized == 0


def test_tensorrts_own_refusal_of_a_plan_is_one_line(trt_engine):
    engine, _ = trt_engine
    trt = FakeTensorRT()
    trt._refuse = True
    with pytest.raises(EngineError) as info:
        open_plans(engine, load_manifest(engine), trt, "9.0")
    message = str(info.value)
    assert message.startswith(f"TensorRT refused the step plan {engine / 'step.plan'}: IRuntime::deserializeCudaEngine: Error Code 1")
    assert "\n" not in message and "second line" not in message


def test_check_plans_names_both_versions():
    plans = {"version": "11.4.0.106", "compute_capability": "9.0", "gpu": "H100", "hardware_compatibility": "none"}
    check_plans(plans, "11.4.0.106", "9.0")
    with pytest.raises(EngineError, match="built by TensorRT 11.4.0.106 but this machine runs TensorRT 10.13.3.9"):
        check_plans(plans, "10.13.3.9", "9.0")


def test_a_tensorrt_engine_needs_a_gpu_and_tensorrt_one_line_each(trt_engine, monkeypatch):
    engine, _ = trt_engine
    with pytest.raises(EngineError, match="TensorRT plans, which run on a GPU: pass device='cuda'"):
        open_engine(engine)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(EngineError) as info:
        open_engine(engine, device="cuda")
    assert INSTALL_TENSORRT in str(info.value) and "\n" not in str(info.value)


def _set(path: str, value):
    def edit(m):
        node = m
        *parents, leaf = path.split(".")
        for key in parents:
            node = node[key]
        if value is _DELETE:
            del node[leaf]
        else:
            node[leaf] = value
    return edit


_DELETE = object()


@pytest.mark.parametrize("edit, needles", [
    (_set("tensorrt", _DELETE), ["field tensorrt is missing"]),
    (_set("tensorrt.version", 10), ["field tensorrt.version"]),
    (_set("tensorrt.version", "ten"), ["field tensorrt.version must be a TensorRT version"]),
    (_set("tensorrt.compute_capability", "9"), ["field tensorrt.compute_capability"]),
    (_set("tensorrt.hardware_compatibility", "any"), ["field tensorrt.hardware_compatibility"]),
    (_set("tensorrt.profile.min", 100), ["field tensorrt.profile must be rows with min <= opt <= max"]),
    (_set("tensorrt.profile.max", 2.5), ["field tensorrt.profile.max"]),
    (_set("tensorrt.workspace_bytes", -1), ["field tensorrt.workspace_bytes"]),
    (_set("tensorrt.timing_cache.reused", "yes"), ["field tensorrt.timing_cache.reused"]),
    (_set("tensorrt.plans.step.file", "../step.plan"), ["tensorrt.plans.step.file", "not a plain file name"]),
    (_set("tensorrt.plans.classifier.file", "/etc/passwd"), ["tensorrt.plans.classifier.file", "absolute path"]),
    (_set("tensorrt.plans.step.file", "other.plan"), ["tensorrt.plans.step.file 'other.plan' is not listed"]),
    (_set("tensorrt.plans.step", []), ["field tensorrt.plans.step must be an object"]),
    (_set("tensorrt.plans.classifier.onnx_sha256", "0" * 64), ["field tensorrt.plans.classifier.onnx_sha256"]),
    (_set("gpu", 5), ["field gpu"]),
])
def test_a_hostile_tensorrt_section_is_a_one_line_error(trt_engine, tmp_path, edit, needles):
    engine, _ = trt_engine
    target = tmp_path / "engine"
    shutil.copytree(engine, target)
    manifest = read(target)
    edit(manifest)
    write(target, manifest)
    assert_refused(target, *needles)


# -- the executor's contexts and shapes, on numpy buffers with the fake -----------------------------


class _Stream:
    ptr = 77


def _aligned(shape, dtype, alignment: int = 256) -> np.ndarray:
    """A zeroed numpy array whose first byte sits on an ``alignment``-byte boundary (as CuPy's pool
    hands out device blocks; numpy's own allocations are only 16- or 64-byte aligned)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.zeros(nbytes + alignment, dtype=np.uint8)
    skip = -raw.ctypes.data % alignment
    return raw[skip:skip + nbytes].view(dtype).reshape(shape)


def test_executor_contexts_shapes_and_addresses(trt_engine):
    engine, _ = trt_engine
    manifest = load_manifest(engine)
    trt = FakeTensorRT()
    executor = TensorRTExecutor(engine, manifest, _Stream(), xp=np, trt=trt, compute_capability="9.0")
    assert executor.classifier_rows == 40 and executor.effective_precision == "fp16" and executor.fixed_rows
    step, classifier = executor._engines["step"], executor._engines["classifier"]
    x = _aligned((24, 1, 16, 16), np.float32)
    z, out, scalars = _aligned(x.shape, np.float32), _aligned(x.shape, np.float32), _aligned((24, 8), np.float32)
    labels, logits = _aligned(24, np.int64), _aligned((24, 10), np.float32)
    executor.reserve(24, (1, 16, 16))
    for _ in range(3):  # full batches: the reserved context, its shape set once
        executor.step(x, z, scalars, out)
        executor.classify(out, labels, logits)
    executor.step(x[:5], z[:5], scalars[:5], out[:5])  # a partial batch: the shared context
    executor.step(x[:7], z[:7], scalars[:7], out[:7])
    executor.step(x[:7], z[:7], scalars[:7], out[:7])
    full, shared = step._contexts
    assert full._shapes == [("x", (24, 1, 16, 16)), ("noise", (24, 1, 16, 16)), ("scalars", (24, 8))] and len(full._runs) == 3
    assert shared._shapes == [("x", (5, 1, 16, 16)), ("noise", (5, 1, 16, 16)), ("scalars", (5, 8)),
                              ("x", (7, 1, 16, 16)), ("noise", (7, 1, 16, 16)), ("scalars", (7, 8))]
    assert set(full._runs + shared._runs) == {77}
    assert full._addresses == {"x": x.ctypes.data, "noise": z.ctypes.data, "scalars": scalars.ctypes.data, "x_next": out.ctypes.data}
    assert full._memory == shared._memory == (executor._scratch.ctypes.data, 4096)  # one shared scratch buffer
    assert full._strategy == "user_managed" and len(classifier._contexts) == 1
    with pytest.raises(EngineError, match="got 41 rows but this engine's TensorRT plans take 1 to 40 rows"):
        executor.reserve(41, (1, 16, 16))
    # TensorRT takes 256-byte aligned addresses only: a view 3 rows into the labels (24 bytes) is refused.
    with pytest.raises(EngineError, match="buffer of labels of the classifier graph starts at an address 24 bytes past a 256-byte"):
        executor.classify(out[3:], labels[3:], logits[3:])
    trt._fail_run = True
    with pytest.raises(EngineError, match="TensorRT failed running the classifier graph"):
        executor.classify(out, labels, logits)
    executor.close()


@pytest.fixture(scope="module")
def ort_engine(tmp_path_factory) -> Path:
    return build_digits_engine(tmp_path_factory, "trt-ort")


def _digits(n: int = 6) -> np.ndarray:
    data = np.load(DIGITS_TEST_ASSET)
    images = data["images"][:n].astype(np.float32)
    images = images[:, None] if images.ndim == 3 else images
    return images / 255.0 if images.max() > 1.5 else images


def test_the_runtime_never_imports_tensorrt_cupy_or_torch_unless_asked():
    code = BLOCK_TORCH + (
        "class _Block2:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('tensorrt', 'tensorrt_bindings', 'cupy'):\n"
        "            raise ImportError(name + ' is blocked in this test')\n"
        "sys.meta_path.insert(0, _Block2())\n"
        "import densepure_rt.runtime, densepure_rt.sampling.loop, densepure_rt.cli, densepure_rt.executors.tensorrt, densepure_rt.files.manifest\n"
        "assert not {'tensorrt', 'cupy', 'torch'} & set(sys.modules), sorted(sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ================================================================================================ #
# (c) GPU tests: wherever tensorrt and CuPy import and a GPU exists (skipped elsewhere)             #
# ================================================================================================ #


def _gpu_tensorrt():
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install --extra-index-url https://pypi.nvidia.com tensorrt-cu13)")
    cupy = gpu_cupy()
    pytest.importorskip("torch")
    return cupy


@pytest.fixture(scope="module")
def real_trt_engine(tmp_path_factory):
    _gpu_tensorrt()
    root = tmp_path_factory.mktemp("real-trt")
    result = _build(root / "digits16", "--batch", "32", "--max-batch", "96", "--timing-cache", str(root / "timing.cache"))
    assert result.exit_code == 0, result.output
    return root / "digits16"


@pytest.mark.gpu
def test_real_plans_record_this_machine(real_trt_engine):
    import tensorrt as trt

    from densepure_rt.engine.tensorrt import gpu_properties

    section = load_manifest(real_trt_engine)["tensorrt"]
    here = gpu_properties()
    assert section["version"] == trt.__version__
    assert (section["gpu"], section["compute_capability"]) == (here["gpu"], here["compute_capability"])


@pytest.mark.gpu
def test_tensorrt_fp16_labels_agree_with_onnxruntime_on_99_percent_of_rows(real_trt_engine, ort_engine):
    """The same noise (the Philox keys) through TensorRT fp16 on the GPU and ONNX Runtime fp32 on the
    CPU: the K labels of each noisy sample agree on at least 99% of rows."""
    cupy = _gpu_tensorrt()
    images = _digits()
    with open_engine(ort_engine, early_exit=False) as cpu, open_engine(real_trt_engine, device="cuda", early_exit=False) as gpu:
        assert gpu.executor.name == "tensorrt"
        agree, rows = run_label_agreement(cpu, gpu, images, cupy, SIGMA, STEPS, VOTES)
        print(f"TensorRT fp16 vs ONNX Runtime fp32: {agree}/{rows} labels agree")
        assert agree >= 0.99 * rows, (agree, rows)
