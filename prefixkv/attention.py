"""The ``prefixkv`` attention implementation, registered by name with transformers.

Per-layer caches have different lengths, so one mask built from layer 0 cannot serve
every layer.  The ``prefixkv`` mask function therefore passes the 2D padding mask
through untouched, and the ``prefixkv`` attention function builds each layer's mask from
the cache's own per-layer state (and records importance scores during prefill).

Select it per model instance: ``prefixkv.enable(model)`` (``load_model`` does it).  No
global patching: other models keep their own implementation.

The cache and the attention call meet through a thread-local hand-off: ``update`` leaves
(cache, layer, key tensor) and the attention function takes it back only for that exact
key tensor, so concurrent generations in other threads never mix.
"""
from __future__ import annotations

import threading

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from . import architectures
from .scoring import decode_attention

NAME = "prefixkv"
_handoff = threading.local()


def offer(cache, layer_idx: int, key: torch.Tensor) -> None:
    _handoff.value = (cache, layer_idx, key)


def pending():
    return getattr(_handoff, "value", None)


def _take(module, key):
    value = pending()
    if value is not None and value[1] == getattr(module, "layer_idx", None) and value[2] is key:
        _handoff.value = None
        return value[0]
    return None


def key_validity(attention_mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """(batch, length) bool validity of the last ``length`` positions from a 2D padding mask."""
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    mask = attention_mask.to(torch.bool)
    if mask.shape[-1] >= length:
        return mask[:, -length:]
    pad = torch.ones(batch, length - mask.shape[-1], dtype=torch.bool, device=device)
    return torch.cat([pad, mask], dim=-1)


class WindowExceeded(ValueError):
    """A sequence longer than the model's sliding window."""


def prefixkv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query (batch, heads, q, head_dim); key/value (batch, kv_heads, S, head_dim).
    Returns (output (batch, q, heads, head_dim), None)."""
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    cache = _take(module, key)
    window = getattr(module, "prefixkv_window", None)
    if window is not None:
        seen = cache.columns if cache is not None else key.shape[2]
        if seen > window:
            raise WindowExceeded(f"the model attends within a sliding window of {window} tokens and prefixkv keeps every "
                                 f"sequence inside it (its engines' context is {window}); this one has {seen} tokens: "
                                 f"use prompts and new tokens of at most {window} in all")
    if cache is not None:
        return cache.attend(module.layer_idx, query, key, value, attention_mask, scaling), None
    if not getattr(module, "is_causal", True) or (attention_mask is not None and attention_mask.dim() == 4):
        # bidirectional modules and ready-made 4D masks: plain SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    valid = key_validity(attention_mask, key.shape[0], key.shape[2], key.device)
    return decode_attention(query, key, value, valid, scaling), None


def passthrough_mask(batch_size=None, q_length=None, kv_length=None, q_offset=0, kv_offset=0,
                     mask_function=None, attention_mask=None, **kwargs):
    """The 2D padding mask (batch, kv_length) bool, or None: each layer builds its own."""
    return attention_mask


AttentionInterface.register(NAME, prefixkv_attention)
AttentionMaskInterface.register(NAME, passthrough_mask)


def enable(model) -> None:
    """Use the ``prefixkv`` attention in ``model``'s language model (needed by ``PrefixKVCache``).

    In a vision-language model only the text sub-model switches; the vision tower keeps
    its own (bidirectional) attention.  Models whose attention has features this
    implementation lacks (soft-capping, windows on some layers: Gemma 2/3) are refused with
    the reason (``architectures.check``).  A sliding window over every layer (Mistral, Phi-3)
    is kept by keeping every sequence within it: longer input is refused, in one line.
    """
    found = architectures.check(model)
    for module in model.modules():  # the text layers' attention modules
        if hasattr(module, "layer_idx") and hasattr(module, "o_proj"):
            module.prefixkv_window = found.window
    sub_configs = getattr(model.config, "sub_configs", {}) or {}
    if "text_config" in sub_configs:
        model.set_attn_implementation({"text_config": NAME})
    else:
        model.set_attn_implementation(NAME)
