"""User-facing errors. The CLI prints any of these as one line and exits non-zero (no traceback)."""


class DensePureError(Exception):
    """Base class of every error that is the user's to fix (bad file, bad flag, bad data)."""


class ConfigError(DensePureError):
    """Impossible or inconsistent parameters (sigma <= 0, alpha outside (0, 1), unknown preset...)."""


class CheckpointError(DensePureError):
    """A checkpoint is missing, is not a plain state dict, or does not match the model config."""


class EngineError(DensePureError):
    """An engine directory is missing, edited, corrupt, or built for another backend/GPU/version."""


class DataError(DensePureError):
    """Input images are missing, unreadable, of the wrong shape, or not finite."""


def install_hint(extra: str) -> str:
    """How to add one of densepure-rt's optional extras, the way the README installs it: from the
    source checkout (the package is not published on PyPI)."""
    return f"pip install -e '.[{extra}]' in your densepure-rt checkout"
