"""Checkpoint loading without executing pickled code (``weights_only=True`` or safetensors)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Mapping

import torch

from densepure_rt.errors import CheckpointError

__all__ = ["load_state_dict", "load_strict"]

# Wrappers seen around state dicts in the wild: {"state_dict": ...}, {"model": ...}, {"ema": ...}.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "ema")


def load_state_dict(path: str | Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch ``.pt``/``.pth``/``.bin`` file, on the CPU.

    Torch files are read with ``weights_only=True``: a file that would need pickled code to load is
    refused with a :class:`CheckpointError`, as is anything that is not a mapping of names to tensors.
    A single common wrapper key (``state_dict``, ``model``...) and a ``module.`` prefix are removed.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        if path.suffix == ".safetensors":
            obj = _load_safetensors(path)
        else:
            with open(path, "rb") as handle:  # opened here: the name may be any bytes the file system allows
                obj = torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not _refused_for_code(exc):  # not a pickle at all: garbage, truncated, or another format
            raise CheckpointError(
                f"{what} {path} is not a readable checkpoint (corrupt, truncated or another format: "
                f"{_printable_first_line(exc)[:160]}): download or save it again (a plain state dict, torch.save or .safetensors)"
            ) from None
        # torch's own message goes on to suggest weights_only=False, i.e. running the file's code:
        # that is exactly what densepure-rt never does, so it is not repeated here.
        raise CheckpointError(
            f"{what} {path} needs pickled code to load (a whole pickled model or custom objects): densepure-rt only "
            "reads plain state dicts; save model.state_dict() with torch.save, or convert it to .safetensors"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError) as exc:
        first = _printable_first_line(exc)
        if "weights_only" in first or "Weights only" in first:
            raise CheckpointError(
                f"{what} {path} needs pickled code to load: densepure-rt only reads plain state dicts; save "
                "model.state_dict() with torch.save, or convert it to .safetensors"
            ) from None
        raise CheckpointError(
            f"{what} {path} is not a readable checkpoint (corrupt, truncated or another format: {first[:160]}): "
            "download or save it again (a plain state dict, torch.save or .safetensors)"
        ) from None
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], Mapping) and len(obj) <= 4:
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(f"{what} {path} is not a state dict (a mapping of parameter names to tensors)")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file's tensors on the CPU. safetensors takes UTF-8 names only: a name that
    is not (Python holds its undecodable bytes as surrogate escapes, U+DC80-U+DCFF) is opened here
    and its bytes handed over, which holds the file in memory twice while the tensors are made."""
    from safetensors.torch import load, load_file

    try:
        if any("\udc80" <= ch <= "\udcff" for ch in str(path)):
            with open(path, "rb") as handle:
                return load(handle.read())
        return load_file(path, device="cpu")
    except OSError:
        raise
    except Exception as exc:  # safetensors raises its own SafetensorError for corrupt headers
        raise ValueError(str(exc)) from None


def _printable_first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return "".join(ch for ch in first if ch.isprintable())  # no terminal escape codes


def _refused_for_code(exc: pickle.UnpicklingError) -> bool:
    """Whether torch's weights-only unpickler refused a well-formed pickle because it names code
    (a class, a function), as opposed to bytes that are no pickle at all ("invalid load key")."""
    text = str(exc)
    return "Weights only load failed" in text or "Unsupported global" in text or "Unsupported operand" in text


def load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str = "checkpoint") -> None:
    """``module.load_state_dict(state, strict=True)`` with one readable error listing what differs."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches (e.g. {'; '.join(mismatched[:3])})")
        raise CheckpointError(f"{what} does not match the model config: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)
