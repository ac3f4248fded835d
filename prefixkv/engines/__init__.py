"""Runners: one interface (``base.Runner``), several backends.

    runner = load_runner("engines/smollm2-k20")                      # ONNX Runtime, CPU
    runner = load_runner("engines/smollm2-k20", backend="torch")     # the PyTorch reference
    runner.generate("Hello", GenerationConfig(max_new_tokens=32))

Backends are imported lazily: this package imports numpy only (it also runs inside
Triton's Python backend, where torch and transformers may be missing).
"""
from __future__ import annotations

from pathlib import Path

from ..defaults import EVICT_DISTANCE
from .base import Generation, GenerationConfig, PromptError, Runner

BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch")
ALIASES = {"ort": "onnxruntime", "onnx": "onnxruntime", "pytorch": "torch", "reference": "torch"}


def engine_backend(engine_dir: str | Path) -> str:
    """The backend an engine folder was built for (its manifest's ``backend``; older folders: onnxruntime)."""
    from ..engine_folder import read_manifest

    return read_manifest(engine_dir, verify=False).get("backend") or "onnxruntime"


def load_runner(engine_dir: str | Path, backend: str = "auto", threads: int | None = None,
                providers=None, verify: bool = True, **kwargs) -> Runner:
    """A runner for an engine folder.

    backend: "auto" (the backend the engine was built for), "onnxruntime" (the engine's
    graphs; ``providers`` e.g. ["cuda"]), "tensorrt" (its TensorRT engines; GPU) or "torch"
    (the engine's model, profile and keep fraction through the PyTorch reference cache;
    needs torch and transformers, and the model the engine was built from).
    """
    name = ALIASES.get(str(backend).lower(), str(backend).lower())
    if name == "auto":
        name = engine_backend(engine_dir)
    if name == "tensorrt":
        from .tensorrt import TensorRTRunner

        return TensorRTRunner(engine_dir, verify=verify)
    if name == "onnxruntime":
        from .onnxruntime import OnnxRuntimeRunner

        return OnnxRuntimeRunner(engine_dir, providers=providers, threads=threads, verify=verify, **kwargs)
    if name == "torch":
        return _torch_runner(engine_dir, threads=threads, verify=verify, **kwargs)
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def _torch_runner(engine_dir, threads=None, verify=True, model=None, **kwargs) -> Runner:
    from ..engine_folder import read_manifest

    manifest = read_manifest(engine_dir, verify=verify)
    try:
        from .torch import TorchRunner
    except ImportError as err:
        raise ImportError(f"the torch backend needs PyTorch and transformers ({err}); pip install torch transformers") from err
    model, _, settings = reference_settings(engine_dir, manifest, model, threads)
    return TorchRunner(model, engine_dir, **settings, **kwargs)


def reference_settings(engine_dir, manifest: dict, model=None, threads: int | None = None):
    """What the PyTorch reference of an engine needs: (model, the processor or tokenizer
    ``load_model`` gave, or None when ``model`` was given, PrefixKVCache settings: the
    engine's profile (checked against the model), keep fraction, method and eviction)."""
    import torch

    from ..profile import Fingerprint, RetentionProfile

    if threads is not None:
        torch.set_num_threads(threads)
    loaded = None
    if model is None:
        from ..models import load_model

        model, loaded = load_model(manifest["model"]["source"])
    profile = RetentionProfile.load(Path(engine_dir) / "profile.json")
    profile.check_model(Fingerprint.of(model.config))
    settings = dict(profile=profile, keep_fraction=float(manifest["keep_fraction"]), method="prefixkv",
                    evict_distance=int(manifest.get("evict_distance", EVICT_DISTANCE)))
    return model, loaded, settings


__all__ = ["BACKENDS", "engine_backend", "Generation", "GenerationConfig", "PromptError", "Runner", "load_runner"]
