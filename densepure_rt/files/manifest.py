"""The engine directory's ``manifest.json``: what was built, for which backend, and checksums.

The runtime reads nothing but the manifest and the files it lists. :func:`load_manifest` refuses,
in one sentence, anything it cannot honour: a missing, oversized, malformed or edited manifest, an
unknown schema, a field of the wrong type or out of range, a file name that is not a plain name
inside the engine directory, a symbolic link, a changed file, or a graph (or a graph's external
data) that ``files`` does not list. A backend that is not installed is refused by
:func:`densepure_rt.runtime.open_loop`.

The manifest carries a checksum of its own content, so an edit by hand is caught too. The seal (the
manifest's self-checksum plus the sha256 of every file it lists) detects accidents and edits, not a
determined attacker: there is no signature, so anyone who can write to the engine directory can
re-seal it. Run only engine directories from a source you trust.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from densepure_rt import __version__
from densepure_rt.errors import EngineError
from densepure_rt.files.onnx_proto import BadProto as _BadProto, onnx_external_data

__all__ = [
    "Manifest",
    "as_manifest",
    "row_facts",
    "GraphInfo",
    "ScheduleInfo",
    "peek_manifest",
    "BUNDLED_ENGINE",
    "SCHEMA_VERSION",
    "MANIFEST",
    "MAX_MANIFEST_BYTES",
    "sha256_file",
    "write_manifest",
    "load_manifest",
    "check_file_name",
    "graph_path",
    "plan_path",
    "KERNELS",
    "onnx_external_data",
    "GRAPH_IO",
    "check_graph_io",
    "engine_identity",
]

#: 2: graphs.<graph>.max_elements_per_row (the row limit, densepure_rt.limits).
#: 3: the step graph takes one row of scalars per image row ([batch x 8]), so rows at different
#: reverse steps share a call (the scheduler); engines of format 2 took one row [8] per call.
SCHEMA_VERSION = 3
MANIFEST = "manifest.json"
_SELF_KEY = "manifest_sha256"

#: A manifest is a few kilobytes; anything bigger than this is not one.
MAX_MANIFEST_BYTES = 16 << 20
#: JSON nesting depth (a real manifest is 6 deep).
_MAX_DEPTH = 32
_MAX_FILES = 1000
_MAX_TIMESTEPS = 100_000
_MAX_SIDE = 4096
_MAX_CLASSES = 1_000_000
_MAX_BATCH = 1_000_000
_MAX_PARAMETERS = 10**13
_MAX_OPSET = 1000
_MAX_GFLOP = 1e9
#: A row whose largest tensor reaches 2^31 elements cannot run at all (densepure_rt.limits).
_MAX_ELEMENTS_PER_ROW = 2**31 - 1
_SCHEDULES = ("linear", "cosine")
_PRECISIONS = ("fp32", "fp16", "bf16")
_GRAPHS = ("step", "classifier")

_HEX64 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")
_WINDOWS_DEVICES = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))}
_MISSING = object()


# ------------------------------------------------------------------------------------------------ #
# files                                                                                              #
# ------------------------------------------------------------------------------------------------ #


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_file_name(name: Any, field: str, where: str | Path) -> str:
    """``name`` if it is a plain file name inside the engine directory, else one-sentence EngineError.

    Plain: a non-empty string of letters, digits, ``_ . + -``, not starting with ``.``, without
    ``..``, path separators, a drive, NUL or control characters, and not a Windows device name.
    """
    reason = None
    if not isinstance(name, str):
        reason = "it is not a string"
    elif not name:
        reason = "it is empty"
    elif name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        reason = "it is an absolute path"
    elif "/" in name or "\\" in name:
        reason = "it has a path separator"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        reason = "it has NUL or control characters"
    elif ".." in name:
        reason = "it has '..'"
    elif name.startswith("."):
        reason = "it starts with '.'"
    elif len(name) > 255:
        reason = "it is longer than 255 characters"
    elif not _NAME.fullmatch(name):
        reason = "it has characters other than letters, digits, '_', '.', '+' and '-'"
    elif name.split(".")[0].upper() in _WINDOWS_DEVICES:
        reason = "it is a device name on Windows"
    if reason is not None:
        raise EngineError(f"{where}: {field} {_show(name)} is not a plain file name inside the engine directory ({reason}): rebuild the engine")
    return name


def _open_regular(path: Path, what: str) -> int:
    """A read-only descriptor of ``path``, refusing a missing file, a symlink or a special file."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        raise EngineError(f"{what} {path} is missing: rebuild the engine") from None
    except OSError as exc:
        raise EngineError(f"{what} {path} cannot be read ({exc.strerror}): check its permissions or rebuild the engine") from None
    if stat.S_ISLNK(mode):
        raise EngineError(f"{what} {path} is a symbolic link, not a regular file inside the engine directory: rebuild the engine")
    if not stat.S_ISREG(mode):
        raise EngineError(f"{what} {path} is not a regular file: rebuild the engine")
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise EngineError(f"{what} {path} cannot be opened ({exc.strerror}): check its permissions or rebuild the engine") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped between lstat and open
        os.close(fd)
        raise EngineError(f"{what} {path} is not a regular file: rebuild the engine")
    return fd


def _sha256_regular(path: Path, what: str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with os.fdopen(_open_regular(path, what), "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


#: The input and output names of each graph (densepure_rt.export.onnx_export's specs).
GRAPH_IO = {"step": (("x", "noise", "scalars"), ("x_next",)), "classifier": (("image",), ("labels", "logits"))}


def check_graph_io(directory: str | Path, graph: str, inputs, outputs) -> None:
    """Refuse, in one :class:`EngineError`, a loaded graph whose input or output names are not those of
    ``graph`` (for example step.onnx and classifier.onnx swapped and the manifest sealed again):
    the backend would otherwise fail deep inside a run, or compute something else."""
    want_in, want_out = GRAPH_IO[graph]
    got_in, got_out = tuple(sorted(inputs)), tuple(sorted(outputs))
    if got_in != tuple(sorted(want_in)) or got_out != tuple(sorted(want_out)):
        raise EngineError(
            f"{directory}: the {graph} graph takes {', '.join(got_in) or 'nothing'} and gives {', '.join(got_out) or 'nothing'}, "
            f"where a {graph} graph takes {', '.join(want_in)} and gives {', '.join(want_out)} (graph files swapped or "
            "replaced?): rebuild the engine"
        )


#: The graph sets an engine may hold: "portable" (``graphs``: standard ONNX, every provider) and
#: "fused" (``fused``: written by ``build --device cuda``, ONNX Runtime's CUDA provider only).
KERNELS = ("portable", "fused")


def graph_path(directory: str | Path, manifest: dict, graph: str, kernels: str = "portable") -> Path:
    """The path of graph ``graph`` (``"step"`` or ``"classifier"``) of the ``kernels`` set in ``directory``.

    Refuses a name that is not a plain file name listed in ``manifest['files']``, so a backend opens
    only files that :func:`load_manifest` has checksummed.
    """
    key = "graphs" if kernels == "portable" else "fused"
    if kernels == "fused" and not isinstance(manifest.get("fused"), dict):
        raise EngineError(
            f"{directory} has no fused GPU graphs (it was built without --device cuda): rebuild it with "
            "`densepure-rt build --device cuda --force` (the same --model and --out), or run --kernels portable"
        )
    entry = manifest.get(key, {}).get(graph) if isinstance(manifest.get(key), dict) else None
    return _listed_file(directory, manifest, entry, f"{key}.{graph}.file")


def _listed_file(directory: str | Path, manifest: dict, entry: Any, field: str) -> Path:
    """``directory / entry['file']``, refused unless it is a plain file name listed in ``files``."""
    name = entry.get("file", _MISSING) if isinstance(entry, dict) else _MISSING
    if name is _MISSING:
        raise EngineError(f"the manifest of {directory} has no {field}: rebuild the engine")
    check_file_name(name, field, directory)
    files = manifest.get("files")
    if not isinstance(files, dict) or name not in files:
        raise EngineError(f"{directory}: {field} {name!r} is not listed (with its sha256) in files: rebuild the engine")
    return Path(directory) / name


def plan_path(directory: str | Path, manifest: dict, graph: str) -> Path:
    """The path of the TensorRT plan of graph ``graph`` (``tensorrt.plans.<graph>.file``) in ``directory``.

    Refuses a name that is not a plain file name listed in ``manifest['files']`` (as :func:`graph_path`)."""
    plans = manifest.get("tensorrt", {}).get("plans") if isinstance(manifest.get("tensorrt"), dict) else None
    entry = plans.get(graph) if isinstance(plans, dict) else None
    return _listed_file(directory, manifest, entry, f"tensorrt.plans.{graph}.file")


def _graph_external_data(path: Path) -> list[str]:
    with os.fdopen(_open_regular(path, "engine file"), "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return []
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                return onnx_external_data(buf)
            except _BadProto as exc:
                raise EngineError(f"engine file {path} is not a valid ONNX model ({exc}): rebuild the engine") from None


# ------------------------------------------------------------------------------------------------ #
# the schema                                                                                         #
# ------------------------------------------------------------------------------------------------ #


class _Schema:
    """Type and range checks of the fields the runtime and the CLI read, one sentence per failure."""

    def __init__(self, path: Path, manifest: dict):
        self.path, self.manifest = path, manifest

    def fail(self, field: str, expected: str, value: Any):
        if value is _MISSING:
            raise EngineError(f"{self.path}: field {field} is missing: rebuild the engine")
        raise EngineError(f"{self.path}: field {field} must be {expected} (got {_show(value)}): rebuild the engine")

    def get(self, field: str, required: bool = True) -> Any:
        *parents, leaf = field.split(".")
        node = self.manifest
        for i, key in enumerate(parents):
            node = node.get(key, _MISSING)
            if not isinstance(node, dict):  # parents are checked with obj() first; this is a guard
                self.fail(".".join(parents[: i + 1]), "an object", node)
        value = node.get(leaf, _MISSING)
        if value is _MISSING and required:
            self.fail(field, "", value)
        return value

    def obj(self, field: str, required: bool = True) -> dict | None:
        value = self.get(field, required)
        if value is _MISSING:
            return None
        if not isinstance(value, dict):
            self.fail(field, "an object", value)
        return value

    def int(self, field: str, lo: int, hi: int, required: bool = True) -> int | None:
        value = self.get(field, required)
        if value is _MISSING:
            return None
        if type(value) is not int or not lo <= value <= hi:
            self.fail(field, f"an integer in {lo}..{hi}", value)
        return value

    def number(self, field: str, lo: float, hi: float, required: bool = True) -> float | None:
        value = self.get(field, required)
        if value is _MISSING:
            return None
        if type(value) not in (int, float) or not lo <= value <= hi:  # JSON NaN/inf are refused when read
            self.fail(field, f"a number in {lo:g}..{hi:g}", value)
        return value

    def bool(self, field: str, required: bool = True) -> bool | None:
        value = self.get(field, required)
        if value is not _MISSING and not isinstance(value, bool):
            self.fail(field, "true or false", value)
        return None if value is _MISSING else value

    def str(self, field: str, choices: tuple = (), min_len: int = 1, max_len: int = 200, required: bool = True) -> str | None:
        value = self.get(field, required)
        if value is _MISSING:
            return None
        if choices:
            if value not in choices or not isinstance(value, str):
                self.fail(field, "one of " + ", ".join(map(repr, choices)), value)
        elif not isinstance(value, str) or not min_len <= len(value) <= max_len or not value.isprintable():
            self.fail(field, f"a string of {min_len}..{max_len} printable characters", value)
        return value


def _check_depth(path: Path, manifest: Any) -> None:
    stack = [(manifest, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > _MAX_DEPTH:
            raise EngineError(f"{path} is nested more than {_MAX_DEPTH} levels deep, so it is not a densepure-rt manifest: rebuild the engine")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def _validate(path: Path, manifest: dict) -> None:
    s = _Schema(path, manifest)
    s.str("toolkit_version", max_len=100)
    s.str("preset", max_len=100)
    shape = s.get("image_shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 3
        or any(type(d) is not int for d in shape)
        or shape[0] not in (1, 3)
        or not all(1 <= d <= _MAX_SIDE for d in shape[1:])
    ):
        s.fail("image_shape", f"[channels, height, width] with channels 1 or 3 and height and width integers in 1..{_MAX_SIDE}", shape)
    s.int("num_classes", 1, _MAX_CLASSES)
    s.obj("schedule")
    s.str("schedule.kind", choices=_SCHEDULES)
    s.int("schedule.num_timesteps", 1, _MAX_TIMESTEPS)
    s.bool("schedule.rescale_timesteps")
    s.obj("unet")
    s.int("unet.parameters", 0, _MAX_PARAMETERS)
    s.str("unet.variance_type", choices=("learned_range", "learned", "fixed_small", "fixed_large"), required=False)
    s.str("unet.prediction_type", choices=("epsilon", "sample", "v_prediction"), required=False)
    s.bool("unet.clip_x0", required=False)
    if s.obj("unet.source", required=False) is not None:  # build --unet
        s.str("unet.source.format", max_len=40)
        s.str("unet.source.sha256", min_len=64, max_len=64)
    s.obj("classifier")
    s.str("classifier.name")
    s.int("classifier.parameters", 0, _MAX_PARAMETERS)
    s.obj("classifier.preprocessing", required=False)
    if s.obj("classifier.source", required=False) is not None:  # build --classifier
        s.str("classifier.source.format", max_len=40)
        s.str("classifier.source.sha256", min_len=64, max_len=64)
    labels = manifest.get("labels")
    if labels is not None and (
        not isinstance(labels, list)
        or len(labels) != manifest["num_classes"]
        or not all(isinstance(n, str) and 1 <= len(n) <= 200 and n.isprintable() for n in labels)
    ):
        s.fail("labels", f"null or a list of num_classes ({manifest['num_classes']}) printable names of 1..200 characters", labels)
    s.obj("image_space", required=False)
    s.obj("precision")
    s.str("precision.step", choices=_PRECISIONS)
    s.obj("backend")
    s.str("backend.name", max_len=100)
    s.int("backend.opset", 1, _MAX_OPSET)
    s.int("default_batch", 1, _MAX_BATCH, required=False)
    s.str("default_data", min_len=0, required=False)
    if s.obj("cost_gflop", required=False) is not None:
        s.number("cost_gflop.unet", 0, _MAX_GFLOP, required=False)
        s.number("cost_gflop.classifier", 0, _MAX_GFLOP, required=False)
    if s.obj("build", required=False) is not None:
        s.str("build.date", min_len=0, required=False)
        s.str("build.torch", min_len=0, required=False)
        s.bool("build.random_weights", required=False)
    files = s.obj("files")
    if not 1 <= len(files) <= _MAX_FILES:
        s.fail("files", f"an object of 1..{_MAX_FILES} file names and their sha256", files)
    for name, digest in files.items():
        check_file_name(name, "files entry", path)
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            s.fail(f"files[{name!r}]", "a sha256 of 64 lowercase hex digits", digest)
    s.obj("graphs")
    for graph in _GRAPHS:
        s.obj(f"graphs.{graph}")
        s.get(f"graphs.{graph}.file")
        graph_path(path.parent, manifest, graph)
        s.int(f"graphs.{graph}.max_elements_per_row", 1, _MAX_ELEMENTS_PER_ROW)
    if s.obj("fused", required=False) is not None:  # build --device cuda
        for graph in _GRAPHS:
            s.obj(f"fused.{graph}")
            s.get(f"fused.{graph}.file")
            graph_path(path.parent, manifest, graph, "fused")
        s.str("fused.classifier.precision", choices=_PRECISIONS)
    _validate_tensorrt(s, path, manifest)


# -- TensorRT plans -------------------------------------------------------------------- #
_TRT_VERSION = re.compile(r"[0-9]{1,4}(\.[0-9]{1,6}){1,4}(\.post[0-9]{1,3})?")
_CAPABILITY = re.compile(r"[0-9]{1,3}\.[0-9]{1,3}")
_HARDWARE_COMPATIBILITY = ("none", "ampere_plus", "same_compute_capability")
_MAX_BYTES = 1 << 50


def _validate_tensorrt(s: _Schema, path: Path, manifest: dict) -> None:
    """The ``tensorrt`` section: required for (and only read for) ``backend.name == "tensorrt"``."""
    gpu = manifest.get("gpu", None)
    if gpu is not None and (not isinstance(gpu, str) or not 1 <= len(gpu) <= 200 or not gpu.isprintable()):
        s.fail("gpu", "null or a string of 1..200 printable characters", gpu)
    if manifest["backend"]["name"] != "tensorrt":
        return
    s.obj("tensorrt")
    for field, pattern, what in (("version", _TRT_VERSION, "a TensorRT version such as '10.13.3.9'"),
                                 ("compute_capability", _CAPABILITY, "a compute capability such as '9.0'")):
        value = s.str(f"tensorrt.{field}", max_len=40)
        if not pattern.fullmatch(value):
            s.fail(f"tensorrt.{field}", what, value)
    s.str("tensorrt.gpu")
    s.str("tensorrt.cuda_version", max_len=40)
    s.str("tensorrt.hardware_compatibility", choices=_HARDWARE_COMPATIBILITY)
    s.obj("tensorrt.profile")
    rows = [s.int(f"tensorrt.profile.{k}", 1, _MAX_BATCH) for k in ("min", "opt", "max")]
    if not rows[0] <= rows[1] <= rows[2]:
        s.fail("tensorrt.profile", "rows with min <= opt <= max", manifest["tensorrt"]["profile"])
    if s.get("tensorrt.workspace_bytes", required=False) not in (None, _MISSING):  # null: TensorRT's default
        s.int("tensorrt.workspace_bytes", 1, _MAX_BYTES)
    s.obj("tensorrt.timing_cache")
    s.str("tensorrt.timing_cache.path", max_len=4096)
    s.bool("tensorrt.timing_cache.reused")
    s.obj("tensorrt.plans")
    for graph in _GRAPHS:
        s.obj(f"tensorrt.plans.{graph}")
        plan_path(path.parent, manifest, graph)
        onnx = s.str(f"tensorrt.plans.{graph}.onnx_sha256", min_len=64, max_len=64)
        if onnx != manifest["files"].get(manifest["graphs"][graph]["file"]):
            s.fail(f"tensorrt.plans.{graph}.onnx_sha256", f"the sha256 of graphs.{graph}.file (the ONNX the plan was built from)", onnx)


def engine_identity(manifest: dict) -> str:
    """What an engine computes, as one sha256: the sha256 of every file it runs (graphs, their
    external data, TensorRT plans) and the settings that change its outputs (preset, image shape,
    classes, schedule, precisions, backend). Not the build's date, host, timings or the manifest's
    own checksum: a rebuild from the same weights and settings has the same identity (its graphs
    are bit-identical), so results files keyed to it are continued; a changed graph is not. Every
    classifier preprocessing choice (resize, antialiasing, channel order, mean, std) and the
    diffusion model's output head are exported into the graphs, so they are part of the identity.
    (A TensorRT plan may differ between builds on the same machine: its sha256 is part of the
    identity, so results continue only on the engine that wrote them.)"""
    body = {
        "files": {name: digest for name, digest in sorted(manifest["files"].items())},
        "preset": manifest["preset"],
        "image_shape": manifest["image_shape"],
        "num_classes": manifest["num_classes"],
        "schedule": manifest["schedule"],
        "precision": manifest["precision"],
        "backend": manifest["backend"]["name"],
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------ #
# the typed manifest                                                                                 #
# ------------------------------------------------------------------------------------------------ #


class _FrozenDict(dict):
    """A dict that refuses changes (a verified manifest is read, never edited)."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("a verified manifest cannot be changed: copy it with Manifest.to_dict()")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _refuse  # type: ignore[assignment]


class _FrozenList(list):
    def _refuse(self, *args, **kwargs):
        raise TypeError("a verified manifest cannot be changed: copy it with Manifest.to_dict()")

    __setitem__ = __delitem__ = append = extend = insert = pop = remove = clear = sort = reverse = _refuse  # type: ignore[assignment]
    __iadd__ = __imul__ = _refuse  # type: ignore[assignment]


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return _FrozenDict({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return _FrozenList(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_thaw(v) for v in value]
    return value


@dataclass(frozen=True)
class ScheduleInfo:
    """The diffusion model's noise schedule: ``kind`` ("linear" or "cosine"), its number of
    timesteps, and whether the network takes timesteps rescaled to 1000."""

    kind: str
    num_timesteps: int
    rescale_timesteps: bool


@dataclass(frozen=True)
class GraphInfo:
    """One graph of an engine: its file (listed, with its sha256, in :attr:`Manifest.files`) and
    the largest tensor it holds per row (the row limit, :mod:`densepure_rt.limits`)."""

    file: str
    max_elements_per_row: int


class Manifest(Mapping):
    """A verified engine manifest (:func:`load_manifest`), parsed once: what every consumer reads,
    as typed attributes. As a read-only mapping it is also the JSON object it was parsed from
    (:meth:`to_dict` copies it), for the checksums, the identity and ``info --json``.

    New fields (a model's preprocessing, its source, its variance type) are added here, once, with
    their check in :func:`_validate`."""

    def __init__(self, data: Mapping, directory: str | Path | None = None):
        raw = _freeze(_thaw(dict(data)))
        object.__setattr__(self, "_raw", raw)
        #: The engine directory the manifest was read from (None for a manifest not read from disk).
        object.__setattr__(self, "directory", None if directory is None else Path(directory))
        schedule, graphs = raw["schedule"], raw["graphs"]
        fields = {
            "schema_version": int(raw["schema_version"]),
            "manifest_sha256": str(raw.get(_SELF_KEY, "")),
            "toolkit_version": str(raw.get("toolkit_version", "")),
            "preset": str(raw["preset"]),
            "image_shape": tuple(int(d) for d in raw["image_shape"]),
            "num_classes": int(raw["num_classes"]),
            "schedule": ScheduleInfo(str(schedule["kind"]), int(schedule["num_timesteps"]), bool(schedule["rescale_timesteps"])),
            "backend": str(raw["backend"]["name"]),
            "opset": int(raw["backend"]["opset"]),
            "step_precision": str(raw["precision"]["step"]),
            "classifier_precision": str(raw["precision"].get("classifier", "fp32")),
            "graphs": _FrozenDict({g: GraphInfo(str(graphs[g]["file"]), int(graphs[g]["max_elements_per_row"])) for g in _GRAPHS}),
            "files": raw["files"],
            "fused": raw.get("fused"),
            "tensorrt": raw.get("tensorrt"),
            "build": raw.get("build", _FrozenDict()),
            "default_batch": int(raw.get("default_batch", 32)),
            "default_data": raw.get("default_data"),
            "unet_parameters": int(raw["unet"]["parameters"]),
            "classifier_name": str(raw["classifier"]["name"]),
            "classifier_parameters": int(raw["classifier"]["parameters"]),
            "unet_source": raw["unet"].get("source"),
            "variance_type": str(raw["unet"].get("variance_type", "learned_range")),
            "prediction_type": str(raw["unet"].get("prediction_type", "epsilon")),
            "classifier_source": raw["classifier"].get("source"),
            "preprocessing": raw["classifier"].get("preprocessing", _FrozenDict()),
            "labels": None if raw.get("labels") is None else tuple(raw["labels"]),
            "image_space": raw.get("image_space"),
            "cost_gflop": raw.get("cost_gflop", _FrozenDict()),
        }
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError("a verified manifest cannot be changed")

    #: Type hints of the attributes set in __init__ (frozen).
    schema_version: int
    manifest_sha256: str
    toolkit_version: str
    preset: str
    image_shape: tuple
    num_classes: int
    schedule: ScheduleInfo
    backend: str
    opset: int
    step_precision: str
    classifier_precision: str
    graphs: Mapping
    files: Mapping
    fused: Mapping | None
    tensorrt: Mapping | None
    build: Mapping
    default_batch: int
    default_data: str | None
    unet_parameters: int
    classifier_name: str
    classifier_parameters: int
    #: ``build --unet``: the diffusion model's format, file or folder and sha256 (None for a preset's).
    unet_source: Mapping | None
    #: The UNet's variance head ("learned_range", "learned", "fixed_small", "fixed_large") and prediction type.
    variance_type: str
    prediction_type: str
    #: ``build --classifier``: the classifier's format, file or model name and sha256 (None for a preset's).
    classifier_source: Mapping | None
    #: How the purified image becomes the classifier's input (resize, antialias, mean, std, channel order, scores).
    preprocessing: Mapping
    #: Class names (``build --labels``), one per class, or None.
    labels: tuple | None
    #: Where the radius holds: the engine's image size, [0, 1] pixels, noise before any classifier
    #: normalisation, how data is brought to that size.
    image_space: Mapping | None
    cost_gflop: Mapping

    @property
    def random_weights(self) -> bool:
        """Whether the engine was built with ``--random-weights`` (its certificates mean nothing)."""
        return bool(self.build.get("random_weights"))

    @property
    def identity(self) -> str:
        """What the engine computes, as one sha256 (:func:`engine_identity`)."""
        return engine_identity(self)

    def __getitem__(self, key):
        return self._raw[key]

    def __iter__(self):
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def to_dict(self) -> dict:
        """A plain, editable copy of the JSON object."""
        return _thaw(self._raw)

    def __repr__(self) -> str:
        return f"Manifest({self.preset!r}, {self.backend}, step {self.step_precision}, directory={str(self.directory)!r})"


def as_manifest(manifest: Mapping) -> Manifest:
    """``manifest`` as a :class:`Manifest` (a JSON object of one, e.g. read by a test, is wrapped;
    it is not verified: that is :func:`load_manifest`'s)."""
    return manifest if isinstance(manifest, Manifest) else Manifest(manifest)


def row_facts(manifest: Mapping) -> tuple[tuple[int, ...], int, int]:
    """(image shape, largest tensor per row of the step graph, of the classifier graph): what the
    row limits and the memory model need, from a :class:`Manifest` or a JSON object holding at least
    ``image_shape`` and ``graphs.<graph>.max_elements_per_row``."""
    if isinstance(manifest, Manifest):
        return manifest.image_shape, manifest.graphs["step"].max_elements_per_row, manifest.graphs["classifier"].max_elements_per_row
    graphs = manifest["graphs"]
    return (tuple(int(d) for d in manifest["image_shape"]), int(graphs["step"]["max_elements_per_row"]),
            int(graphs["classifier"]["max_elements_per_row"]))


def peek_manifest(directory: str | Path) -> dict | None:
    """The JSON object in ``directory/manifest.json`` if it looks like a densepure-rt manifest (the
    self-checksum and schema keys), whether or not it verifies; else None. For deciding whether a
    folder is an engine (``build --force``), never for running one (:func:`load_manifest`)."""
    manifest = Path(directory) / MANIFEST
    try:
        if manifest.is_symlink() or not manifest.is_file() or manifest.stat().st_size > MAX_MANIFEST_BYTES:
            return None
        body = json.loads(manifest.read_bytes().decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return None
    if isinstance(body, dict) and _SELF_KEY in body and "schema_version" in body:
        return body
    return None


# ------------------------------------------------------------------------------------------------ #
# write and load                                                                                     #
# ------------------------------------------------------------------------------------------------ #


def _canonical(manifest: dict) -> bytes:
    body = {k: v for k, v in manifest.items() if k != _SELF_KEY}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def write_manifest(directory: str | Path, manifest: dict[str, Any]) -> Path:
    """Hash every file listed under ``manifest['files']``, seal the manifest, write it atomically."""
    directory = Path(directory)
    manifest = dict(manifest)
    manifest.setdefault("schema_version", SCHEMA_VERSION)
    manifest.setdefault("toolkit_version", __version__)
    names = [check_file_name(name, "files entry", directory) for name in manifest["files"]]
    manifest["files"] = {name: _sha256_regular(directory / name, "engine file") for name in sorted(names)}
    manifest[_SELF_KEY] = hashlib.sha256(_canonical(manifest)).hexdigest()
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(directory / MANIFEST)
    return directory / MANIFEST


class _NotFinite(ValueError):
    pass


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotFinite(text)
    return value


def _refuse_constant(name: str):
    raise _NotFinite(name)


def _read_manifest(directory: Path) -> tuple[Path, Any]:
    path = directory / MANIFEST
    if not os.path.lexists(path):
        raise EngineError(f"{directory} has no {MANIFEST}: it is not an engine directory (build one with `densepure-rt build`)")
    with os.fdopen(_open_regular(path, "manifest"), "rb") as handle:
        if os.fstat(handle.fileno()).st_size > MAX_MANIFEST_BYTES:
            raise EngineError(f"{path} is larger than {MAX_MANIFEST_BYTES >> 20} MiB, so it is not a densepure-rt manifest: rebuild the engine")
        data = handle.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise EngineError(f"{path} is larger than {MAX_MANIFEST_BYTES >> 20} MiB, so it is not a densepure-rt manifest: rebuild the engine")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise EngineError(f"{path} is not valid UTF-8 text, so it is not a densepure-rt manifest: rebuild the engine") from None
    try:
        manifest = json.loads(text, parse_float=_finite_float, parse_constant=_refuse_constant)
    except _NotFinite as exc:
        raise EngineError(f"{path} holds the non-finite number {str(exc)[:20]}, which a manifest never does: rebuild the engine") from None
    except RecursionError:
        raise EngineError(f"{path} is nested too deeply to be a densepure-rt manifest: rebuild the engine") from None
    except ValueError as exc:  # JSONDecodeError, or an integer with thousands of digits
        raise EngineError(f"{path} is corrupt ({exc.__class__.__name__}: {str(exc).splitlines()[0][:80]}): rebuild the engine") from None
    return path, manifest


#: The digits engine shipped inside the package (``build --model digits``, byte for byte: a test
#: rebuilds it), so that an install without torch can certify: certify and predict use it when
#: no ``--engine`` is given.
BUNDLED_ENGINE = Path(__file__).resolve().parents[1] / "assets" / "engines" / "digits"


def load_manifest(directory: str | Path, verify_files: bool = True) -> Manifest:
    """Read and verify ``directory/manifest.json``; raise :class:`EngineError` with one sentence.

    Returns the typed :class:`Manifest`. Checks, in order: the manifest is a regular file of at most 16 MiB of UTF-8 JSON, an object at
    most 32 levels deep; its self-checksum; its schema version; the type and range of every field the
    runtime and the CLI read; every name in ``files`` is a plain file name inside the directory; the
    graphs are listed in ``files``. With ``verify_files``, also: every listed file is a regular file
    (not a symlink) whose sha256 matches, and every external-data file a graph refers to is listed.
    """
    directory = Path(directory)
    if not directory.is_dir():
        if os.path.lexists(directory):
            raise EngineError(f"{directory} is a file, not an engine directory: give the folder `densepure-rt build` wrote")
        raise EngineError(f"engine directory {directory} does not exist: build one with `densepure-rt build`")
    path, manifest = _read_manifest(directory)
    if not isinstance(manifest, dict):
        raise EngineError(f"{path} is not a JSON object, so it is not a densepure-rt manifest: rebuild the engine")
    if _SELF_KEY not in manifest:
        raise EngineError(f"{path} is not a densepure-rt manifest (it has no {_SELF_KEY}): rebuild the engine")
    _check_depth(path, manifest)
    if manifest[_SELF_KEY] != hashlib.sha256(_canonical(manifest)).hexdigest():
        raise EngineError(f"{path} was edited after the build (its checksum does not match): rebuild the engine")
    version = manifest.get("schema_version", _MISSING)
    if type(version) is not int or version != SCHEMA_VERSION:
        shown = "no schema_version" if version is _MISSING else f"schema_version {_show(version, 30)}"
        raise EngineError(
            f"{path} has {shown} but this densepure-rt ({__version__}) runs engines of schema_version "
            f"{SCHEMA_VERSION}: rebuild the engine with `densepure-rt build --force` (the same --model and --out)"
        )
    _validate(path, manifest)
    if verify_files:
        for name, digest in manifest["files"].items():
            file = directory / name
            if _sha256_regular(file, "engine file") != digest:
                raise EngineError(f"engine file {file} has changed since the build (sha256 mismatch): rebuild the engine")
        names = [manifest["graphs"][graph]["file"] for graph in _GRAPHS]
        names += [manifest["fused"][graph]["file"] for graph in _GRAPHS] if "fused" in manifest else []
        for name in names:
            for location in _graph_external_data(directory / name):
                check_file_name(location, f"the external data of graph {name}", directory)
                if location not in manifest["files"]:
                    raise EngineError(
                        f"{directory}: graph {name} reads external data {location!r}, which files does not "
                        "list with its sha256: rebuild the engine"
                    )
    return Manifest(manifest, directory)
