"""Runners: one interface (``base.Runner``), several backends, text or images.

    runner = load_runner("engines/smollm2-k20")                      # ONNX Runtime, CPU
    runner = load_runner("engines/smollm2-k20", backend="torch")     # the PyTorch reference
    runner.generate("Hello", GenerationConfig(max_new_tokens=32))
    runner = load_runner("engines/llava-k20")                        # a vision engine: takes images
    runner.generate("<image>\\nWhat is shown?", GenerationConfig(), images=["cat.png"])

The modality is chosen once, from the manifest: a vision engine's runner adds the image
input adapter (``images.ImageInputs``) to the same interface.  This package and its
ONNX Runtime backend import numpy, onnxruntime, tokenizers, jinja2 and Pillow only (they
run inside Triton's Python backend); the torch and TensorRT backends are imported when asked for.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from ..engine_folder import check_validated, read_manifest
from .base import Generation, GenerationConfig, PromptError, Runner
from .onnxruntime import OnnxRuntimeRunner, VisionOnnxRuntimeRunner
from .tensorrt import (
    TensorRTRunner,  # imports TensorRT and torch only when an engine is loaded
)

BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch")
ALIASES = {"ort": "onnxruntime", "onnx": "onnxruntime", "pytorch": "torch", "reference": "torch"}


def engine_backend(engine_dir: str | Path) -> str:
    """The backend an engine folder was built for (its manifest's ``backend``; older folders: onnxruntime)."""
    return read_manifest(engine_dir, verify=False).get("backend") or "onnxruntime"


def backend_name(backend: str) -> str:
    """A backend name or alias as one of ``BACKENDS`` (ValueError naming them otherwise)."""
    name = ALIASES.get(str(backend).lower(), str(backend).lower())
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return name


def load_runner(engine_dir: str | Path, backend: str = "auto", threads: int | None = None,
                providers=None, verify: bool = True, allow_failed_validation: bool = False,
                prefill_chunk: int | None = None, **kwargs) -> Runner:
    """A runner for an engine folder.

    backend: "auto" (the backend the engine was built for), "onnxruntime" (the engine's
    graphs; ``providers`` e.g. ["cuda"]), "tensorrt" (its TensorRT engines; GPU) or "torch"
    (the engine's model, profile and keep fraction through the PyTorch reference cache;
    needs torch and transformers, and the model the engine was built from; ``model=`` /
    ``processor=`` pass one already loaded).  An engine whose validation failed is refused
    unless ``allow_failed_validation``.  prefill_chunk: prompt tokens per decoder-graph run of an
    ONNX Runtime engine (None: ``defaults.PREFILL_CHUNK``).
    """
    name = backend_name(backend)
    manifest = read_manifest(engine_dir, verify=False)
    check_validated(engine_dir, manifest, allow_failed_validation)
    vision = bool(manifest.get("vision"))
    if name == "auto":
        name = manifest.get("backend") or "onnxruntime"
    if name == "tensorrt":
        if vision:
            raise ValueError(f"{engine_dir} is a vision engine; vision engines run on onnxruntime or torch (no TensorRT vision graph yet)")
        return TensorRTRunner(engine_dir, verify=verify)
    if name == "onnxruntime":
        cls = VisionOnnxRuntimeRunner if vision else OnnxRuntimeRunner
        return cls(engine_dir, providers=providers, threads=threads, verify=verify, prefill_chunk=prefill_chunk, **kwargs)
    try:
        torch_backend = importlib.import_module(".torch", __name__)
    except ImportError as err:
        raise ImportError(f"the torch backend needs PyTorch and transformers ({err}); pip install torch transformers") from err
    return torch_backend.load_torch_runner(engine_dir, threads=threads, verify=verify, **kwargs)


__all__ = ["BACKENDS", "backend_name", "engine_backend", "Generation", "GenerationConfig", "PromptError", "Runner", "load_runner"]
