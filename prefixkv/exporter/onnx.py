"""Export a Hugging Face decoder to ONNX graphs with PrefixKV compaction inside.

An ONNX Runtime engine holds one graph with the weights and one without:

    decoder(input_ids, position_ids, prompt_lengths, past_widths, [score_from], past.positions,
            past.valid, per layer past key/value)
            -> logits, present.positions, present.valid, per layer present key/value, [mass]
        A chunk of C >= 1 new tokens per row, for prefill chunks and decode steps alike
        (``DecoderGraph``).  past.{l}.key/value: (B, Hkv, C_l, D) fixed-capacity buffers;
        past.positions/valid: (B, sum of P_l), every layer's slots in use side by side, layer
        by layer, or, where no layer evicts, (B, P): the one set of slots every layer has
        (``SLOTS_KEY``), each row's entries first; past_widths (L,) lists the P_l.  ONNX
        Runtime's fused GroupQueryAttention writes the chunk's K/V into slots [P_l, P_l + C)
        (shared slots: right after each row's entries) in place and attends causally; the
        slot bookkeeping (bias, decode rule) runs once for all layers.
        Where a layer evicts, the graph is one ``If`` over two traced phases
        (``two_phase_graph``), the weights once in the main graph; where none does, it is one
        graph for both (``decoder_phases``).  The prefill phase (a prompt chunk) attends
        unmasked, every slot being in use;
        in a scored layer the op also returns its attention probabilities, and the graph
        sums rows [score_from, C) of them into the slots' mass (O(C x S) memory), every
        scored layer's side by side in one output (a score from the prompt's last R rows,
        ``window`` or ``last-query``: the chunk's last R rows only, so score_from >= C - R, as
        the runner's chunks of a prompt have).  The decode phase masks the empty slots
        with an additive bias (shared slots: with each row's length, no bias), returns no
        probabilities and an empty mass.  Past the prompt,
        the decode-phase rule marks at most one entry per row evicted: the entries returned
        are within budget.

    compact(attention_mask, per layer [mass], key, value) -> per layer key/value/positions/valid
        The end of the prompt (``CompactGraph``): each layer's score (from the summed mass, or
        the keys), protection, TopK of round(fraction_l x prompt_len) entries, index sort and
        GatherElements; the profile's fractions are graph constants.

The runner (``prefixkv.engines.onnxruntime``) runs the prompt through the decoder in chunks,
sums each scored layer's mass over the chunks, calls compact, then decodes one token per
step through the decoder alone.

The two-graph layout (``PrefillGraph``: the whole prompt with (heads x S x S) attention
probabilities, then compaction; ``DecodeGraph``: one token over compact caches in plain
ONNX ops, append by Concat and evict by shifting) remains for the TensorRT plugin-mode
graphs, which build on it.  Every graph is a thin wrapper over the model's own modules
(embeddings, norms, projections, rotary embedding, MLPs) and over ``prefixkv.compaction``,
so the semantics are those of ``PrefixKVCache`` by construction.  Attention never repeats
K/V for grouped-query attention: queries are reshaped to (B, Hkv, group, q, D) and
broadcast against (B, Hkv, 1, W, D), or the fused op does the grouping.

Supported: Llama-family decoders (Llama, Mistral, Qwen2, Qwen3, SmolLM, ...), i.e.
``model.model.{embed_tokens, layers, norm, rotary_emb}`` with ``self_attn.{q,k,v,o}_proj``
(``prefixkv.architectures`` lists the families and what it refuses).
"""
from __future__ import annotations

import logging
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx
import torch
from torch import nn

from .. import __version__, architectures, compaction
from ..defaults import EVICT_DISTANCE, SINK
from ..engine_folder import CACHE_LAYOUT_KEY, FUSIONS_KEY, SCORE_ROWS_KEY, SLOTS_KEY
from ..scoring import causal_mask, make_scorer

OPSET = 18
PHASES = ("prefill", "decode")  # the decoder's two traced variants, one If's branches (``two_phase_graph``)


class ExportError(ValueError):
    """A model or setting the exporter cannot handle, with the fix."""


@dataclass
class GraphSpec:
    """Everything baked into the two graphs besides the weights."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    fractions: list[float]  # per-layer keep fractions: graph constants
    sink: int = SINK
    protect_last: bool = True
    scorer: str = "accumulated"
    scorer_params: dict = field(default_factory=dict)
    evict_distance: int = EVICT_DISTANCE
    dtype: str = "float32"
    max_context: int = 2048  # tokens (prompt and generation); the fused attention's rotary tables have as many rows

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def evicts(self) -> bool:
        """Whether any layer evicts.  A layer whose keep fraction is 1 never holds more entries
        than the tokens seen so far; when no layer evicts, every layer's slots are the same
        ones, and the decoder graph carries one set of them (``DecoderGraph``)."""
        return any(f < 1.0 for f in self.fractions)


# -- names -----------------------------------------------------------------------------------
CACHE_PARTS = ("key", "value", "positions", "valid")


def cache_names(prefix: str, layers: int) -> list[str]:
    """``prefix.{l}.{key,value,positions,valid}`` for every layer, flat, layer-major."""
    return [f"{prefix}.{l}.{part}" for l in range(layers) for part in CACHE_PARTS]


def kv_names(prefix: str, layers: int) -> list[str]:
    """``prefix.{l}.{key,value}`` for every layer, flat, layer-major: the decoder graph's buffers."""
    return [f"{prefix}.{l}.{part}" for l in range(layers) for part in ("key", "value")]


def slot_names(prefix: str) -> list[str]:
    """The decoder graph's ``prefix.positions`` and ``prefix.valid``: every layer's slots side by
    side, or the one set they share (``SLOTS_KEY``)."""
    return [f"{prefix}.positions", f"{prefix}.valid"]


def io_names(layers: int) -> dict[str, dict[str, list[str]]]:
    return {
        "prefill": {"inputs": ["input_ids", "attention_mask"], "outputs": ["logits", *cache_names("present", layers)]},
        "decode": {
            "inputs": ["input_ids", "position_ids", "prompt_lengths", *cache_names("past", layers)],
            "outputs": ["logits", *cache_names("present", layers)],
        },
    }


# -- the model's parts ------------------------------------------------------------------------
class _Scaled(nn.Module):
    """An embedding whose output is multiplied by a constant (Granite's embedding multiplier)."""

    def __init__(self, embedding: nn.Module, factor: float):
        super().__init__()
        self.embedding, self.factor = embedding, factor

    def forward(self, input_ids):
        return self.embedding(input_ids) * self.factor


class Decoder(nn.Module):
    """The pieces of a Llama-family causal LM that the graphs call, and nothing else.

    Pre-norm layers (Llama, Mistral, Qwen2/3, Gemma, SmolLM), Granite's embedding, residual and
    logit multipliers, Phi-3's fused q/k/v projection (split here, at export) and OLMo2's
    post-norm layers with q/k norms over all heads; ``architectures.check`` refuses the rest."""

    def __init__(self, model):
        super().__init__()
        try:
            found = architectures.check(model, export=True)
        except architectures.UnsupportedModel as err:
            raise ExportError(str(err)) from None
        base = getattr(model, "model", None)
        base = getattr(base, "language_model", None) or base
        text = architectures.text_config(model.config)
        attn = base.layers[0].self_attn
        self.structure = found
        embed = base.embed_tokens
        self.embed_tokens = embed if found.embedding_multiplier == 1.0 else _Scaled(embed, found.embedding_multiplier)
        self.layers, self.norm, self.rotary_emb = base.layers, base.norm, base.rotary_emb
        self.lm_head = model.lm_head
        self.heads = text.num_attention_heads
        self.kv_heads = getattr(text, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // self.heads
        self.scaling = getattr(attn, "scaling", self.head_dim**-0.5)
        rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        # transformers >= 5.25 (with its `kernels` dependency) wraps the function in a module; keep
        # its bound forward, so the rotation stays a plain function and not a child of this module
        self._rope = rope.forward if isinstance(rope, torch.nn.Module) else rope

    def rope(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        return self.rotary_emb(hidden, position_ids)

    def qkv(self, layer, hidden, cos, sin):
        """hidden (B, q, hidden) -> query (B, H, q, D), key/value (B, Hkv, q, D), rotated."""
        query, key, value = self.projections(layer, hidden)
        query, key = self._rope(query.transpose(1, 2), key.transpose(1, 2), cos, sin)
        return query, key, value.transpose(1, 2)

    def attention_input(self, layer, hidden):
        """The input of the layer's q/k/v projections (normed, in a pre-norm layer)."""
        return hidden if self.structure.norms == "post" else layer.input_layernorm(hidden)

    def projections(self, layer, hidden):
        """hidden (B, q, hidden) -> query (B, q, H, D), key/value (B, q, Hkv, D): projected
        (and q/k-normed), not rotated."""
        attn, found = layer.self_attn, self.structure
        x = self.attention_input(layer, hidden)
        b, q = x.shape[:2]
        if found.fused_qkv:  # Phi-3: [q | k | v] from one projection
            q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
            query, key, value = attn.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        else:
            query, key, value = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        if found.qk_norm == "full":  # OLMo2: over all heads, before the split into heads
            query, key = attn.q_norm(query), attn.k_norm(key)
        query = query.view(b, q, -1, self.head_dim)
        key = key.view(b, q, -1, self.head_dim)
        value = value.view(b, q, -1, self.head_dim)
        if found.qk_norm == "head":  # Qwen3
            query, key = attn.q_norm(query), attn.k_norm(key)
        return query, key, value

    def half_rotation(self) -> bool:
        """Whether the model's rotary embedding is the half-split rotation over the whole head
        (x cos + rotate_half(x) sin, cos and sin repeating over the two halves), which ONNX
        Runtime's fused attention can apply itself.  Checked on the model's own functions at
        a few positions, so a variant (partial or interleaved rotation) keeps its own ops."""
        g = torch.Generator().manual_seed(0)
        d = self.head_dim
        positions = torch.tensor([[0, 1, 7, 100]])
        x = torch.randn(1, 4, d, generator=g)
        cos, sin = self.rope(x, positions)
        if cos.shape[-1] != d or d % 2 or not torch.equal(cos[..., : d // 2], cos[..., d // 2 :]):
            return False
        query = torch.randn(1, self.heads, 4, d, generator=g)
        key = torch.randn(1, self.kv_heads, 4, d, generator=g)
        got_q, got_k = self._rope(query, key, cos, sin)
        c, s = cos[:, None, :, : d // 2], sin[:, None, :, : d // 2]

        def rotate(x):
            a, b = x[..., : d // 2], x[..., d // 2 :]
            return torch.cat([a * c - b * s, b * c + a * s], dim=-1)

        return bool(torch.allclose(got_q, rotate(query), atol=1e-5) and torch.allclose(got_k, rotate(key), atol=1e-5))

    def rotary_table(self, rows: int, dtype: torch.dtype):
        """The model's cos and sin at positions [0, rows), (rows, D / 2) each in ``dtype``: the
        tables the fused attention looks a token's position up in (ONNX Runtime GenAI's layout).
        None where a position's values depend on the other positions of the call (a rotation
        that rescales with the sequence's length, as Phi-3's long-rope does): a few positions
        computed alone must match their rows."""
        x = torch.zeros(1, 1, self.head_dim, dtype=dtype)  # the rotary embedding reads only its dtype and device
        cos, sin = self.rope(x, torch.arange(rows).view(1, rows))
        sample = torch.tensor([[0, 1, 7, 100]]).clamp(max=rows - 1)
        alone = self.rope(x, sample)
        if not all(torch.allclose(t[0, sample[0]], a[0]) for t, a in zip((cos, sin), alone)):
            return None
        half = self.head_dim // 2
        return cos[0, :, :half].contiguous(), sin[0, :, :half].contiguous()

    def finish(self, layer, hidden, attn_out, mlp=None):
        """attn_out (B, q, H, D) or (B, q, H x D) -> the layer's output hidden states (B, q,
        hidden); ``mlp``: a module computing the layer's MLP (default: the layer's own)."""
        found, m = self.structure, self.structure.residual_multiplier
        mlp = mlp or layer.mlp
        out = layer.self_attn.o_proj(attn_out.flatten(2))  # a (B, q, H x D) input as it is: no reshape
        if found.norms == "post":  # OLMo2
            hidden = hidden + layer.post_attention_layernorm(out)
            return hidden + layer.post_feedforward_layernorm(mlp(hidden))
        hidden = hidden + (out * m if m != 1.0 else out)
        mlp = mlp(layer.post_attention_layernorm(hidden))
        return hidden + (mlp * m if m != 1.0 else mlp)

    def logits(self, hidden_last: torch.Tensor) -> torch.Tensor:
        """hidden_last (B, hidden) -> (B, V) float32."""
        logits = self.lm_head(self.norm(hidden_last))
        if self.structure.logits_scaling != 1.0:  # Granite
            logits = logits / self.structure.logits_scaling
        return logits.float()


def concat_linear(linears) -> nn.Linear:
    """One Linear whose output is the given Linears' outputs side by side (their weights
    stacked; a missing bias is zeros)."""
    weights = [l.weight for l in linears]
    out = nn.Linear(weights[0].shape[1], sum(w.shape[0] for w in weights), bias=any(l.bias is not None for l in linears),
                    dtype=weights[0].dtype)
    with torch.no_grad():
        out.weight.copy_(torch.cat(weights))
        if out.bias is not None:
            out.bias.copy_(torch.cat([l.bias if l.bias is not None else torch.zeros(l.weight.shape[0], dtype=l.weight.dtype)
                                      for l in linears]))
    return out.eval()


class PackedMLP(nn.Module):
    """down(act(gate(x)) x up(x)) with gate and up as one projection: one MatMul fewer."""

    def __init__(self, mlp):
        super().__init__()
        self.gate_up, self.down, self.act = concat_linear([mlp.gate_proj, mlp.up_proj]), mlp.down_proj, mlp.act_fn
        self.width = mlp.gate_proj.weight.shape[0]

    def forward(self, x):
        gate, up = self.gate_up(x).split([self.width, self.width], dim=-1)
        return self.down(self.act(gate) * up)

    @classmethod
    def of(cls, mlp):
        """The packed form of ``mlp``, or None when it is not that MLP (checked against its own
        forward on random inputs)."""
        if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            return None
        packed = cls(mlp)
        weight = mlp.gate_proj.weight
        x = torch.randn(2, 3, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.dtype)
        with torch.no_grad():
            same = torch.allclose(packed(x), mlp(x), rtol=1e-4, atol=1e-5)
        return packed if same else None


def _grouped(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, H, q, D) -> (B, Hkv, group, q, D): GQA without repeating K/V."""
    b, h, q, d = query.shape
    return query.reshape(b, kv_heads, h // kv_heads, q, d)


def attention_bias(valid: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """(B, 1, 1, S, S) additive causal + padding mask (0 allowed, -inf not), built once per graph.

    An Add of this bias is much cheaper in ONNX Runtime than a broadcast Where per layer."""
    allowed = causal_mask(valid.shape[-1], valid).unsqueeze(2)
    zero = torch.zeros((), dtype=dtype)
    return torch.where(allowed, zero, torch.full((), float("-inf"), dtype=dtype))


def prefill_attention(query, key, value, valid, scaling: float, score_rows: int | None, bias=None):
    """Unfused causal attention that also returns the attention mass each key receives.

    query (B, H, S, D); key/value (B, Hkv, S, D); valid (B, S) bool; bias: ``attention_bias(valid)``
    (computed here when None).
    score_rows: trailing query rows whose probabilities are summed (None: all rows, 0: none).
    Returns out (B, S, H, D) and mass (B, S) float32 (sum over non-padded scoring rows,
    mean over query heads), like ``scoring.attention_with_scores``.
    """
    b, h, s, d = query.shape
    bias = attention_bias(valid) if bias is None else bias
    logits = torch.matmul(_grouped(query, key.shape[1]).float(), key.float().unsqueeze(2).transpose(-1, -2)) * scaling
    probs = torch.softmax(logits + bias, dim=-1)  # (B, Hkv, G, S, S)
    out = torch.matmul(probs.to(value.dtype), value.unsqueeze(2)).reshape(b, h, s, -1).transpose(1, 2)
    if score_rows == 0:
        return out, None
    if score_rows is not None:
        probs, valid = probs[:, :, :, -score_rows:], valid[:, -score_rows:]
    weights = valid.to(probs.dtype)[:, None, None, None, :]  # (B, 1, 1, 1, rows): padded queries give nothing
    mass = torch.matmul(weights, probs).sum(dim=(1, 2, 3)) / h
    return out, mass


def decode_attention(query, key, value, valid, scaling: float):
    """query (B, H, 1, D) over key/value (B, Hkv, W, D) with valid (B, W) -> (B, 1, H, D)."""
    b, h, q, d = query.shape
    logits = torch.matmul(_grouped(query, key.shape[1]), key.unsqueeze(2).transpose(-1, -2)) * scaling
    logits = logits.masked_fill(~valid[:, None, None, None, :], float("-inf"))
    probs = torch.softmax(logits.float(), dim=-1).to(value.dtype)
    return torch.matmul(probs, value.unsqueeze(2)).reshape(b, h, q, -1).transpose(1, 2)


def merge_image_embeds(embeds: torch.Tensor, input_ids: torch.Tensor, image_embeds: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Token embeddings (B, S, hidden) with the image-token rows replaced, in row-major order.

    image_embeds (I, N, hidden); I x N must equal the number of image tokens (the runners
    check it).  Gather-based (no masked_scatter), so it exports to plain ONNX and takes I = 0.
    """
    b, s, h = embeds.shape
    is_image = (input_ids == image_token_id).reshape(-1)
    table = torch.cat([torch.zeros(1, h, dtype=embeds.dtype, device=embeds.device), image_embeds.reshape(-1, h).to(embeds.dtype)])
    index = torch.cumsum(is_image.to(torch.int64), dim=0) * is_image.to(torch.int64)  # 0: not an image token
    merged = torch.index_select(table, 0, index).reshape(b, s, h)
    return torch.where(is_image.reshape(b, s, 1), merged, embeds)


def _unbacked_width(counts: torch.Tensor, limit: int | torch.SymInt) -> int:
    """max(counts) as a Python int (an unbacked symbol under torch.export) in [0, limit]."""
    width = counts.max().item()
    torch._check(width >= 0)
    torch._check(width <= limit)
    return width


# -- the two graphs ---------------------------------------------------------------------------
def score_rows(spec: GraphSpec) -> int | None:
    """How many of the prompt's last query rows the spec's score reads (``window``: its window,
    ``last-query``: 1, a key score: 0, and then no layer is scored: a slice of the last 0 rows,
    ``[-0:]``, would be all of them), or None where it reads every row (``accumulated``)."""
    rows = make_scorer(spec.scorer, **spec.scorer_params).query_rows(1 << 30)
    return None if rows == 1 << 30 else rows


class PrefillGraph(nn.Module):
    """(input_ids, attention_mask) -> (logits, *per layer key, value, positions, valid); see the module doc."""

    def __init__(self, model, spec: GraphSpec):
        super().__init__()
        self.decoder = Decoder(model)
        self.spec = spec
        self.scorer = make_scorer(spec.scorer, **spec.scorer_params)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return self.from_embeddings(self.decoder.embed_tokens(input_ids), attention_mask)

    def from_embeddings(self, hidden: torch.Tensor, attention_mask: torch.Tensor):
        """hidden (B, S, hidden) input embeddings (a vision graph merges image rows in first)."""
        spec, dec = self.spec, self.decoder
        valid = attention_mask.to(torch.bool)
        position_ids = torch.clamp(torch.cumsum(attention_mask, dim=-1) - 1, min=0)
        cos, sin = dec.rope(hidden, position_ids)
        lengths = valid.sum(-1)
        original = torch.cumsum(valid.to(torch.int64), dim=-1) - 1
        rows = score_rows(spec)
        bias = attention_bias(valid)
        outputs = []
        for l, layer in enumerate(dec.layers):
            query, key, value = dec.qkv(layer, hidden, cos, sin)
            keep_all = spec.fractions[l] >= 1.0
            out, mass = prefill_attention(query, key, value, valid, dec.scaling, 0 if keep_all else rows, bias)
            hidden = dec.finish(layer, hidden, out)
            if keep_all:  # nothing to choose: no scores, no TopK
                outputs += self._keep_all(key, value, valid, lengths, original)
                continue
            scores = self.scorer.from_attention(mass, valid) if mass is not None else self.scorer.from_keys(key, valid)
            outputs += self._compact(key, value, scores, valid, lengths, original, spec.fractions[l])
        logits = dec.logits(hidden[:, -1])
        return (logits, *outputs)

    def _keep_all(self, key, value, valid, lengths, original):
        """``compact`` at fraction 1 without scoring: every real entry, leading all-padding columns dropped."""
        width = _unbacked_width(lengths, valid.shape[-1])
        first = valid.shape[-1] - width
        positions = torch.where(valid, original, torch.full_like(original, -1))
        return [key.narrow(2, first, width), value.narrow(2, first, width), positions.narrow(1, first, width),
                valid.narrow(1, first, width)]

    def _compact(self, key, value, scores, valid, lengths, original, fraction: float):
        """``compaction.compact`` with the slot count as an unbacked int (TopK's k)."""
        spec = self.spec
        counts = compaction.keep_counts(lengths, fraction, spec.sink, spec.protect_last)
        width = _unbacked_width(counts, scores.shape[-1])
        protected = compaction.protect(scores, valid, spec.sink, spec.protect_last)
        index, kept = compaction.select(protected, valid, counts, width, stable=False)
        positions = torch.where(kept, torch.gather(original, -1, index), torch.full_like(index, -1))
        return [compaction.gather_kv(key, index), compaction.gather_kv(value, index), positions, kept]


class DecodeGraph(nn.Module):
    """(input_ids, position_ids, prompt_lengths, *past) -> (logits, *present) over compact caches:
    each step appends by Concat and the eviction shifts entries (two copies of every layer's
    cache).  The TensorRT plugin-mode graph builds on it; ONNX Runtime engines use ``DecoderGraph``."""

    cache_layout = "compact"

    def __init__(self, model, spec: GraphSpec):
        super().__init__()
        self.decoder = Decoder(model)
        self.spec = spec

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, prompt_lengths: torch.Tensor, *past: torch.Tensor):
        spec, dec = self.spec, self.decoder
        hidden = dec.embed_tokens(input_ids)
        cos, sin = dec.rope(hidden, position_ids)
        seen = position_ids[:, 0] + 1  # tokens seen, the new one included
        outputs = []
        for l, layer in enumerate(dec.layers):
            cap, slot = compaction.decode_budget(prompt_lengths, seen, spec.fractions[l], spec.sink,
                                                 spec.protect_last, spec.evict_distance)
            query, key, value = dec.qkv(layer, hidden, cos, sin)
            out, cache = self.step(l, query, key, value, position_ids, past[4 * l : 4 * l + 4], cap, slot)
            hidden = dec.finish(layer, hidden, out)
            outputs += cache
        return (dec.logits(hidden[:, -1]), *outputs)

    def step(self, layer: int, query, key, value, position_ids, past, cap, slot):
        """One layer's cache step: append the new entry, attend, apply the decode-phase rule.
        Returns the attention output (B, 1, H, D) and the layer's present key, value, positions, valid."""
        state = compaction.append(*past, key, value, position_ids)
        out = self.attend(layer, query, *state[:2], state[3])
        return out, compaction.evict(*state, cap, slot)

    def attend(self, layer: int, query, keys, values, valid):
        """query (B, H, 1, D) over the appended cache -> (B, 1, H, D); a subclass may fuse it."""
        return decode_attention(query, keys, values, valid, self.decoder.scaling)


class DecoderGraph(DecodeGraph):
    """The ONNX Runtime engine's one graph with the weights: prefill chunks and decode steps alike.

        inputs:  input_ids, position_ids (B, C) int64: C >= 1 new tokens per row, every one
                 real (the runner prefills each prompt alone, unpadded; position_ids: original
                 positions); prompt_lengths (B,) int64; past_widths (L,) int64: each layer's
                 P_l, its slots in use (the graph takes it as given: the runner keeps it);
                 [score_from () int64: the chunk's first scored row (C: none), engines with
                 scored layers; at least C - R where the score reads the prompt's last R
                 rows (``score_rows``)]; [image_embeds (rows, hidden): vision engines];
                 past.positions/valid (B, sum of P_l): every layer's slots side by side
                 (an engine whose layers all keep everything: (B, P), the one set of slots
                 every layer has; past_widths then holds P L times);
                 per layer past.{l}.key/value (B, Hkv, C_l, D)
        outputs: logits (B, V) (the last new token's); present.positions/valid (B, sum of
                 (P_l + C)), in the same layout; per layer present.{l}.key/value (the
                 buffers, written in place); [mass (B, sum over scored layers of P_l + C)
                 float32: the attention mass rows [score_from, C) of the chunk give each
                 slot, averaged over query heads, the scored layers side by side; the
                 prefill phase's, a decode step's being empty, (B, 0)]

    Per layer one ``com.microsoft::GroupQueryAttention`` node writes the C new entries into
    slots [P_l, P_l + C) of the buffers (in place when the runner binds present to past) and
    attends causally over the slots in use, an additive bias masking the empty ones (the
    decode phase where layers evict; a prompt chunk's slots are all in use, and the prefill
    phase has none).  The
    decode-phase rule (``compaction.decode_budget`` / ``evict_in_place_layers``) applies to
    rows whose new token is past the prompt: a prefill chunk evicts nothing, and a full-cache
    engine's graph has no rule.  The slot
    bookkeeping runs once for all layers, not once per layer: the layers' positions and
    valid come side by side, one ``Split`` each (sizes from past_widths) and one ``Concat``
    append the chunk's slots to every layer's, and the bias and the eviction run on the
    result, (B, sum of T_l), which goes out as it is.  The graph has one input and one
    output for all layers' positions, one for their valid and one for their mass, so that
    at batch 1 a decode step binds a handful of small values besides the buffers (which
    the runner binds once per buffer, not per step).  When no layer evicts, every layer's
    slots are the same ones, so the graph takes and returns one set of them and one pair of
    lengths serves all layers (``shared_slots``, recorded in the graph's metadata under
    ``SLOTS_KEY``).  Each row holds its entries in its first slots and the empty ones after
    them (the runner's merge puts them there), so the op's per-row lengths (seqlens_k: each
    row's entries with the chunk, less one) mask the empty slots and place each row's new
    tokens right after its entries (``row_lengths``), as onnxruntime-genai's batches do: no
    bias in either phase, and with no scored layer the phases are the same graph, traced
    once with no ``If`` (SmolLM2's keep-1 decoder: 366 nodes, against 7 + 347 + 352 with the
    ``If``).

    Where the model's rotation is the half-split one the op implements (``Decoder.half_rotation``;
    not for key-norm engines, see ``__init__``), the op also rotates the query and the new keys
    (``do_rotary``): it looks each new token's cos and sin up by its position in two constant
    tables of ``spec.max_context`` rows (``Decoder.rotary_table``), so the runner keeps every
    layer's buffer within that many slots.  Then q/k/v come packed from one projection
    and the MLP's gate/up from another (``concat_linear``, ``PackedMLP``): SmolLM2's decoder
    goes from 2836 to 2096 nodes, to 1094 with the decode rule's numbers computed once for
    all layers, to 601 with all the slot bookkeeping done once, and to 515 with the slots
    and the mass side by side in the graph's inputs and outputs.

    ``phase`` picks what is traced (``PHASES``; ``two_phase_graph`` joins the two).  "decode"
    (decode steps): each layer's op takes the bias that masks the empty slots (not with
    shared slots), and there is no mass.  "prefill" (prompt chunks, batch 1 and every slot in use): no bias, and in a
    scored layer the op also returns its probabilities
    (``qk_output`` 2, after the softmax: (B, H, C, T), causality applied, in the engine's
    dtype) and one MatMul with the (1 x C) row weights (1 / H for a scored row, 0 else) sums
    each head's scored rows; one ReduceSum over the heads of every scored layer's sums, side
    by side, averages them: ``scoring.attention_with_scores``'s quantity without computing
    the probabilities twice.  The (H, C, T) block is transient: the op's CPU kernel holds it
    anyway, and the layer's MatMul is its last reader, so ONNX Runtime frees it with the
    layer.  What the bias and the probabilities cost the op on a model's shapes,
    ``python -m prefixkv.bench.attention`` measures (``docs/engine_v2.md`` has SmolLM2's).  The runner
    sums the chunks' masses and compacts the prompt with ``CompactGraph``.
    """

    cache_layout = "buffer"

    def __init__(self, model, spec: GraphSpec, image_token_id: int | None = None, phase: str = "decode"):
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
        if spec.dtype not in ("float32", "float16"):
            raise ExportError(f"ONNX Runtime's fused attention runs float32 or float16 on CPU, the model is "
                              f"{spec.dtype}; load the model in float32")
        super().__init__(model, spec)
        self.scored = scored_layers(spec)
        self.image_token_id = image_token_id
        self.phase = phase
        # A prefill chunk's slots are all in use (the prompt's tokens, none evicted yet): its
        # attention needs no bias.  Its scored layers return their probabilities and the mass.
        self.probabilities = phase == "prefill" and bool(self.scored)
        self.score_rows = score_rows(spec)
        # The fused attention rotates the query and keys itself when the model's rotation is the
        # one it implements; its keys then round differently from PyTorch's.  A key-norm score
        # reads the rotated keys, and the same token's keys in layer 0 tie up to that rounding,
        # so its engines keep the graph's own rotation to break those ties as the reference does.
        # A layer whose keep fraction is 1 never holds more than its cap (the tokens seen so far):
        # a full-cache engine's graph has no decode rule at all (its ranks run over every slot).
        self.evicts = spec.evicts
        self.shared_slots = not self.evicts  # then every layer's slots are the same: the graph carries one set
        # Shared slots hold each row's entries from slot 0 on (``row_lengths``): the op's per-row
        # lengths mask the rest, so no phase needs a bias, and the two phases are one graph.
        self.masked = phase == "decode" and not self.shared_slots
        keyed = not self.scored and self.evicts  # layers evict, on key scores
        # the op looks each new token's cos/sin up by its position in tables of max_context rows,
        # constants of the graph (a decode step computes no rotation of its own)
        table = None if keyed or not self.decoder.half_rotation() else \
            self.decoder.rotary_table(spec.max_context, getattr(torch, spec.dtype))
        self.fused_rotary = table is not None
        if table is not None:
            self.register_buffer("cos_table", table[0], persistent=False)
            self.register_buffer("sin_table", table[1], persistent=False)
        # With the rotation in the op, q, k and v can come packed from one projection, which
        # the op takes as its query input (ONNX Runtime GenAI's layout); the same for the MLP's
        # gate and up, which one Split then parts: two MatMuls fewer per layer.  (GenAI's builder
        # keeps gate and up apart; SmolLM2's keep-1 decoder built that way was no faster here,
        # its two MatMuls taking longer than the packed one and its Split together.)  Not with
        # q/k norms, which apply to q and k apart.
        dec = self.decoder
        self.packed_qkv = self.packed_mlp = None
        if self.fused_rotary and dec.structure.qk_norm == "none":
            self.packed_qkv = nn.ModuleList(
                layer.self_attn.qkv_proj if dec.structure.fused_qkv else
                concat_linear([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj])
                for layer in dec.layers)
            mlps = [PackedMLP.of(layer.mlp) for layer in dec.layers]
            self.packed_mlp = nn.ModuleList(mlps) if all(m is not None for m in mlps) else None

    def forward(self, *inputs: torch.Tensor):
        input_ids, position_ids, prompt_lengths, past_widths = inputs[:4]
        rest = list(inputs[4:])
        score_from = rest.pop(0) if self.scored else None
        image_embeds = rest.pop(0) if self.image_token_id is not None else None
        past_positions, past_valid, *past = rest  # past: per layer key, value
        spec, dec = self.spec, self.decoder
        layers = len(dec.layers)
        hidden = dec.embed_tokens(input_ids)
        if image_embeds is not None:
            hidden = merge_image_embeds(hidden, input_ids, image_embeds, self.image_token_id)
        if self.fused_rotary:  # the op rotates the query and the new keys, from the tables
            cos = sin = None
            rotary = (self.cos_table, self.sin_table, position_ids)
        else:
            cos, sin = dec.rope(hidden, position_ids)
            rotary = None
        b, c = input_ids.shape
        dtype = getattr(torch, spec.dtype)
        new = torch.ones_like(position_ids, dtype=torch.bool)  # every new token is real (no padding in a chunk)
        zero, closed = torch.zeros((), dtype=dtype), torch.full((), float("-inf"), dtype=dtype)
        unmasked = torch.zeros(1, 1, c, 1, dtype=dtype)  # a (B, 1, 1, T) bias + these -> (B, 1, C, T)
        if self.shared_slots:
            # No layer evicts, so every layer's slots are the same ones (the same tokens in the same
            # places): one set of them, (B, P), and one pair of lengths serve every layer.  A row's
            # entries fill its first slots (``row_lengths``), so the op's per-row lengths (seqlens_k)
            # mask the empty ones after them, as onnxruntime-genai's batches do, without a bias.
            positions, valid, held = row_lengths(past_positions, past_valid, position_ids)
            width = past_positions.shape[1] + c
            total = (past_widths[:1] + c).to(torch.int32)  # the slots' width with the chunk, every layer's
            seqlens = (held + c - 1).to(torch.int32)  # (B,) each row's entries with the chunk, less one
            totals, seqlens, sizes, biases = [total] * layers, [seqlens] * layers, [width] * layers, [None] * layers
        else:
            # Every layer's slot bookkeeping at once, the layers side by side: (B, N), N = the sum
            # of the layers' slots in use with this chunk (past_widths + C).  A decode step runs
            # each of these ops once, not once per layer.
            used = [past_widths[l].item() for l in range(layers)]  # the tracer's sizes of the layers' past slots
            for u in used:
                torch._check(u >= 0)
            sizes = [u + c for u in used]
            widths = past_widths + c  # (L,) each layer's slots in use with the chunk
            old_positions = split_columns(past_positions, past_widths, [(b, u) for u in used])
            old_valid = split_columns(past_valid, past_widths, [(b, u) for u in used])
            positions = torch.cat([t for l in range(layers) for t in (old_positions[l], position_ids.to(past_positions.dtype))], -1)
            valid = torch.cat([t for l in range(layers) for t in (old_valid[l], new)], -1)
            # the bias masking each layer's empty slots, (B, 1, 1, T_l); a layer adds its (1, 1, C, 1) zeros
            biases = [None] * layers
            if self.masked:
                open_ = torch.where(valid, zero, closed)
                biases = split_columns(open_[:, None, None, :], widths, [(b, 1, 1, t) for t in sizes])  # each layer adds its zeros
            # the fused attention's total_sequence_length (1,) and seqlens_k (B,) per layer, by one Split each
            totals = split_equal(widths.to(torch.int32), layers, (1,))
            seqlens = split_equal((widths.to(torch.int32) - 1).unsqueeze(1).expand(-1, b).reshape(-1), layers, (b,))
        weights, last = None, self.score_rows
        if self.probabilities:  # (1, 1, 1, C): 1 / H for the chunk's scored rows [score_from, C), built once
            weights = ((torch.arange(c) >= score_from).to(torch.float32) / dec.heads).view(1, 1, 1, c)
            if last is not None:
                # A score from the prompt's last rows (``window``, ``last-query``): the scored rows
                # are a chunk's last ones, at most ``last`` of them, so the mass reads those rows
                # of the probabilities only, not all C: at 8192 tokens the full product read every
                # chunk's (H, C, T) probabilities again in each scored layer, about 1 s on SmolLM2.
                weights = weights[..., -last:]
        buffers, masses = [], []
        for l, layer in enumerate(dec.layers):
            keys, values = past[2 * l : 2 * l + 2]
            if self.packed_qkv is not None:  # (B, C, (H + 2 Hkv) D), rotated by the op
                query, key, value = self.packed_qkv[l](dec.attention_input(layer, hidden)), None, None
            else:
                if rotary is None:
                    query, key, value = (t.transpose(1, 2) for t in dec.qkv(layer, hidden, cos, sin))
                else:  # not rotated: the fused attention rotates the query and the new keys
                    query, key, value = dec.projections(layer, hidden)
                query, key, value = (t.reshape(b, c, -1) for t in (query, key, value))
            scored = self.probabilities and l in self.scored
            lengths = (seqlens[l], totals[l], sizes[l])
            # (B, 1, C, T_l); widened in the layer (not all at once: a long prompt's chunk would hold every layer's)
            bias = None if biases[l] is None else biases[l] + unmasked
            out, keys, values, probs = self.attend_in_place(query, key, value, keys, values, lengths, bias, scored, rotary)
            if scored:  # the scored rows' probabilities summed per head by one MatMul: (B, H, 1, T)
                masses.append(torch.matmul(weights, (probs if last is None else probs[:, :, -last:]).float()))
            hidden = dec.finish(layer, hidden, out, self.packed_mlp[l] if self.packed_mlp is not None else None)
            buffers += [keys, values]
        if self.evicts:  # the decode-phase rule for every layer at once, (B, L); a prefill chunk's rows evict nothing
            decoding = position_ids[:, -1] >= prompt_lengths  # rows whose new token is past the prompt
            caps, evict_ranks = compaction.decode_budget(prompt_lengths[:, None], position_ids[:, -1:] + 1,
                                                        torch.tensor(spec.fractions, dtype=torch.float32), spec.sink,
                                                        spec.protect_last, spec.evict_distance)
            caps = torch.where(decoding[:, None], caps, 1 << 62)
            positions, valid = compaction.evict_in_place_layers(positions, valid, widths, caps, evict_ranks)
        mass = (torch.cat(masses, -1).sum((1, 2)),) if masses else ()  # every scored layer's, side by side, over heads
        return (dec.logits(hidden[:, -1]), positions, valid, *buffers, *mass)

    def attend_in_place(self, query, key, value, keys, values, lengths, bias, probabilities: bool = False, rotary=None):
        """query (B, C, H x D), new key/value (B, C, Hkv x D) (or both None: query is
        [q | k | v], (B, C, (H + 2 Hkv) x D)), buffers (B, Hkv, Cap, D), ``lengths``: the
        layer's slots in use with the chunk, T, as the op's seqlens_k (B,) int32 (T - 1),
        its total_sequence_length (1,) int32 (T) and the traced size (for the shapes), ``bias``
        (B, 1, C, T) in the query's dtype: 0 for the slots in use, -inf for the empty ones
        (None: no bias, every slot in use: a prompt chunk) ->
        attention output (B, C, H x D), the buffers with the new entries in slots [T - C, T),
        and (``probabilities``) the attention probabilities (B, H, C, T) the op computed, else
        None.  Causality comes from the op (query i sits at slot T - C + i).  ``rotary``: the
        cos and sin tables (R, D / 2) and the chunk's positions (B, C) int64, the query and key
        not yet rotated (the op rotates them and writes the rotated keys; it requires T <= R),
        else None (both rotated already)."""
        dec = self.decoder
        b, q = query.shape[:2]
        h, d = dec.heads, dec.head_dim
        seqlens, total, t = lengths
        attrs = {"num_heads": h, "kv_num_heads": dec.kv_heads, "scale": float(dec.scaling)}
        if rotary is not None:
            attrs["do_rotary"] = 1
        dtypes, shapes = [query.dtype, keys.dtype, values.dtype], [(b, q, h * d), keys.shape, values.shape]
        if probabilities:  # output_qk after the softmax: the exact probabilities (checked on ONNX Runtime 1.32)
            attrs["qk_output"] = 2
            dtypes.append(query.dtype)
            shapes.append((b, h, q, t))
        outs = torch.onnx.ops.symbolic_multi_out(
            "com.microsoft::GroupQueryAttention",
            [query, key, value, keys, values, seqlens, total, *(rotary or (None, None, None)), bias],
            attrs, dtypes=dtypes, shapes=shapes, version=1,
        )
        return outs[0], outs[1], outs[2], (outs[3] if probabilities else None)


def row_lengths(past_positions: torch.Tensor, past_valid: torch.Tensor, position_ids: torch.Tensor):
    """Shared slots (B, P) whose rows hold their entries in their first slots, the empty ones
    after them, and a chunk of C new tokens per row (B, C) -> the slots with the chunk (B, P + C)
    (each row's new tokens right after its entries: slots [n_b, n_b + C), where the fused
    attention writes them when told the row's length), and the rows' entries before the chunk,
    n_b (B,) int64.  A row as wide as the slots gets the chunk at [P, P + C), as a Concat would
    put it; a shorter row's slots past its new tokens are empty (position -1)."""
    held = past_valid.sum(-1)  # (B,)
    c = position_ids.shape[1]
    width = past_positions.shape[1] + c
    offset = torch.arange(width)[None, :] - held[:, None]  # (B, P + C): the slot's place in the row's chunk
    fresh = (offset >= 0) & (offset < c)
    news = torch.gather(position_ids.to(past_positions.dtype), 1, torch.where(fresh, offset, 0))
    empty = torch.full_like(position_ids, -1, dtype=past_positions.dtype)
    positions = torch.where(fresh, news, torch.cat([past_positions, empty], -1))
    valid = fresh | torch.cat([past_valid, torch.zeros_like(fresh[:, :c])], -1)
    return positions, valid, held


def split_columns(tensor: torch.Tensor, widths: torch.Tensor, shapes) -> list[torch.Tensor]:
    """``tensor`` (..., N) split along its last axis into pieces ``widths`` (L,) int64 wide, as
    one ONNX ``Split`` whose sizes are that tensor's values; ``shapes``: the pieces' shapes
    for the tracer (the same widths, as sizes)."""
    return list(torch.onnx.ops.symbolic_multi_out("::Split", [tensor, widths], {"axis": -1}, dtypes=[tensor.dtype] * len(shapes),
                                                  shapes=shapes, version=OPSET))


def split_equal(tensor: torch.Tensor, pieces: int, shape) -> list[torch.Tensor]:
    """``tensor`` (n,) split into ``pieces`` equal parts of ``shape`` as one ONNX ``Split``."""
    return list(torch.onnx.ops.symbolic_multi_out("::Split", [tensor], {"axis": 0, "num_outputs": pieces},
                                                  dtypes=[tensor.dtype] * pieces, shapes=[shape] * pieces, version=OPSET))


def scored_layers(spec: GraphSpec) -> list[int]:
    """The layers whose importance comes from attention mass (the score needs it and the layer evicts)."""
    if make_scorer(spec.scorer, **spec.scorer_params).query_rows(2) == 0:
        return []
    return [l for l, f in enumerate(spec.fractions) if f < 1.0]


class CompactGraph(PrefillGraph):
    """The end of a prompt: every layer compacted to its profile count, no weights.

        inputs:  attention_mask (B, S) int64; per layer: mass.{l} (B, S) (scored layers: the
                 accumulated mass), key.{l}, value.{l} (B, Hkv, S, D) (the prompt's buffers)
        outputs: per layer present.{l}.key/value (B, Hkv, W_l, D), positions/valid (B, W_l)

    ``PrefillGraph``'s scoring and compaction on the mass the decoder graph's chunks summed."""

    def __init__(self, model, spec: GraphSpec):
        super().__init__(model, spec)
        self.scored = scored_layers(spec)
        del self.decoder  # no weights: only the scorer and ``compaction``

    def forward(self, attention_mask: torch.Tensor, *layers: torch.Tensor):
        spec = self.spec
        valid = attention_mask.to(torch.bool)
        lengths = valid.sum(-1)
        original = torch.cumsum(valid.to(torch.int64), dim=-1) - 1
        outputs, i = [], 0
        for l in range(spec.layers):
            mass = None
            if l in self.scored:
                mass, i = layers[i], i + 1
            key, value = layers[i], layers[i + 1]
            i += 2
            if spec.fractions[l] >= 1.0:
                outputs += self._keep_all(key, value, valid, lengths, original)
                continue
            scores = self.scorer.from_attention(mass, valid) if mass is not None else self.scorer.from_keys(key, valid)
            outputs += self._compact(key, value, scores, valid, lengths, original, spec.fractions[l])
        return tuple(outputs)


# -- export -----------------------------------------------------------------------------------
def source_digest(paths) -> str:
    """A hash of Python files' code: their syntax trees without docstrings (comments are not
    in them), so that editing the prose leaves it unchanged."""
    import ast
    import hashlib

    digest = hashlib.sha256()
    for path in paths:
        tree = ast.parse(Path(path).read_text())
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                    and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
                node.body = body[1:] or [ast.Pass()]
        digest.update(ast.dump(tree).encode())
    return digest.hexdigest()[:10]


def exporter_version() -> str:
    """prefixkv's version plus a hash of the graph code (``source_digest``), the weight
    quantizer's included: a cache key for exported engines, which a docstring or comment
    edit does not change."""
    sources = [Path(__file__), Path(__file__).with_name("quantize.py"), Path(compaction.__file__),
               Path(sys.modules[causal_mask.__module__].__file__)]
    return f"{__version__}+{source_digest(sources)}"


def graph_spec(model, profile, keep_fraction: float, evict_distance: int | None = None,
               max_context: int | None = None) -> GraphSpec:
    """The spec for ``model`` with the per-layer fractions of ``profile`` at ``keep_fraction``
    (and its decode rule unless ``evict_distance`` is given), for prompts and generations of
    up to ``max_context`` tokens (default: the model's ``max_position_embeddings``)."""
    dec = Decoder(model)
    fractions = profile.layer_fractions(keep_fraction)
    if len(fractions) != len(dec.layers):
        raise ExportError(f"the profile has {len(fractions)} layers but the model has {len(dec.layers)}; calibrate one for this model")
    return GraphSpec(
        layers=len(dec.layers), heads=dec.heads, kv_heads=dec.kv_heads, head_dim=dec.head_dim,
        vocab=dec.lm_head.out_features, fractions=[float(f) for f in fractions], sink=profile.sink,
        protect_last=profile.protect_last, scorer=profile.scorer, scorer_params=dict(profile.scorer_params),
        evict_distance=profile.evict_distance if evict_distance is None else evict_distance,
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        max_context=int(max_context or getattr(architectures.text_config(model.config), "max_position_embeddings", 2048)),
    )


def sample_inputs(spec: GraphSpec, graph: str, batch: int = 2, length: int = 12, past: int = 6, layout: str = "compact"):
    """Example inputs used for tracing (never specialised on: every size is >= 2); ``layout``
    "buffer": K/V buffers wider than the slots in use."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.vocab, (batch, length), generator=g)
    if graph == "prefill":
        mask = torch.ones(batch, length, dtype=torch.int64)
        mask[0, :3] = 0
        return (ids, mask)
    dtype = getattr(torch, spec.dtype)
    tensors = []
    for l in range(spec.layers):
        width = past + l % 3  # distinct lengths per layer
        capacity = width + 3 if layout == "buffer" else width
        tensors += [
            torch.randn(batch, spec.kv_heads, capacity, spec.head_dim, generator=g).to(dtype),
            torch.randn(batch, spec.kv_heads, capacity, spec.head_dim, generator=g).to(dtype),
            torch.arange(width).expand(batch, width).clone(),
            torch.ones(batch, width, dtype=torch.bool),
        ]
    prompt_lengths = torch.full((batch,), 40, dtype=torch.int64)
    return (ids[:, :1], torch.full((batch, 1), 40, dtype=torch.int64), prompt_lengths, *tensors)


def _dynamic_shapes(spec: GraphSpec, graph: str, layout: str = "compact"):
    Dim = torch.export.Dim
    batch = Dim("batch", min=1, max=1024)
    if graph == "prefill":
        seq = Dim("sequence", min=2, max=1 << 20)
        return {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    past = []
    for l in range(spec.layers):
        length = Dim(f"past_length_{l}", min=1, max=1 << 20)
        slots = Dim(f"cache_capacity_{l}", min=2, max=1 << 20) if layout == "buffer" else length
        past += [{0: batch, 2: slots}, {0: batch, 2: slots}, {0: batch, 1: length}, {0: batch, 1: length}]
    return {"input_ids": {0: batch}, "position_ids": {0: batch}, "prompt_lengths": {0: batch}, "past": tuple(past)}


def _name_dims(model_proto, graph: str, layers: int, layout: str = "compact") -> None:
    """Readable names for the output dims the exporter left as opaque symbols."""
    for value in model_proto.graph.output:
        dims = value.type.tensor_type.shape.dim
        if value.name == "logits":
            dims[0].dim_param = "batch"
            continue
        l = int(value.name.split(".")[1])
        axis = 2 if value.name.endswith((".key", ".value")) else 1
        dims[0].dim_param = "batch"
        buffer = layout == "buffer" and axis == 2
        dims[axis].dim_param = f"cache_capacity_{l}" if buffer else f"present_length_{l}"


def export_graph(model, spec: GraphSpec, graph: str, path: str | Path, opset: int = OPSET, log=None,
                 wrapper: nn.Module | None = None, postprocess=None) -> Path:
    """The two-graph layout's ``graph`` ("prefill" or "decode") of ``model`` to ``path`` (weights in
    ``path``.data): the TensorRT plugin-mode graphs build on it.

    wrapper: the module to export (default ``PrefillGraph`` / ``DecodeGraph``); postprocess:
    called with the ModelProto before it is saved."""
    path = Path(path)
    wrapper = (wrapper or (PrefillGraph if graph == "prefill" else DecodeGraph)(model, spec)).eval()
    layout = getattr(wrapper, "cache_layout", "compact")
    start = time.perf_counter()
    proto = _trace(wrapper, sample_inputs(spec, graph, layout=layout), io_names(spec.layers)[graph],
                   _dynamic_shapes(spec, graph, layout), opset)
    _name_dims(proto, graph, spec.layers, layout)
    if graph == "decode":
        entry = proto.metadata_props.add()
        entry.key, entry.value = CACHE_LAYOUT_KEY, layout
    if postprocess is not None:
        postprocess(proto)
    return _save(proto, path, log, graph, start)

# -- the ONNX Runtime engine's graphs: decoder (weights) and compact (none) ----------------------


def engine_graphs(spec: GraphSpec) -> tuple[str, ...]:
    """The ONNX Runtime engine's graphs: decoder and compact."""
    return ("decoder", "compact")


def engine_io(spec: GraphSpec, vision: bool = False) -> dict[str, dict[str, list[str]]]:
    """Input and output names of the decoder and compact graphs."""
    scored = scored_layers(spec)
    layers = []
    for l in range(spec.layers):
        layers += ([f"mass.{l}"] if l in scored else []) + [f"key.{l}", f"value.{l}"]
    fixed = ["input_ids", "position_ids", "prompt_lengths", "past_widths"] + (["score_from"] if scored else [])
    return {
        "decoder": {"inputs": fixed + (["image_embeds"] if vision else []) + slot_names("past") + kv_names("past", spec.layers),
                    "outputs": ["logits", *slot_names("present"), *kv_names("present", spec.layers), *(["mass"] if scored else [])]},
        "compact": {"inputs": ["attention_mask", *layers], "outputs": cache_names("present", spec.layers)},
    }


def engine_sample_inputs(spec: GraphSpec, graph: str, batch: int = 2, chunk: int = 4, past: int = 6, hidden: int = 0):
    """Tracing inputs of the decoder or compact graph (no size 0 or 1 to specialise on);
    ``hidden`` > 0: the decoder takes image embeddings of that width."""
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, spec.dtype)
    scored = scored_layers(spec)
    if graph == "compact":
        length = 12
        mask = torch.ones(batch, length, dtype=torch.int64)
        mask[0, :3] = 0
        tensors = []
        for l in range(spec.layers):
            if l in scored:
                tensors.append(torch.rand(batch, length, generator=g))
            tensors += [torch.randn(batch, spec.kv_heads, length, spec.head_dim, generator=g).to(dtype) for _ in range(2)]
        return (mask, *tensors)
    ids = torch.randint(0, spec.vocab, (batch, chunk), generator=g)
    positions = torch.arange(past + 2, past + 2 + chunk).expand(batch, chunk).clone()
    shared = not spec.evicts  # ``DecoderGraph.shared_slots``: one set of slots, equal widths
    widths = [past if shared else past + l % 3 for l in range(spec.layers)]  # else distinct lengths per layer
    fixed = [ids, positions, torch.full((batch,), 40, dtype=torch.int64), torch.tensor(widths, dtype=torch.int64)]
    if scored:
        fixed.append(torch.tensor(1, dtype=torch.int64))  # score_from
    if hidden:
        fixed.append(torch.randn(3, hidden, generator=g).to(dtype))
    slots, valids, tensors = [], [], []
    for width in widths:
        capacity = width + chunk + 3
        valid = torch.ones(batch, width, dtype=torch.bool)
        valid[1, 1] = False
        slots.append(torch.where(valid, torch.arange(width).expand(batch, width), -1))
        valids.append(valid)
        tensors += [torch.randn(batch, spec.kv_heads, capacity, spec.head_dim, generator=g).to(dtype) for _ in range(2)]
    if shared:
        slots, valids = slots[:1], valids[:1]
    return (*fixed, torch.cat(slots, -1), torch.cat(valids, -1), *tensors)


def _engine_dynamic_shapes(spec: GraphSpec, graph: str, vision: bool = False):
    Dim = torch.export.Dim
    batch = Dim("batch", min=1, max=1024)
    scored = scored_layers(spec)
    if graph == "compact":
        seq = Dim("sequence", min=2, max=1 << 20)
        shapes = [{0: batch, 1: seq}]
        for l in range(spec.layers):
            shapes += ([{0: batch, 1: seq}] if l in scored else []) + [{0: batch, 2: seq}, {0: batch, 2: seq}]
        return {"attention_mask": shapes[0], "layers": tuple(shapes[1:])}
    chunk = Dim("chunk", min=1, max=1 << 20)
    shapes = [{0: batch, 1: chunk}] * 2 + [{0: batch}, {}] + ([{}] if scored else [])
    if vision:
        shapes.append({0: Dim("image_rows", min=1, max=1 << 24)})
    slots = Dim("past_slots", min=2, max=1 << 24)  # every layer's slots in use, side by side (or the one set all share)
    shapes += [{0: batch, 1: slots}, {0: batch, 1: slots}]
    for l in range(spec.layers):
        capacity = Dim(f"cache_capacity_{l}", min=2, max=1 << 20)
        shapes += [{0: batch, 2: capacity}, {0: batch, 2: capacity}]
    return {"inputs": tuple(shapes)}


def _engine_dims(proto, graph: str) -> None:
    """Readable names for the output dims the exporter left as opaque symbols."""
    for value in proto.graph.output:
        dims = value.type.tensor_type.shape.dim
        dims[0].dim_param = "batch"
        if value.name == "logits":
            continue
        if value.name in ("present.positions", "present.valid", "mass"):  # the decoder's, for every layer at once
            dims[1].dim_param = "scored_slots" if value.name == "mass" else "present_slots"
            continue
        l = int(value.name.split(".")[1])
        axis = 2 if value.name.endswith((".key", ".value")) else 1
        kv = axis == 2 and graph == "decoder"
        dims[axis].dim_param = f"cache_capacity_{l}" if kv else f"present_length_{l}"


def export_engine_graph(model, spec: GraphSpec, graph: str, path: str | Path, opset: int = OPSET, log=None,
                        image_token_id: int | None = None, hidden: int = 0) -> Path:
    """The ONNX Runtime engine's ``graph`` ("decoder" or "compact") to ``path`` (the
    decoder's weights in ``path``.data); ``image_token_id``/``hidden``: a vision engine's
    decoder, taking image embeddings.  The decoder is traced once per phase (``decoder_phases``:
    both where a layer evicts, joined into one graph by ``two_phase_graph``, else one)."""
    vision = image_token_id is not None
    if graph not in engine_graphs(spec):
        raise ExportError(f"an ONNX Runtime engine has no {graph!r} graph; it has {', '.join(engine_graphs(spec))}")
    args = engine_sample_inputs(spec, graph, hidden=hidden if vision and graph == "decoder" else 0)
    names = engine_io(spec, vision)[graph]
    shapes = _engine_dynamic_shapes(spec, graph, vision and graph == "decoder")
    start = time.perf_counter()
    if graph == "compact":
        proto = _trace(CompactGraph(model, spec).eval(), args, names, shapes, opset)
        _engine_dims(proto, graph)
        return _save(proto, Path(path), log, graph, start)
    fused, phases = {}, {}
    for phase in decoder_phases(spec):
        wrapper = DecoderGraph(model, spec, image_token_id, phase)
        outputs = [o for o in names["outputs"] if o != "mass" or wrapper.probabilities]
        phases[phase] = _trace(wrapper.eval(), args, {**names, "outputs": outputs}, shapes, opset, fused)
    proto = two_phase_graph(phases["prefill"], phases["decode"]) if len(phases) == 2 else phases["prefill"]
    del phases
    _engine_dims(proto, graph)
    fused["rotary_in_attention"] = sum(n.op_type == "GroupQueryAttention" and any(a.name == "do_rotary" and a.i
                                       for a in n.attribute) for n in phase_graph(proto, "decode").node)
    rows = score_rows(spec)
    fusions = ",".join(f"{name}={n}" for name, n in fused.items())
    for key, value in ((CACHE_LAYOUT_KEY, "buffer"), (SCORE_ROWS_KEY, "all" if rows is None else str(rows)),
                       (FUSIONS_KEY, fusions), (SLOTS_KEY, "shared" if wrapper.shared_slots else "per-layer")):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return _save(proto, Path(path), log, graph, start)


def decoder_phases(spec: GraphSpec) -> tuple[str, ...]:
    """The phases the decoder is traced in: both (``PHASES``), joined by one ``If``, where a
    layer evicts; else ("prefill",) alone, the whole graph: with shared slots neither phase has
    a bias, and with no scored layer neither returns probabilities, so the two are the same."""
    return PHASES if spec.evicts else PHASES[:1]


def two_phase_graph(prefill, decode):
    """One decoder ModelProto from its two traced phases: the inputs, the outputs and the
    weights once, in the main graph, and one ``If`` whose branches are the phases' graphs.

    The condition: every row's last token within its prompt (``position_ids[:, -1] <
    prompt_lengths``): a prompt chunk takes the prefill phase, a decode step the decode phase
    (the attention bias, no probabilities), which returns an empty (B, 0) mass, not read by
    the runner.  A prompt chunk before a ``window`` or ``last-query`` engine's scored rows
    takes the prefill phase too: its rows weigh 0 in the mass, and on SmolLM2 the bias cost
    such a chunk more than the probabilities (``docs/engine_v2.md``, 2026-12-06, later).

    Every initializer is in the main graph, once per content (the phases' traces name the
    same weight differently, "val_N"): ONNX Runtime packs a weight once for both branches
    (checked on 1.32; it held a second packed copy of a weight read from two depths of nested
    ``If``s, so the branches stay one level deep).  Every other name of a phase gets the
    prefix "PHASE/", so the branches share no name with each other or with the main graph.
    ``prefill`` becomes the result (its graph is the main graph) and ``decode`` loses its
    initializers: neither trace is usable afterwards."""
    from onnx import TensorProto, helper

    # The main graph is the prefill trace's own, its initializers kept in place: the weights are
    # not copied (a copy held them a third time while both traces lived).
    out, main = prefill, prefill.graph
    graphs = {"prefill": onnx.GraphProto(), "decode": decode.graph}  # the prefill branch's nodes, moved aside
    for field_ in ("node", "value_info", "output"):
        getattr(graphs["prefill"], field_).extend(getattr(main, field_))
    for field_ in ("node", "value_info"):
        main.ClearField(field_)
    known = {i.name for i in main.input}
    main.input.extend(i for i in decode.graph.input if i.name not in known)
    inputs = {i.name for i in main.input}
    domains = {o.domain for o in out.opset_import}
    out.opset_import.extend(o for o in decode.opset_import if o.domain not in domains)
    functions = {(f.domain, f.name) for f in out.functions}
    out.functions.extend(f for f in decode.functions if (f.domain, f.name) not in functions)
    # one tensor per content: a decode-trace initializer equal to a prefill one (every weight)
    # reads that one; the others (small constants) join the main graph under a free name
    renamed = {("prefill", i.name): i.name for i in main.initializer}  # (phase, name) -> its main-graph name
    by_content = {}
    for init in main.initializer:
        by_content.setdefault(_content(init), init.name)
    taken = inputs | {i.name for i in main.initializer}
    for init in decode.graph.initializer:
        content = _content(init)
        if content not in by_content:
            main_name = init.name
            while main_name in taken:
                main_name += "_"
            taken.add(main_name)
            tensor = TensorProto()
            tensor.CopyFrom(init)
            tensor.name = main_name
            main.initializer.append(tensor)
            by_content[content] = main_name
        renamed[("decode", init.name)] = by_content[content]
    decode.graph.ClearField("initializer")
    branches = {}
    for phase, graph in graphs.items():

        def name(value: str, phase=phase) -> str:
            if not value or value in inputs:
                return value
            return renamed.get((phase, value), f"{phase}/{value}")

        nodes = []
        for node in graph.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.input[:] = [name(v) for v in node.input]
            copy.output[:] = [name(v) for v in node.output]
            copy.name = f"{phase}/{node.name or node.op_type + '_' + str(len(nodes))}"
            nodes.append(copy)
        infos = []
        for info in graph.value_info:
            copy = onnx.ValueInfoProto()
            copy.CopyFrom(info)
            copy.name = name(info.name)
            infos.append(copy)
        results = {o.name: name(o.name) for o in graph.output}
        types = {o.name: o.type.tensor_type.elem_type for o in main.output}
        if "mass" in types and "mass" not in results:  # an empty (B, 0) mass
            empty = f"{phase}/mass"
            nodes += [
                helper.make_node("Shape", ["input_ids"], [f"{phase}/mass.rows"], end=1),
                helper.make_node("Constant", [], [f"{phase}/mass.none"], value=helper.make_tensor(f"{phase}/mass.zero", TensorProto.INT64, [1], [0])),
                helper.make_node("Concat", [f"{phase}/mass.rows", f"{phase}/mass.none"], [f"{phase}/mass.shape"], axis=0),
                helper.make_node("ConstantOfShape", [f"{phase}/mass.shape"], [empty],
                                 value=helper.make_tensor(f"{phase}/mass.fill", types["mass"], [1], [0])),
            ]
            results["mass"] = empty
        branches[phase] = helper.make_graph(
            nodes, phase, [], [helper.make_tensor_value_info(results[o.name], types[o.name], None) for o in main.output],
            value_info=infos)
    main.node.extend([  # every row's last token within its prompt
        helper.make_node("Constant", [], ["phase.last"], value=helper.make_tensor("phase.minus_one", TensorProto.INT64, [], [-1])),
        helper.make_node("Gather", ["position_ids", "phase.last"], ["phase.positions"], axis=1),
        helper.make_node("Less", ["phase.positions", "prompt_lengths"], ["phase.rows"]),
        helper.make_node("Cast", ["phase.rows"], ["phase.counts"], to=TensorProto.INT64),
        helper.make_node("ReduceMin", ["phase.counts"], ["phase.all"], keepdims=0),
        helper.make_node("Cast", ["phase.all"], ["phase.prefill"], to=TensorProto.BOOL)])
    main.node.append(helper.make_node("If", ["phase.prefill"], [o.name for o in main.output], name="phase",
                                      then_branch=branches["prefill"], else_branch=branches["decode"]))
    return out


def _content(tensor) -> tuple:
    """A TensorProto's type, shape and values, without its name: (data type, dims, sha256).
    A weight's raw bytes are hashed as they are (not copied into a second tensor and
    serialized: the join hashes every weight of both traces); a tensor holding its values in
    a typed field (a small constant) is hashed serialized, without its name."""
    import hashlib

    data = tensor.raw_data
    if data:
        return tensor.data_type, tuple(tensor.dims), "raw", hashlib.sha256(data).hexdigest()
    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    copy.ClearField("name")
    return tensor.data_type, tuple(tensor.dims), "proto", hashlib.sha256(copy.SerializeToString()).hexdigest()


def phase_graph(proto, phase: str):
    """The decoder's graph of ``phase`` ("prefill" or "decode"): a branch of its one ``If``, or
    the main graph of a decoder with one phase for both (``decoder_phases``)."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
    node = next((n for n in proto.graph.node if n.op_type == "If" and n.name == "phase"), None)
    if node is None:
        return proto.graph
    return {a.name: a.g for a in node.attribute}["then_branch" if phase == "prefill" else "else_branch"]


def export_engine_graphs(model, spec: GraphSpec, folder: str | Path, opset: int = OPSET, log=None) -> dict[str, Path]:
    """The ONNX Runtime engine's graphs into ``folder``: decoder.onnx(+.data) and compact.onnx."""
    folder = Path(folder)
    return {g: export_engine_graph(model, spec, g, folder / f"{g}.onnx", opset, log) for g in engine_graphs(spec)}


def fuse_for_onnxruntime(model) -> dict[str, int]:
    """Rewrite ``model`` (an ``onnx_ir`` model, in place) to ONNX Runtime's fused RMSNorm and
    residual-add + RMSNorm kernels with onnxscript's own ORT fusion rules; returns how many of
    each it found.  ONNX Runtime's session optimizer does not match the exported norm
    (``Reciprocal(Sqrt)``, not ``Div``), so every decode step ran 6 small ops per norm: 366 of
    SmolLM2's 3102 exported nodes.  Only these two rules run: ``optimize_for_ort`` also re-runs
    the constant folder (47 s in all on SmolLM2, against under 1 s for these two), and its
    rotary fusion matched here only as an intermediate function that it inlines again.  A
    norm that does not match the rules' patterns is left as exported."""
    from onnxscript.rewriter.ort_fusions import rms_normalization, skip_normalization

    return {"rms_normalization": rms_normalization.fuse_rms_normalization(model),
            "skip_rms_normalization": skip_normalization.fuse_skip_rms_normalization(model)}


def _trace(wrapper: nn.Module, args, names: dict, dynamic_shapes, opset: int, fused: dict | None = None):
    """torch.onnx.export (dynamo) of ``wrapper`` on ``args`` -> the ModelProto; ``fused``: a dict
    to fill with ``fuse_for_onnxruntime``'s counts (None: no fusion)."""
    quiet = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "torchvision is not installed" notices
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*(axis name|LeafSpec).*")
            program = torch.onnx.export(wrapper, args, dynamo=True, input_names=names["inputs"],
                                        output_names=names["outputs"], dynamic_shapes=dynamic_shapes,
                                        opset_version=opset, optimize=True, verbose=False)
    finally:
        quiet.setLevel(level)
    if fused is not None:
        fused.update(fuse_for_onnxruntime(program.model))
    return program.model_proto


def _save(proto, path: Path, log, name: str, start: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data",
                    size_threshold=1024)
    if log:
        log(f"exported {name} graph in {time.perf_counter() - start:.0f} s -> {path}")
    return path


def io_metadata(path: str | Path) -> dict:
    """{"inputs": [{"name", "dtype", "shape"}], "outputs": [...]} of an ONNX file (no weights loaded)."""
    model = onnx.load(str(path), load_external_data=False)

    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": shape})
        return out

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output), "opset": opset}
