"""The PyTorch reference runner: the Hugging Face model with a ``PrefixKVCache``.

Same interface as every engine (``prefixkv.engines.base.Runner``), so validation compares
an engine with this runner and nothing else.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..cache import PrefixKVCache, cache_argument
from ..tokenizer import Tokenizer
from .base import Runner


class TorchState:
    """cache: the PrefixKVCache; mask: (batch, columns) 2D padding mask so far."""

    def __init__(self, cache: PrefixKVCache, mask: torch.Tensor):
        self.cache, self.mask = cache, mask


class TorchRunner(Runner):
    """model: a transformers causal LM using the ``prefixkv`` attention (``prefixkv.enable``);
    tokenizer_folder: the folder with tokenizer.json (the model folder or an engine folder);
    the other arguments are ``PrefixKVCache``'s (method, profile, keep fraction...)."""

    name = "torch"

    def __init__(self, model, tokenizer_folder: str | Path, profile=None, keep_fraction: float = 1.0,
                 method: str | None = None, **cache_kwargs):
        self.model = model
        self.tokenizer = Tokenizer(tokenizer_folder)
        text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.max_context = int(getattr(text_config, "max_position_embeddings", 2048))
        if method is None:
            method = "full" if (profile is None and keep_fraction >= 1.0) else None
        self.cache_args = dict(profile=profile, keep_fraction=keep_fraction, method=method, **cache_kwargs)

    def new_cache(self) -> PrefixKVCache:
        return PrefixKVCache(**self.cache_args)

    @torch.no_grad()
    def prefill(self, input_ids, attention_mask):
        ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
        mask = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        cache = self.new_cache()
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **cache_argument(self.model, cache),
                         use_cache=True, logits_to_keep=1)
        cache.compress()
        return out.logits[:, -1].float().numpy(), TorchState(cache, mask)

    @torch.no_grad()
    def decode(self, state: TorchState, token_ids):
        ids = torch.as_tensor(np.asarray(token_ids), dtype=torch.long).view(-1, 1)
        mask = torch.cat([state.mask, torch.ones_like(ids)], dim=-1)
        positions = state.cache.seen.view(-1, 1).clone()
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         **cache_argument(self.model, state.cache), use_cache=True)
        return out.logits[:, -1].float().numpy(), TorchState(state.cache, mask)

    def kept_positions(self, state: TorchState) -> list[np.ndarray]:
        return [p.numpy() for p in state.cache.kept_positions()]
