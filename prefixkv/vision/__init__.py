"""Vision-language models (LLaVA-1.5 layout: CLIP vision tower, projector, Llama) end to end.

    data.py          LLaVA conversation files, JSONL with "image", Pillow loading, <image> checks
    calibration.py   calibrate_vision: profiles from image prompts + image/text share of kept entries
    evaluation.py    evaluate_vision: PPL of reference answers, ROUGE-L vs full-cache generations
    export.py        vision graph, prefill-with-image-embeddings graph, build_vision_engine
    preprocess.py    the model's image processor settings applied with Pillow + numpy (run time)
    runner.py        VisionOnnxRuntimeRunner, load_vision_runner (numpy/onnxruntime only)
    torch_runner.py  TorchVisionRunner: the Hugging Face model + PrefixKVCache (the reference)
    validate.py      validate_vision_engine: vision graph, prefill graph, lockstep generation
    serving.py       the Triton model's ``image`` input (encoded bytes)
    commands.py      ``prefixkv vision calibrate|eval|build|generate|validate``

Imports nothing heavy here: this package is vendored into Triton model repositories.
"""
from __future__ import annotations

import json
from pathlib import Path


def is_vision_source(source: str | Path) -> bool:
    """True for a local model folder whose config.json has a ``vision_config`` (no model is loaded)."""
    path = Path(source).expanduser() / "config.json"
    try:
        return "vision_config" in json.loads(path.read_text())
    except (OSError, ValueError):
        return False


def is_vision_model(model) -> bool:
    """True for a loaded vision-language model (its config has a ``vision_config``)."""
    return getattr(getattr(model, "config", None), "vision_config", None) is not None


def is_vision_engine(engine_dir: str | Path) -> bool:
    """True when an engine folder's manifest has a ``vision`` entry (no hashing)."""
    try:
        return bool(json.loads((Path(engine_dir) / "manifest.json").read_text()).get("vision"))
    except (OSError, ValueError, AttributeError):
        return False


__all__ = ["is_vision_engine", "is_vision_model", "is_vision_source"]
