"""``PrefixKVCache``: a transformers ``Cache`` whose layers keep different numbers of entries.

    model.generate(ids, past_key_values=PrefixKVCache(profile, keep_fraction=0.2))

Prefill stores every layer's full keys and values and records each layer's importance
scores (through the ``prefixkv`` attention, see ``prefixkv.attention``).  At the start of
the next forward (or on ``compress()``) each layer keeps round(fraction_l x prompt_len)
entries, chosen by the method's scorer and allocation, in original order.  During
decoding each layer stays within its fraction of all tokens seen, evicting the entry
``evict_distance`` slots before the end of the compacted prompt.

Masks and positions are owned here, per layer: ``get_seq_length`` counts the columns seen
(padded prompt plus new tokens), so transformers' default positions stay original, and
each layer's attention mask comes from its own validity flags.
"""
from __future__ import annotations

import functools

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import attention as _attention
from .compaction import compact, decode_budget, evict
from .policies import Method, Profiled, make_method
from .scoring import attention_with_scores, decode_attention, make_scorer
from .search import PAPER, SearchSettings


@functools.lru_cache(maxsize=None)
def _cache_parameter(forward) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def cache_argument(model, cache) -> dict:
    """``{"cache": cache}`` for models whose forward takes ``cache`` (transformers >= 5.2x, where
    ``past_key_values`` is deprecated), else ``{"past_key_values": cache}``."""
    kind = type(model)
    return {_cache_parameter(getattr(kind, "forward", kind.__call__)): cache}


class PrefixKVLayer(CacheLayerMixin):
    """One layer: keys/values (batch, kv_heads, W, head_dim), positions/valid (batch, W)."""

    is_compileable = False
    is_sliding = False

    def __init__(self):
        super().__init__()
        self.positions: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None  # (batch, S) during prefill only

    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):  # PrefixKVCache.update does the work
        raise RuntimeError("use PrefixKVCache.update")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = self.positions = self.valid = self.scores = None
        self.is_initialized = False


class PrefixKVCache(Cache):
    """A KV cache compressed with a PrefixKV profile or one of the baseline methods.

    profile: a ``RetentionProfile`` (needed by ``method="prefixkv"``).
    keep_fraction: the global fraction of entries kept (0.2 keeps 20%).
    method: full | streaming | h2o | snapkv | tova | pyramidkv | prefixkv | prefixkv-online | custom.
    scorer / allocation: override the method's importance score / layer allocation.
    sink: first tokens always kept (default: the method's own, a profile's for its allocation);
    protect_last: the last prompt token is always kept.
    search: the ``online`` allocation's curve, floor and blend (default: the paper's).
    evict_distance: decode-phase eviction slot, counted back from the end of the compacted prompt
        (default: the method's own: the oldest entry for StreamingLLM, a profile's, else 25).
    """

    def __init__(
        self,
        profile=None,
        keep_fraction: float = 0.2,
        method: str | Method | None = None,
        scorer: str | None = None,
        scorer_params: dict | None = None,
        allocation: str | None = None,
        sink: int | None = None,
        protect_last: bool | None = None,
        evict_distance: int | None = None,
        search: SearchSettings = PAPER,
        force_scorer: bool = False,
        score_block: int = 256,
        record: list | tuple = (),
    ):
        super().__init__(layer_class_to_replicate=PrefixKVLayer)
        if not 0 < keep_fraction <= 1:
            raise ValueError(f"keep_fraction must be in (0, 1] (0.2 keeps 20% of the entries), got {keep_fraction}")
        if method is None:
            method = "prefixkv" if profile is not None else "prefixkv-online"
        if isinstance(method, str):
            method = make_method(method, profile, scorer, scorer_params, allocation, evict_distance,
                                 search, force_scorer, sink)
        if isinstance(method.allocation, Profiled):
            method.allocation.profile.layer_fractions(keep_fraction)  # fail now on an uncalibrated fraction
        self.method = method
        self.keep_fraction = float(keep_fraction)
        self.sink = sink if sink is not None else method.sink  # the method's own (a profile's for its allocation)
        self.protect_last = protect_last if protect_last is not None else (profile.protect_last if profile is not None else True)
        self.score_block = score_block
        self.record = [make_scorer(r) for r in record]  # extra scorers recorded at prefill (calibration)
        self.recorded: dict[str, list[torch.Tensor]] = {}  # scorer key -> per layer (batch, S)
        self.prompt_valid: torch.Tensor | None = None  # (batch, S) validity of the prefill columns
        self.prompt_scores: list[torch.Tensor] | None = None  # per layer (batch, S): the scores compaction chose by
        self.columns = 0  # padded prompt length + tokens decoded: what get_seq_length reports
        self.prompt_lengths: torch.Tensor | None = None  # (batch,) real prompt lengths
        self.seen: torch.Tensor | None = None  # (batch,) real tokens seen
        self.layer_fractions: torch.Tensor | None = None  # (layers,) or (layers, batch) after compaction
        self._prefilled = False
        self._pending = False
        self._step_base: torch.Tensor | None = None

    # -- transformers Cache API --------------------------------------------------------------
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Store this forward's keys/values for ``layer_idx`` and return what attention sees."""
        stale = _attention.pending()
        if stale is not None and stale[0] is self:
            raise RuntimeError(
                "PrefixKVCache needs the model's attention implementation 'prefixkv': call "
                "prefixkv.enable(model) first (models from prefixkv.load_model already use it)"
            )
        while len(self.layers) <= layer_idx:
            self.layers.append(PrefixKVLayer())
        layer = self.layers[layer_idx]
        q = key_states.shape[2]
        if layer_idx == 0:
            if self._pending:
                self.compress()
            if self._prefilled:
                self._step_base = self.seen
                self.seen = self.seen + q
            self.columns += q
        if not self._prefilled:
            layer.lazy_initialization(key_states, value_states)
            layer.keys, layer.values = key_states, value_states
        else:
            new_positions = self._step_base.unsqueeze(-1) + torch.arange(q, device=key_states.device)
            layer.keys = torch.cat([layer.keys, key_states], dim=2)
            layer.values = torch.cat([layer.values, value_states], dim=2)
            layer.positions = torch.cat([layer.positions, new_positions], dim=-1)
            layer.valid = torch.cat([layer.valid, torch.ones_like(new_positions, dtype=torch.bool)], dim=-1)
        _attention.offer(self, layer_idx, layer.keys)
        return layer.keys, layer.values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.columns

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.columns + query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.columns

    def get_max_length(self, layer_idx=None) -> int:
        return -1

    def reset(self):
        super().reset()
        self.columns, self._prefilled, self._pending = 0, False, False
        self.prompt_lengths = self.seen = self.layer_fractions = self.prompt_valid = self.prompt_scores = None
        self.recorded = {}

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("PrefixKVCache does not support beam search; use greedy or sampling")

    # -- attention (called by the prefixkv attention function) ----------------------------------
    def attend(self, layer_idx, query, key, value, attention_mask, scaling):
        """Attention for one layer; records scores in prefill, keeps the budget in decoding."""
        layer = self.layers[layer_idx]
        if not self._prefilled:
            return self._prefill_attention(layer, query, key, value, attention_mask, scaling)
        out = decode_attention(query, key, value, layer.valid, scaling)
        self._keep_budget(layer_idx)
        return out

    def _prefill_attention(self, layer, query, key, value, attention_mask, scaling):
        b, s, q = key.shape[0], key.shape[2], query.shape[2]
        valid = _attention.key_validity(attention_mask, b, s, key.device)
        layer.valid, self.prompt_valid = valid, valid
        layer.positions = torch.where(valid, valid.long().cumsum(-1) - 1, torch.full_like(valid, -1, dtype=torch.long))
        scorers = ([self.method.scorer] if self.method.compresses else []) + self.record
        by_attention = [sc for sc in scorers if sc.query_rows(q) > 0]
        if by_attention:
            out, masses = attention_with_scores(
                query, key, value, valid, scaling, [sc.query_rows(q) for sc in by_attention], self.score_block
            )
            found = {id(sc): sc.from_attention(m, valid) for sc, m in zip(by_attention, masses)}
        else:
            out, found = decode_attention(query, key, value, valid, scaling), {}
        scores = [found[id(sc)] if id(sc) in found else sc.from_keys(key, valid) for sc in scorers]
        layer.scores = scores[0] if self.method.compresses else None
        for sc, score in zip(self.record, scores[len(scorers) - len(self.record):]):
            self.recorded.setdefault(sc.key, []).append(score)
        self._pending = True
        return out

    # -- compaction -----------------------------------------------------------------------------
    def compress(self) -> None:
        """Compact every layer after a prefill (done automatically at the next forward)."""
        if not self._pending:
            return
        missing = [i for i, layer in enumerate(self.layers) if layer.valid is None]
        if missing:
            raise RuntimeError(
                f"layers {missing[:5]} were not scored: the model must use the 'prefixkv' attention "
                "(prefixkv.enable(model))"
            )
        valid = self.layers[0].valid
        self.prompt_lengths = valid.sum(-1)
        self.seen = self.prompt_lengths.clone()
        n_layers = len(self.layers)
        if self.method.compresses:
            scores = torch.stack([layer.scores for layer in self.layers]) if self.method.allocation.needs_all_layers else None
            fractions = self.method.allocation.fractions(
                self.keep_fraction, n_layers, scores, valid, self.sink, self.protect_last
            )
            for i, layer in enumerate(self.layers):
                self.compact_layer(layer, fractions[i])
        else:
            fractions = torch.ones(n_layers, dtype=torch.float64)
        self.prompt_scores = [layer.scores for layer in self.layers] if self.method.compresses else None
        for layer in self.layers:
            layer.scores = None
        self.layer_fractions = fractions
        self._pending = False
        self._prefilled = True

    def compact_layer(self, layer: PrefixKVLayer, fraction: torch.Tensor) -> None:
        """Keep ``layer``'s round(fraction x prompt length) most important entries (``compaction.compact``);
        a subclass may do it another way (a fused kernel, say)."""
        layer.keys, layer.values, layer.positions, layer.valid = compact(
            layer.keys, layer.values, layer.scores, layer.valid, fraction.to(torch.float32), self.sink, self.protect_last
        )

    def _keep_budget(self, layer_idx: int) -> None:
        """Evict until the layer is within its fraction of all tokens seen (the decode rule)."""
        if not self.method.compresses:
            return
        layer = self.layers[layer_idx]
        f = self.layer_fractions[layer_idx].to(torch.float32)
        cap, slot = decode_budget(self.prompt_lengths, self.seen, f, self.sink, self.protect_last,
                                  self.method.evict_distance)
        while bool((layer.valid.sum(-1) > cap).any()):
            layer.keys, layer.values, layer.positions, layer.valid = evict(
                layer.keys, layer.values, layer.positions, layer.valid, cap, slot
            )

    # -- inspection -----------------------------------------------------------------------------
    def recorded_scores(self) -> dict[str, torch.Tensor]:
        """Scores of the ``record=`` scorers from the last prefill: key -> (layers, batch, S)."""
        return {k: torch.stack(v) for k, v in self.recorded.items()}

    def kept_positions(self) -> list[torch.Tensor]:
        """Per layer, (batch, W) int64 original positions of the kept entries (-1: empty slot)."""
        self.compress()
        return [layer.positions for layer in self.layers]

    def layer_lengths(self) -> torch.Tensor:
        """(layers, batch) entries held per layer and row."""
        self.compress()
        return torch.stack([layer.valid.sum(-1) for layer in self.layers])

    def kv_bytes(self) -> int:
        """Bytes of key and value storage actually held (all slots, all layers)."""
        self.compress()
        return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in self.layers)
