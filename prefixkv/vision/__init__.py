"""What is vision-specific (LLaVA-1.5 layout: CLIP vision tower, projector, Llama); the stages are the text ones.

    data.py          LLaVA conversation files, JSONL with "image", Pillow loading, <image> checks, test pictures
    preprocess.py    the model's image processor settings applied with Pillow + numpy (run time)
    calibration.py   calibrate_vision: the image pixels into calibration, the image/text share of kept entries
    export.py        the vision tower graph and the prefill graph taking image embeddings
    serving.py       the Triton model's ``image`` input (encoded bytes)

``prefixkv.pipeline``, ``prefixkv.evaluation``, ``prefixkv.engines`` (``images.ImageInputs``)
and the CLI take images when the model has a vision tower or the engine a vision graph.
Imports nothing heavy here: this package's data, preprocessing and serving modules are
vendored into Triton model repositories.
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
