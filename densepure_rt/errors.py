"""User-facing errors. The CLI prints any of these as one line and exits non-zero (no traceback).

Also :func:`signals_held`, the one place Ctrl-C, SIGTERM and SIGHUP are held while something must not be
interrupted half-way (the CLI's imports of C extensions, the build's work folder).
"""

import contextlib
import re
import signal
import threading

#: How the command line spells the Python API's parameters: an error names ``sigma`` to a caller of
#: the API and ``--sigma`` on the command line (:func:`param`, :func:`cli_message`).
CLI_FLAGS = {
    "sigma": "--sigma", "alpha": "--alpha", "n0": "--n0", "n": "--n", "n_max": "--n-max", "votes": "--votes",
    "steps": "--steps", "batch": "--batch", "seed": "--seed", "round_size": "--round", "radii": "--radius",
    "tol": "--tol", "in_flight": "--images-per-call", "threads": "--threads", "device": "--device",
    "kernels": "--kernels", "early_exit": "--early-exit",
}

_PARAM = re.compile("\x1f([A-Za-z_][A-Za-z0-9_]*)(?:\x1e([^\x1f]*))?\x1f")


def param(name: str, value: str | None = None) -> str:
    """A parameter's name (and a value for it) inside an error message: shown as the API's keyword
    (``sigma``, ``device='cuda'``) by ``str(error)``, and as its flag (``--sigma``, ``--device cuda``)
    by the command line (:func:`cli_message`)."""
    return f"\x1f{name}\x1f" if value is None else f"\x1f{name}\x1e{value}\x1f"


def _api(match: re.Match) -> str:
    name, value = match.group(1), match.group(2)
    return name if value is None else f"{name}={value!r}"


def _cli(match: re.Match) -> str:
    name, value = match.group(1), match.group(2)
    flag = CLI_FLAGS.get(name, name)
    return flag if value is None else f"{flag} {value}"


def cli_message(exc: BaseException) -> str:
    """An error's message with parameter names spelled as the command line's flags."""
    return _PARAM.sub(_cli, Exception.__str__(exc))


class DensePureError(Exception):
    """Base class of every error that is the user's to fix (bad file, bad flag, bad data). Its
    message names the API's parameters (``sigma``); the command line shows flags instead."""

    def __str__(self) -> str:
        return _PARAM.sub(_api, super().__str__())


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


def first_line(exc: BaseException | str, limit: int = 400) -> str:
    """One line of an exception (or message) for a one-line error: its first line, at most ``limit``
    characters; for ONNX Runtime's errors the status message (the part that says what went wrong,
    e.g. a failed allocation) with the node it names; the exception's type where it says nothing."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__ if isinstance(exc, BaseException) else "no reason given"
    line = text.splitlines()[0]
    if "Status Message:" in line:
        before, _, message = line.partition("Status Message:")
        node = before.split("while running")[-1].strip().rstrip(".")
        line = f"{node}: {message.strip()}"
    return line[:limit]


@contextlib.contextmanager
def signals_held():
    """Hold SIGINT, SIGTERM and SIGHUP while the block runs; a signal that came meanwhile is raised when it ends.

    For imports of C extensions: an exception raised while one initialises (onnx's nanobind enums,
    torch) aborts the interpreter (SIGABRT/SIGSEGV seen on Ctrl-C during ``build``) instead of
    unwinding, and with it the clean-up of the build's work folder; and for making that folder, so a
    signal cannot land between its creation and the clean-up's try. Outside the main thread, or
    where signal masks do not exist, the block runs as is."""
    held = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)  # a pending signal is delivered (and raised) here
