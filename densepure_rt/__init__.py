"""densepure-rt: certify image classifiers with DensePure at production speed.

The runtime package is lean: importing it (or any of its runtime modules) never imports torch.
The PyTorch side lives in ``densepure_rt.export`` (the repository's ``export/`` folder).

The public API is importable from the package itself (loaded on first use, so that
``import densepure_rt`` stays cheap)::

    from densepure_rt import RunSpec, open_engine
"""

import os as _os

__version__ = "0.2.0"

# ONNX Runtime 1.29+ ships telemetry on Linux: at the first session it writes a device id under
# ~/.cache/Microsoft, a session file ($TMPDIR/.ses) and tries an HTTPS upload. A certification
# node is often offline and its data private, so densepure-rt opts out before onnxruntime loads,
# unless the user decided (ORT_DISABLE_TELEMETRY=0 keeps ONNX Runtime's default).
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

#: Public names and the module each lives in.
_PUBLIC = {
    "open_engine": "densepure_rt.runtime",
    "Engine": "densepure_rt.runtime",
    "RunSpec": "densepure_rt.spec",
    "Streamed": "densepure_rt.sampling.stream",
    "CountsResult": "densepure_rt.certificates",
    "RadiiCertificate": "densepure_rt.certificates",
    "EarlyStopCertificate": "densepure_rt.certificates",
    "Certificate": "densepure_rt.stats.cohen",
    "Prediction": "densepure_rt.stats.cohen",
    "DensePureError": "densepure_rt.errors",
    "ConfigError": "densepure_rt.errors",
    "DataError": "densepure_rt.errors",
    "EngineError": "densepure_rt.errors",
    "open_dataset": "densepure_rt.files.data",
    "read_results": "densepure_rt.files.results",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'densepure_rt' has no attribute {name!r}")
