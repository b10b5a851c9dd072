"""Optional dependencies: what each pip extra of the project brings, and a clear error when it is missing.

    local  moto[server]          the local stack's S3 server (hashlake/local/s3_server.py)
    bench  matplotlib, faiss-cpu report plots (``hashlake report --out``), the benchmarks' reference
    test   pytest & co           the test suite

Production code (the encode workers, the intake, beat, the retraining job) needs none of them: a
module that uses one imports it inside the function that needs it, through ``require``.
"""
from __future__ import annotations

import importlib
from types import ModuleType

EXTRAS = {"moto": "local", "matplotlib": "bench", "faiss": "bench"}


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require(module: str, purpose: str) -> ModuleType:
    """``import module``, or ``MissingExtra`` saying that ``purpose`` needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        extra = EXTRAS.get(top)
        how = f"pip install 'hashlake[{extra}]'" if extra else f"pip install {top}"
        raise MissingExtra(f"{purpose} needs {top}, which is not installed: {how}", name=top) from exc
