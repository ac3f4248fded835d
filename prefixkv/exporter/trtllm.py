"""TensorRT-LLM integration: three ways, each tied to the TensorRT-LLM sources it was written against.

(a) PyTorch backend, ``sparse_attention_config`` (prototype API; TensorRT-LLM >= 1.1).
    Sources read: docs/source/features/sparse-attention.md ("Implementing a New
    Algorithm": subclass ``TrtllmAttention``, override ``sparse_kv_predict``, which returns
    the indices of the prompt tokens to keep, *sorted*, shape [num_kv_heads, total_tokens]
    plus per-sequence offsets [num_contexts + 1]; the KV cache is then gathered by
    ``updateSparseKvCacheAfterFmha``), tensorrt_llm/_torch/attention_backend/sparse/rocket.py
    (``RocketTrtllmAttention.sparse_kv_predict(q, k, metadata, **kwargs)`` and
    ``RocketTrtllmAttentionMetadata.prepare``, which shortens each generation request's
    cached length to its budget), tensorrt_llm/llmapi/llm_args.py
    (``BaseSparseAttentionConfig``, ``RocketSparseAttentionConfig``).  Newer main passes
    ``forward_args: AttentionForwardArgs`` instead of ``**kwargs``; both are accepted here.

    Limits, honestly:
    * One cached length per request for *all* layers: TensorRT-LLM's KV cache manager has
      no per-layer lengths.  Per-layer PrefixKV budgets become "max length with per-layer
      masks": every layer keeps its own top ``W = max over layers of the keep count``
      entries (so memory is that of the largest layer, not the profile's average), and
      ``layer_keep_masks`` says which of those W each layer would keep on its own.  The
      masks are not applied by default (that needs a token-sparse ``sparse_attn_predict``,
      SM100+ in TensorRT-LLM); layers with a small budget then see extra entries.
    * The importance is computed from the q/k TensorRT-LLM hands ``sparse_kv_predict``;
      when RoPE is fused into the attention op these are *before* RoPE, unlike the
      reference (post-RoPE attention mass).  Prompt attention is computed twice (FMHA +
      our scoring kernel).
    * No decode-phase eviction (TensorRT-LLM has no dynamic eviction in generation): after
      the compacted prompt the cache grows by one entry per token.
    * KV block reuse and chunked prefill must be off (as for RocketKV).
    * Dispatch: TensorRT-LLM picks the backend class from a fixed table keyed by the
      config's ``algorithm`` (sparse/utils.py, later sparse/registry.py,
      ``get_trtllm_sparse_attn_attention_backend``).  There is no registration hook, and
      we do not monkey-patch: ``DISPATCH_PATCH`` is the one-line change to make there.

(b) TensorRT-LLM 1.2.x engines (TensorRT backend): ``tensorrt_llm.python_plugin``
    (``PluginBase`` + ``@trtllm_plugin``; examples/python_plugin/plugin_lib/lookup_plugin.py)
    wrapping the Triton kernels.  These plugins call Python at engine run time; for an
    engine without Python use the TensorRT AOT plugins in ``prefixkv.plugins.trt``.

(c) Approximate mode, any TensorRT-LLM with a per-layer ``KvCacheConfig.max_attention_window``
    list (llmapi reference: ``max_attention_window: List[int]``, ``sink_token_length``):
    ``max_attention_window_from_profile`` sizes each layer's sliding window like its
    PrefixKV budget at the longest sequence.  It keeps the most *recent* tokens (plus
    sinks), not the most important ones: same memory profile, StreamingLLM-like quality.

Nothing here is imported eagerly; (a) and (b) are unverified (no TensorRT-LLM / GPU here).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import compaction
from ..defaults import PROTECT_LAST, SINK
from ..optional import optional_import
from ..plugins.reference import WIDTH_DENOMINATOR, width_numerator

SOURCES = {
    "pytorch_backend": "TensorRT-LLM >= 1.1: _torch/attention_backend/sparse/rocket.py, llmapi/llm_args.py, "
                       "docs/source/features/sparse-attention.md",
    "python_plugin": "TensorRT-LLM 1.2.x: tensorrt_llm/python_plugin.py, examples/python_plugin",
    "max_attention_window": "llmapi KvCacheConfig(max_attention_window: List[int], sink_token_length)",
}
ALGORITHM = "prefixkv"
DISPATCH_PATCH = """\
# tensorrt_llm/_torch/attention_backend/sparse/utils.py (registry.py on main),
# get_trtllm_sparse_attn_attention_backend(sparse_attn_config):
    elif sparse_attn_config.algorithm == "prefixkv":
        from prefixkv.exporter.trtllm import pytorch_backend_classes
        return pytorch_backend_classes()[1]
# and get_sparse_attn_kv_cache_manager: return KVCacheManager for "prefixkv"
"""


def _import_trtllm():
    return optional_import("tensorrt_llm", "pip install tensorrt_llm (Linux, NVIDIA GPU with CUDA; "
                                           "see https://nvidia.github.io/TensorRT-LLM/installation/)", "TensorRT-LLM")


# ----------------------------------------------------------------------------------------
# pure helpers (testable without TensorRT-LLM)
# ----------------------------------------------------------------------------------------
def keep_count(length: int, fraction: float, sink: int = SINK, protect_last: bool = PROTECT_LAST) -> int:
    """Entries a layer keeps of a ``length``-token prompt (``compaction.keep_counts``)."""
    return int(compaction.keep_counts(torch.tensor([int(length)]), float(fraction), sink, protect_last)[0])


def max_attention_window_from_profile(
    layer_fractions: Sequence[float], max_seq_len: int, sink: int = SINK, protect_last: bool = PROTECT_LAST
) -> list[int]:
    """Per-layer windows for ``KvCacheConfig(max_attention_window=[...])`` (approximate mode).

    The one TensorRT-LLM window rule (``kv_cache_config`` here and ``prefixkv deploy --trtllm``,
    ``serving.trtllm_repository``, both use it).  Layer l gets the entries PrefixKV would keep
    of a ``max_seq_len``-token sequence, ``compaction.keep_counts(max_seq_len, f_l, sink,
    protect_last)``: floor(f_l x max_seq_len + 0.5) in float32, clamped to [protected entries
    (the sinks and the last token), max_seq_len], and at least 1 (TensorRT-LLM has no empty
    window).  Pair it with ``sink_token_length=sink``.
    """
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    if not layer_fractions:
        raise ValueError("layer_fractions is empty: give one keep fraction per layer")
    bad = [f for f in layer_fractions if not 0.0 <= float(f) <= 1.0]
    if bad:
        raise ValueError(f"keep fractions must be in [0, 1], got {bad[:3]}")
    return [max(1, keep_count(max_seq_len, f, sink, protect_last)) for f in layer_fractions]


def kv_cache_config(layer_fractions: Sequence[float], max_seq_len: int, sink: int = SINK, protect_last: bool = PROTECT_LAST, **kwargs):
    """``tensorrt_llm.llmapi.KvCacheConfig`` for the approximate mode (block reuse off)."""
    _import_trtllm()
    from tensorrt_llm.llmapi import KvCacheConfig

    windows = max_attention_window_from_profile(layer_fractions, max_seq_len, sink, protect_last)
    kwargs.setdefault("enable_block_reuse", False)
    return KvCacheConfig(max_attention_window=windows, sink_token_length=sink, **kwargs)


def shared_width(prompt_len: int, layer_fractions: Sequence[float], sink: int = SINK, protect_last: bool = PROTECT_LAST) -> int:
    """W: entries every layer keeps of one prompt when layers must share one length."""
    return max(keep_count(prompt_len, f, sink, protect_last) for f in layer_fractions)


def top_positions(importance: torch.Tensor, count: int, sink: int = SINK, protect_last: bool = PROTECT_LAST) -> torch.Tensor:
    """Sorted positions of one unpadded prompt's top ``count`` entries (protected first,
    ties to the lower index), as ``compaction.select`` picks them.  importance (S,) -> (count,) int64."""
    s = importance.shape[-1]
    valid = torch.ones(1, s, dtype=torch.bool, device=importance.device)
    scores = compaction.protect(importance.reshape(1, s).float(), valid, sink, protect_last)
    index, kept = compaction.select(scores, valid, torch.tensor([count], device=importance.device), count)
    return index[0][kept[0]]


def layer_keep_masks(positions: torch.Tensor, importance: torch.Tensor, fraction: float, sink: int = SINK,
                     protect_last: bool = PROTECT_LAST) -> torch.Tensor:
    """Which of a layer's W kept ``positions`` (W,) the layer keeps with its own budget: (W,) bool."""
    own = top_positions(importance, keep_count(importance.shape[-1], fraction, sink, protect_last), sink, protect_last)
    return torch.isin(positions, own)


def flatten_sparse_kv_indices(per_sequence: Sequence[torch.Tensor], num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RocketKV's ``sparse_kv_predict`` output format from per-sequence sorted positions.

    Returns indices (num_kv_heads, total) int32 (every KV head keeps the same tokens:
    PrefixKV's importance is averaged over heads) and offsets (n + 1,) int32.
    """
    for i, p in enumerate(per_sequence):
        if p.numel() > 1 and not bool((p[1:] > p[:-1]).all()):
            raise ValueError(f"sequence {i}: sparse_kv_predict indices must be strictly increasing")
    counts = torch.tensor([p.numel() for p in per_sequence], dtype=torch.int32)
    offsets = torch.zeros(len(per_sequence) + 1, dtype=torch.int32)
    offsets[1:] = torch.cumsum(counts, 0)
    flat = torch.cat([p.to(torch.int32).cpu() for p in per_sequence]) if per_sequence else torch.zeros(0, dtype=torch.int32)
    return flat.unsqueeze(0).expand(num_kv_heads, -1).contiguous(), offsets


def loose_width(seq_len, fraction: float, sink: int, protect_last: bool = PROTECT_LAST):
    """An upper bound of ``reference.width_bound`` with +, * and // only (no min/max), for
    symbolic shapes that support nothing else: (S * p) // 2**16 + 1 + protected."""
    return (seq_len * width_numerator(fraction)) // WIDTH_DENOMINATOR + 1 + int(sink) + int(bool(protect_last))


# ----------------------------------------------------------------------------------------
# (a) PyTorch backend
# ----------------------------------------------------------------------------------------
_backend_classes = None


def pytorch_backend_classes():
    """(PrefixKVSparseAttentionConfig, PrefixKVTrtllmAttention, PrefixKVTrtllmAttentionMetadata),
    defined on first use against the installed TensorRT-LLM."""
    global _backend_classes
    if _backend_classes is not None:
        return _backend_classes
    _import_trtllm()
    try:
        from pydantic import Field
        from tensorrt_llm._torch.attention_backend.trtllm import (
            TrtllmAttention,
            TrtllmAttentionMetadata,
        )
        from tensorrt_llm.llmapi.llm_args import BaseSparseAttentionConfig
    except ImportError as err:
        raise RuntimeError(
            "this TensorRT-LLM has no sparse-attention extension point (tensorrt_llm._torch.attention_backend."
            f"trtllm.TrtllmAttention / llmapi.llm_args.BaseSparseAttentionConfig); it was written against {SOURCES['pytorch_backend']}"
        ) from err

    class PrefixKVSparseAttentionConfig(BaseSparseAttentionConfig):
        """PrefixKV prompt compaction with per-layer keep fractions from a retention profile."""

        algorithm: str = Field(default=ALGORITHM)
        layer_keep_fractions: list[float] = Field(default_factory=list, description="keep fraction of each layer")
        sink: int = Field(default=SINK, description="first tokens always kept")
        protect_last: bool = Field(default=PROTECT_LAST, description="the last prompt token is always kept")

        def supports_backend(self, backend: str) -> bool:
            return backend == "pytorch"

        def get_indices_block_size(self) -> int:
            return 1

    class PrefixKVTrtllmAttentionMetadata(TrtllmAttentionMetadata):
        """Shortens each generation request's cached length to its compacted prompt, like
        ``RocketTrtllmAttentionMetadata.prepare`` does with its fixed prompt budget."""

        def prepare(self):
            config = self.sparse_attention_config
            if self.kv_cache_manager is not None and config is not None:
                for i in range(self.num_contexts, self.num_contexts + self.num_generations):
                    prompt = int(self.prompt_lens[i])
                    kept = shared_width(prompt, config.layer_keep_fractions, config.sink, config.protect_last)
                    self.kv_cache_params.num_cached_tokens_per_seq[i] += kept - prompt
            super().prepare()

    class PrefixKVTrtllmAttention(TrtllmAttention):
        """``sparse_kv_predict``: per context request, the layer's attention mass over the
        prompt (Triton kernel), then its top-W positions, W shared by all layers."""

        Metadata = PrefixKVTrtllmAttentionMetadata

        def __init__(self, layer_idx, num_heads, head_dim, num_kv_heads=None, quant_config=None, q_scaling=None,
                     sparse_attention_config=None, **kwargs):
            super().__init__(layer_idx, num_heads, head_dim, num_kv_heads=num_kv_heads, quant_config=quant_config,
                             q_scaling=q_scaling, sparse_attention_config=sparse_attention_config, **kwargs)
            cfg = sparse_attention_config
            if cfg is None or not cfg.layer_keep_fractions:
                raise ValueError("PrefixKVSparseAttentionConfig needs layer_keep_fractions (one per layer)")
            self.fractions = list(cfg.layer_keep_fractions)
            self.sink, self.protect_last = int(cfg.sink), bool(cfg.protect_last)
            self.scaling = (head_dim ** -0.5) / (q_scaling or 1.0)

        def sparse_kv_predict(self, q, k, metadata, *args, **kwargs):
            from ..plugins.kernels import prefill_attention_with_scores

            n_ctx = int(metadata.num_contexts)
            if n_ctx == 0:
                return None, None
            h, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
            lengths = [int(x) for x in metadata.context_lens[:n_ctx]]
            keys = k if k is not None else q[:, h * d:(h + hkv) * d]  # fused QKV when k is None
            queries = q[:, : h * d]
            chosen, start = [], 0
            for n in lengths:
                qi = queries[start:start + n].reshape(n, h, d).transpose(0, 1).unsqueeze(0)
                ki = keys[start:start + n].reshape(n, hkv, d).transpose(0, 1).unsqueeze(0)
                valid = torch.ones(1, n, dtype=torch.bool, device=q.device)
                _, importance = prefill_attention_with_scores(qi, ki, ki, valid, self.scaling, 64, 64)
                width = shared_width(n, self.fractions, self.sink, self.protect_last)
                chosen.append(top_positions(importance[0], width, self.sink, self.protect_last))
                start += n
            indices, offsets = flatten_sparse_kv_indices(chosen, hkv)
            return indices.to(q.device), offsets.to(q.device)

        def sparse_attn_predict(self, q, k, metadata, *args, **kwargs):
            return None, None  # dense attention over the compacted cache

    _backend_classes = (PrefixKVSparseAttentionConfig, PrefixKVTrtllmAttention, PrefixKVTrtllmAttentionMetadata)
    return _backend_classes


# ----------------------------------------------------------------------------------------
# (b) TensorRT-LLM 1.2.x python plugins
# ----------------------------------------------------------------------------------------
_plugin_classes = None


def python_plugins():
    """{"select": PrefixKVSelectPlugin, "prefill_scores": ..., "decode": ...} for
    TensorRT-LLM 1.2.x network building (``plugin(*tensors)`` inside ``net_guard``)."""
    global _plugin_classes
    if _plugin_classes is not None:
        return _plugin_classes
    _import_trtllm()
    try:
        from tensorrt_llm import PluginBase
        from tensorrt_llm.python_plugin import (
            SymTensor,
            convert_to_torch_tensor,
            trtllm_plugin,
        )
    except ImportError as err:
        raise RuntimeError(f"this TensorRT-LLM has no python_plugin module; it was written against {SOURCES['python_plugin']}") from err
    from ..plugins import kernels

    @trtllm_plugin("PrefixKVSelect")
    class PrefixKVSelectPlugin(PluginBase):
        """k, v (B,Hkv,S,D), importance (B,S) fp32, valid (B,S) int32 -> k, v (B,Hkv,W,D), positions, kept (B,W) int32.
        W = ``loose_width(S)`` (SymTensor shapes have no min/max): extra slots are empty."""

        def __init__(self, keep_fraction: float, sink: int, protect_last: bool):
            super().__init__()
            self.keep_fraction, self.sink, self.protect_last = float(keep_fraction), int(sink), bool(protect_last)

        def shape_dtype_inference(self, inputs):
            k = inputs[0]
            width = loose_width(k.shape[2], self.keep_fraction, self.sink, self.protect_last)
            kv_shape = k.shape
            kv_shape[2] = width
            pos_shape = inputs[2].shape
            pos_shape[1] = width
            return (SymTensor(k.dtype, kv_shape), SymTensor(inputs[1].dtype, kv_shape),
                    SymTensor(torch.int32, pos_shape), SymTensor(torch.int32, pos_shape))

        def forward(self, inputs, outputs):
            ins = [convert_to_torch_tensor(t) for t in inputs]
            outs = [convert_to_torch_tensor(t) for t in outputs]
            kernels.launch_select(*ins, *outs, self.keep_fraction, self.sink, self.protect_last, 256)

    @trtllm_plugin("PrefixKVPrefillScores")
    class PrefixKVPrefillScoresPlugin(PluginBase):
        """q (B,H,Q,D), k, v (B,Hkv,S,D), valid (B,S) int32 -> out (B,Q,H,D), partial (B,P,S,1) fp32;
        importance = ReduceSum(partial, axes (1, 3)).  The partial keeps rank 4 (k's shape with
        dims 1 and 3 replaced) because SymTensor shapes are edited in place, not rebuilt."""

        def __init__(self, scaling: float, heads_per_program: int, block: int = 64):
            super().__init__()
            self.scaling, self.hpp, self.block = float(scaling), int(heads_per_program), int(block)

        def shape_dtype_inference(self, inputs):
            q, k = inputs[0], inputs[1]
            out_shape = q.shape  # (B, H, Q, D) -> (B, Q, H, D)
            heads, q_len = out_shape[1], out_shape[2]
            out_shape[1], out_shape[2] = q_len, heads
            part = k.shape
            part[1] = (q_len + (self.block - 1)) // self.block * (heads // self.hpp)
            part[3] = 1
            return SymTensor(q.dtype, out_shape), SymTensor(torch.float32, part)

        def forward(self, inputs, outputs):
            t = [convert_to_torch_tensor(x) for x in (*inputs, *outputs)]
            kernels.launch_prefill(*t, self.scaling, self.hpp, self.block, self.block)

    @trtllm_plugin("PrefixKVDecode")
    class PrefixKVDecodePlugin(PluginBase):
        """q (B,H,Q,D), k, v (B,Hkv,W,D), valid (B,W) int32 -> out (B,Q,H,D)."""

        def __init__(self, scaling: float):
            super().__init__()
            self.scaling = float(scaling)

        def shape_dtype_inference(self, inputs):
            shape = inputs[0].shape
            heads, q_len = shape[1], shape[2]
            shape[1], shape[2] = q_len, heads
            return SymTensor(inputs[0].dtype, shape)

        def forward(self, inputs, outputs):
            t = [convert_to_torch_tensor(x) for x in (*inputs, *outputs)]
            kernels.launch_decode(*t, self.scaling, 16, 64)

    _plugin_classes = {"select": PrefixKVSelectPlugin, "prefill_scores": PrefixKVPrefillScoresPlugin,
                       "decode": PrefixKVDecodePlugin}
    return _plugin_classes


__all__ = [
    "max_attention_window_from_profile",
    "kv_cache_config",
    "keep_count",
    "shared_width",
    "top_positions",
    "layer_keep_masks",
    "flatten_sparse_kv_indices",
    "loose_width",
    "pytorch_backend_classes",
    "python_plugins",
    "DISPATCH_PATCH",
    "SOURCES",
]
