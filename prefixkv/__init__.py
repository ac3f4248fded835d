"""prefixkv: PrefixKV-compressed KV caches for Hugging Face decoder LLMs, from calibration to Triton.

    from prefixkv import load_model, PrefixKVCache, RetentionProfile
    model, tokenizer = load_model("smollm2-135m")
    profile = RetentionProfile.load("profile.json")
    model.generate(ids, past_key_values=PrefixKVCache(profile, keep_fraction=0.2))

The names below are imported when first used (PEP 562), so ``import prefixkv`` and the
runtime (``prefixkv.engines``, ``prefixkv.tokenizer``, ``prefixkv.engine_folder``) load
neither torch nor transformers.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "PrefixKVCache": "prefixkv.cache",
    "RetentionProfile": "prefixkv.profile",
    "ProfileError": "prefixkv.profile",
    "enable": "prefixkv.attention",
    "load_model": "prefixkv.models",
    "prefix_search": "prefixkv.search",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'prefixkv' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
