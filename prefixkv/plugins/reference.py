"""The three PrefixKV ops, in PyTorch: the specification every fused kernel must match.

    prefill_attention_with_scores   causal GQA prefill attention + per-key attention mass
    select_and_gather               one layer's compaction: keep the top keys, gather K/V
    decode_attention                attention of new tokens over a compacted cache

These are thin wrappers: ``prefixkv.scoring`` and ``prefixkv.compaction`` already are the
spec, so nothing here is re-implemented.  ``width_bound`` is the one addition: the slot
count an engine with static output shapes gives a layer when it knows only the padded
prompt length (see its docstring).

Shapes (B batch, H query heads, Hkv KV heads, S padded prompt, Q query rows, W slots, D head dim):
    q (B, H, Q, D); k, v (B, Hkv, S, D); key_valid (B, S) bool, left padding.
"""
from __future__ import annotations

import math

import torch

from .. import compaction, scoring

# The keep fraction is rounded up to a multiple of 1 / WIDTH_DENOMINATOR in ``width_bound``.
WIDTH_DENOMINATOR = 1 << 16


def prefill_attention_with_scores(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor, scaling: float, block: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal GQA prefill attention and the attention mass each key receives.

    q (B, H, Q, D), Q <= S (the queries are the last Q positions); k, v (B, Hkv, S, D);
    key_valid (B, S) bool.  Returns out (B, Q, H, D) in q's dtype and importance (B, S)
    float32: probabilities summed over all non-padded query rows, averaged over the H heads.
    """
    return scoring.attention_with_scores(q, k, v, key_valid, scaling, score_rows=q.shape[2], block=block)


def select_and_gather(
    k: torch.Tensor,
    v: torch.Tensor,
    importance: torch.Tensor,
    key_valid: torch.Tensor,
    fraction: float | torch.Tensor,
    sink: int,
    protect_last: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's prefill compaction (``prefixkv.compaction.compact``, stable ties).

    k, v (B, Hkv, S, D); importance (B, S); key_valid (B, S) bool; fraction: the layer's
    keep fraction.  Returns k_kept, v_kept (B, Hkv, W, D), positions (B, W) int64 original
    positions (-1 for an empty slot) and kept (B, W) bool, W = the largest row count.
    Kept entries are right-aligned in original order; ties go to the lower index.
    The K/V contents of empty slots are unspecified (masked out by ``kept``).
    """
    return compaction.compact(k, v, importance, key_valid, fraction, sink, protect_last, stable=True)


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Attention of Q new tokens over a compacted cache whose last Q slots are those tokens.

    q (B, H, Q, D); k, v (B, Hkv, W, D); valid (B, W) bool.  Returns (B, Q, H, D).
    """
    return scoring.decode_attention(q, k, v, valid, scaling)


def width_numerator(fraction: float) -> int:
    """The keep fraction rounded *up* to a multiple of 1 / WIDTH_DENOMINATOR, as the numerator."""
    f32 = float(torch.tensor(float(fraction), dtype=torch.float32))
    if not 0.0 <= f32 <= 1.0:
        raise ValueError(f"keep fraction must be in [0, 1], got {fraction}")
    return math.ceil(f32 * WIDTH_DENOMINATOR)


def width_bound(seq_len: int, fraction: float, sink: int, protect_last: bool = True) -> int:
    """Slots for a layer when only the padded prompt length S is known (static shapes).

    ``compact`` gives a batch W = max over rows of ``keep_counts(length)``, a value that
    depends on the data.  An engine whose output shapes must be functions of the input
    shapes (a TensorRT plugin) uses this integer-only upper bound instead:

        min(S, (p * S) // 2**16 + 1), at least the protected count,  p = ceil(f * 2**16)

    It is >= ``keep_counts(S)`` >= every row's count (counts grow with the length), and for
    S <= 2**16 at most two slots more than ``keep_counts(S)``.  The extra slots are empty
    (position -1, kept False) at the front, like left padding.
    """
    s = int(seq_len)
    k = min(s, (width_numerator(fraction) * s) // WIDTH_DENOMINATOR + 1)
    sinks = min(sink, s)
    protected = sinks + int(protect_last and s > sinks)
    return max(k, protected)


__all__ = [
    "prefill_attention_with_scores",
    "select_and_gather",
    "decode_attention",
    "width_bound",
    "width_numerator",
    "WIDTH_DENOMINATOR",
]
