"""The engine directory's ``manifest.json``: what was built, for which backend, and checksums.

The runtime reads nothing but the manifest and the files it lists. :func:`load_manifest` refuses,
in one sentence, anything it cannot honour: a missing or edited manifest, a changed file, an
unknown schema, a backend that is not installed, a plan built for another GPU or version.
The manifest carries a checksum of its own content, so an edit by hand is caught too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from . import __version__
from .errors import EngineError

__all__ = ["SCHEMA_VERSION", "MANIFEST", "sha256_file", "write_manifest", "load_manifest"]

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
_SELF_KEY = "manifest_sha256"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _canonical(manifest: dict) -> bytes:
    body = {k: v for k, v in manifest.items() if k != _SELF_KEY}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def write_manifest(directory: str | Path, manifest: dict[str, Any]) -> Path:
    """Hash every file listed under ``manifest['files']``, seal the manifest, write it atomically."""
    directory = Path(directory)
    manifest = dict(manifest)
    manifest.setdefault("schema_version", SCHEMA_VERSION)
    manifest.setdefault("toolkit_version", __version__)
    manifest["files"] = {name: sha256_file(directory / name) for name in sorted(manifest["files"])}
    manifest[_SELF_KEY] = hashlib.sha256(_canonical(manifest)).hexdigest()
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(directory / MANIFEST)
    return directory / MANIFEST


def load_manifest(directory: str | Path, verify_files: bool = True) -> dict[str, Any]:
    """Read and verify ``directory/manifest.json``; raise :class:`EngineError` with one sentence."""
    directory = Path(directory)
    if not directory.is_dir():
        raise EngineError(f"engine directory {directory} does not exist: build one with `densepure-rt build`")
    path = directory / MANIFEST
    if not path.is_file():
        raise EngineError(f"{directory} has no {MANIFEST}: it is not an engine directory (build one with `densepure-rt build`)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EngineError(f"{path} is corrupt ({exc.__class__.__name__}): rebuild the engine") from None
    if not isinstance(manifest, dict) or _SELF_KEY not in manifest:
        raise EngineError(f"{path} is not a densepure-rt manifest: rebuild the engine")
    if hashlib.sha256(_canonical(manifest)).hexdigest() != manifest[_SELF_KEY]:
        raise EngineError(f"{path} was edited after the build (its checksum does not match): rebuild the engine")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise EngineError(
            f"{path} has schema version {manifest.get('schema_version')} but this densepure-rt "
            f"({__version__}) reads version {SCHEMA_VERSION}: rebuild the engine with this version"
        )
    if verify_files:
        for name, digest in manifest.get("files", {}).items():
            file = directory / name
            if not file.is_file():
                raise EngineError(f"engine file {file} is missing: rebuild the engine")
            if sha256_file(file) != digest:
                raise EngineError(f"engine file {file} has changed since the build (sha256 mismatch): rebuild the engine")
    return manifest
