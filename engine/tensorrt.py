"""TensorRT plans from an engine's exported ONNX graphs (``densepure-rt build --backend tensorrt``).

Written against the documented TensorRT 10.x / 11.x Python API (what has run on which hardware:
docs/backends.md; docs/design.md section 5 says why). Checked in CI (``tests/test_tensorrt.py``):
every TensorRT name used here exists in the pinned ``tensorrt-cu13-bindings`` wheel, and the build
logic (profiles, timing-cache reuse, the manifest fields, parser errors) against a fake of the few
TensorRT objects used. Whether TensorRT accepts these graphs and what its plans compute is tested
only by the GPU tests, which run wherever ``import tensorrt`` works.

For each graph (``step``, ``classifier``) :meth:`PlanBuilder.build`:

- parses the ONNX file with ``OnnxParser`` and reports every parser error;
- builds a strongly typed network: TensorRT 11 networks always are; on 10.x the network is created
  with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``. TensorRT then keeps each tensor's ONNX type:
  the fp16 step graph runs fp16 where it was exported fp16 and fp32 in its fp32 islands (GroupNorm
  statistics, softmax, the timestep embedding, the scheduler arithmetic); the classifier runs fp32
  (TF32 allowed for fp16 engines, as ONNX Runtime's CUDA path does; off for fp32 engines);
- adds one optimization profile over the row axis (rows = noisy samples x K) of the batched inputs;
- sets the workspace pool limit and the hardware-compatibility level asked for;
- shares one timing cache, read from and written back to a file that persists across builds;
- serializes the plan into ``<graph>.plan`` beside the ONNX files.

It returns the manifest's ``tensorrt`` section: TensorRT version, GPU, compute capability, CUDA
version, hardware-compatibility level, profile, workspace, timing cache, and per plan its file and
the sha256 of the ONNX file it was built from. Imports neither torch nor, at import time, tensorrt.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from densepure_rt.errors import ConfigError, EngineError
from densepure_rt.files.manifest import sha256_file
from densepure_rt.executors.tensorrt import BATCHED_INPUTS, GRAPHS, device_properties, make_logger, require_tensorrt

__all__ = ["HARDWARE_COMPATIBILITY", "TensorRTOptions", "PlanBuilder", "default_timing_cache", "gpu_properties"]

#: The hardware-compatibility levels a plan may be built with (TensorRT's HardwareCompatibilityLevel).
HARDWARE_COMPATIBILITY = ("none", "ampere_plus", "same_compute_capability")
#: K of the published settings: the default largest batch of the profile is --batch x this.
DEFAULT_VOTES = 10


@dataclass(frozen=True)
class TensorRTOptions:
    """What ``build --backend tensorrt`` asks of TensorRT. Rows are the graphs' first axis (noisy
    samples x K). ``None``: opt_rows = max_rows = 10 x the engine's default batch (K = 10);
    workspace: TensorRT's default (the GPU's memory); timing cache: :func:`default_timing_cache`."""

    min_rows: int = 1
    opt_rows: int | None = None
    max_rows: int | None = None
    workspace_mib: int | None = None
    timing_cache: str | None = None
    hardware_compatibility: str = "none"

    def profile(self, batch: int) -> tuple[int, int, int]:
        """(min, opt, max) rows, or a :class:`ConfigError` naming the flag."""
        high = self.max_rows if self.max_rows is not None else DEFAULT_VOTES * int(batch)
        opt = self.opt_rows if self.opt_rows is not None else high
        low = self.min_rows
        for flag, value in (("--min-batch", low), ("--opt-batch", opt), ("--max-batch", high)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{flag} must be an integer >= 1 (got {value!r})")
        if not low <= opt <= high:
            raise ConfigError(f"the TensorRT profile needs --min-batch <= --opt-batch <= --max-batch (got {low}, {opt}, {high})")
        return low, opt, high


def gpu_properties() -> dict:
    """This machine's GPU as :func:`densepure_rt.executors.tensorrt.device_properties` reads it (needs CuPy)."""
    from densepure_rt.sampling.device import require_cupy

    return device_properties(require_cupy())


def default_timing_cache(version: str, compute_capability: str) -> Path:
    """Where timing caches persist by default: one file per TensorRT version and compute capability
    under ``$XDG_CACHE_HOME/densepure-rt/tensorrt`` (``~/.cache`` when unset)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "densepure-rt" / "tensorrt" / f"timing-{version}-sm{compute_capability.replace('.', '')}.cache"


def _network_flags(trt) -> int:
    major = int(str(trt.__version__).split(".")[0])
    if major >= 11:
        return 0  # TensorRT 11: always strongly typed (the flag is deprecated there and ignored)
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def _hardware_level(trt, name: str):
    levels = {
        "none": lambda: trt.HardwareCompatibilityLevel.NONE,
        "ampere_plus": lambda: trt.HardwareCompatibilityLevel.AMPERE_PLUS,
        "same_compute_capability": lambda: trt.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY,
    }
    try:
        return levels[name]()
    except AttributeError:  # an older TensorRT without that level
        raise EngineError(f"TensorRT {trt.__version__} has no hardware-compatibility level {name}: choose another") from None


class PlanBuilder:
    """Builds an engine's TensorRT plans. Constructed before the (long) ONNX export, so that a missing
    TensorRT, a missing GPU or impossible options fail at once, in one line."""

    def __init__(self, options: TensorRTOptions, batch: int, trt=None, device: dict | None = None):
        if options.hardware_compatibility not in HARDWARE_COMPATIBILITY:
            raise ConfigError(
                f"--hardware-compatibility must be one of {', '.join(HARDWARE_COMPATIBILITY)} (got {options.hardware_compatibility!r})"
            )
        if options.workspace_mib is not None and (isinstance(options.workspace_mib, bool) or not isinstance(options.workspace_mib, int)
                                                  or options.workspace_mib < 1):
            raise ConfigError(f"--workspace must be an integer >= 1 (MiB) (got {options.workspace_mib!r})")
        self.rows = options.profile(batch)
        self.options = options
        self.trt = require_tensorrt() if trt is None else trt
        self.device = gpu_properties() if device is None else device
        self.version = str(self.trt.__version__)
        self.cache_path = Path(options.timing_cache) if options.timing_cache else default_timing_cache(
            self.version, self.device["compute_capability"])

    def build(self, directory: str | Path, onnx_files: dict, precision: str, log=print) -> tuple[dict, list[str]]:
        """Plans of ``onnx_files`` ({graph: ONNX file name in ``directory``}) written into ``directory``.

        ``precision`` is the engine's ('fp16': the step graph was exported in fp16; 'fp32': TF32 off).
        Returns (the manifest's ``tensorrt`` section, the plan file names)."""
        trt, directory = self.trt, Path(directory)
        logger = make_logger(trt, echo=log)
        builder = trt.Builder(logger)
        cache_bytes = self._read_cache(log)
        cache = None
        reused = False
        plans = {}
        for graph in GRAPHS:
            onnx = directory / onnx_files[graph]
            network = builder.create_network(_network_flags(trt))
            parser = trt.OnnxParser(network, logger)
            log(f"TensorRT {self.version}: parsing {onnx.name}...")
            if not parser.parse_from_file(str(onnx)):
                errors = [str(parser.get_error(i)).strip() for i in range(int(parser.num_errors))]
                reason = "; ".join(" ".join(e.split()) for e in errors) or logger.last()
                raise EngineError(f"TensorRT could not parse the {graph} graph {onnx.name} ({len(errors)} errors): {reason}")
            config = builder.create_builder_config()
            if self.options.workspace_mib is not None:
                config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.options.workspace_mib << 20)
            config.hardware_compatibility_level = _hardware_level(trt, self.options.hardware_compatibility)
            if precision == "fp32":
                config.clear_flag(trt.BuilderFlag.TF32)  # an fp32 engine is asked for fp32 arithmetic
            self._add_profile(builder, network, config, graph)
            if cache is None:
                cache, reused = self._cache(config, cache_bytes, log)
            elif not config.set_timing_cache(cache, False):
                raise EngineError(f"TensorRT refused the timing cache it had just created: {logger.last()}")
            log(f"TensorRT {self.version}: building the {graph} plan (rows {self.rows[0]}..{self.rows[2]})...")
            before = len(logger.errors)
            plan = builder.build_serialized_network(network, config)
            if plan is None:
                raise EngineError(f"TensorRT could not build the {graph} plan: {logger.last(before)}")
            name = f"{graph}.plan"
            (directory / name).write_bytes(memoryview(plan))
            plans[graph] = {"file": name, "onnx": onnx.name, "onnx_sha256": sha256_file(onnx)}
        self._write_cache(bytes(memoryview(cache.serialize())), log)
        low, opt, high = self.rows
        section = {
            "version": self.version,
            "gpu": self.device["gpu"],
            "compute_capability": self.device["compute_capability"],
            "cuda_version": self.device["cuda_version"],
            "hardware_compatibility": self.options.hardware_compatibility,
            "strongly_typed": True,
            "profile": {"min": low, "opt": opt, "max": high},
            "workspace_bytes": None if self.options.workspace_mib is None else self.options.workspace_mib << 20,
            "timing_cache": {"path": str(self.cache_path.resolve()), "reused": reused},
            "plans": plans,
        }
        return section, [plans[graph]["file"] for graph in GRAPHS]

    def _add_profile(self, builder: "trt.Builder", network: "trt.INetworkDefinition", config: "trt.IBuilderConfig", graph: str) -> None:
        """One optimization profile: the row axis of each batched input from min to max rows."""
        low, opt, high = self.rows
        profile = builder.create_optimization_profile()
        for i in range(int(network.num_inputs)):
            tensor = network.get_input(i)
            name, shape = str(tensor.name), tuple(int(d) for d in tensor.shape)
            dynamic = [axis for axis, d in enumerate(shape) if d < 0]
            if not dynamic:
                continue
            if dynamic != [0] or name not in BATCHED_INPUTS[graph]:
                raise EngineError(
                    f"the {graph} graph's input {name} has shape {shape}: only the first axis of "
                    f"{', '.join(BATCHED_INPUTS[graph])} may vary; rebuild the engine with this densepure-rt"
                )
            rest = shape[1:]
            profile.set_shape(name, (low, *rest), (opt, *rest), (high, *rest))
        config.add_optimization_profile(profile)

    # -- the timing cache ------------------------------------------------------------------------
    def _read_cache(self, log) -> bytes:
        path = self.cache_path
        if not path.exists():
            log(f"TensorRT timing cache {path}: none yet, one is written after the build")
            return b""
        if not path.is_file():
            raise ConfigError(f"--timing-cache {path} is not a file: give a file path")
        return path.read_bytes()

    def _cache(self, config: "trt.IBuilderConfig", data: bytes, log):
        """(the timing cache the builds share, whether it holds a previous build's timings)."""
        cache = config.create_timing_cache(data) if data else None
        if cache is not None and config.set_timing_cache(cache, False):
            log(f"TensorRT timing cache {self.cache_path}: {len(data)} bytes reused")
            return cache, True
        if data:
            log(f"TensorRT timing cache {self.cache_path} does not fit this TensorRT or GPU: starting a new one in its place")
        cache = config.create_timing_cache(b"")
        if cache is None or not config.set_timing_cache(cache, False):
            raise EngineError("TensorRT could not create an empty timing cache")
        return cache, False

    def _write_cache(self, data: bytes, log) -> None:
        path = self.cache_path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)  # atomic: a concurrent build reads the old cache or the new, never half of one
        log(f"TensorRT timing cache {path}: {len(data)} bytes written")
