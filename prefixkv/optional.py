"""The one way prefixkv imports an optional heavy dependency (TensorRT, TensorRT-LLM, triton,
onnxruntime-genai): when it is asked for, with a one-line error naming how to get it."""
from __future__ import annotations

import importlib
from types import ModuleType


class StackMissing(ImportError, RuntimeError):
    """An optional dependency (TensorRT, TensorRT-LLM, triton, ...) or a GPU is missing; the message
    names the fix.  An ImportError, so the CLI prints it as one line (and a RuntimeError, for
    callers that catch that)."""


def optional_import(module: str, install: str, name: str | None = None) -> ModuleType:
    """``importlib.import_module(module)``, or ``StackMissing``: "NAME is not installed: INSTALL"."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise StackMissing(f"{name or module} is not installed: {install}") from err


__all__ = ["StackMissing", "optional_import"]
