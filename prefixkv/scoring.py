"""Importance scores: how much each cached key position matters, per layer.

One small class per score, behind one interface.  Each scorer names the query rows it
needs (``query_rows``), so attention mass is computed only for those rows, in blocks
of queries: memory stays O(block x seq) and the full attention matrix never exists.

    accumulated  the paper's: attention mass received, summed over all prompt queries,
                 averaged over query heads (H2O's score, PrefixKV's score)
    window       mass from the last ``window`` queries, smoothed by average pooling (SnapKV)
    last-query   mass from the last query only (TOVA)
    key-norm     low key L2 norm (averaged over KV heads) scores high: max norm - norm
    recency      the position itself (keeps the most recent tokens: StreamingLLM)

``attention_with_scores`` is the math; no framework glue lives here.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Scorer:
    """Base class.  ``query_rows(q_len)`` is how many trailing query rows contribute
    attention mass (``q_len`` for all; 0 when the score needs no attention)."""

    name: str = ""
    params: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        """A unique name with parameters, e.g. ``window(pool=5,window=8)``."""
        inner = ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return f"{self.name}({inner})" if inner else self.name

    def query_rows(self, q_len: int) -> int:
        return q_len

    def from_attention(self, mass: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """mass (batch, S): summed attention over the contributing rows, mean over heads;
        valid (batch, S) bool: the real (not padding) positions, None for all."""
        return mass

    def from_keys(self, keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class Accumulated(Scorer):
    name: str = "accumulated"


@dataclass(frozen=True)
class Window(Scorer):
    """Mass from the last ``window`` queries, average-pooled over ``pool`` neighbouring keys."""

    name: str = "window"
    window: int = 8
    pool: int = 5

    def __post_init__(self):
        if self.window < 1 or self.pool < 1 or self.pool % 2 == 0:
            raise ValueError(f"window scorer needs window >= 1 and an odd pool >= 1, got {self.window}, {self.pool}")
        object.__setattr__(self, "params", {"window": self.window, "pool": self.pool})

    def query_rows(self, q_len: int) -> int:
        return min(self.window, q_len)

    def from_attention(self, mass: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """The mean over each key's ``pool`` neighbours among the real positions: padding
        columns (left padding of a batch) neither count nor pull a neighbour's score down,
        so a padded row scores as it does alone."""
        if self.pool == 1:
            return mass
        if valid is None:
            return F.avg_pool1d(mass.unsqueeze(1), self.pool, stride=1, padding=self.pool // 2, count_include_pad=False)[:, 0]
        real = valid.to(mass.dtype)
        pooled = F.avg_pool1d(torch.stack([mass * real, real], 1).flatten(0, 1).unsqueeze(1), self.pool, stride=1,
                              padding=self.pool // 2).view(mass.shape[0], 2, -1)
        return torch.where(valid, pooled[:, 0] / pooled[:, 1].clamp_min(1e-9), torch.zeros_like(mass))


@dataclass(frozen=True)
class LastQuery(Scorer):
    name: str = "last-query"

    def query_rows(self, q_len: int) -> int:
        return 1


@dataclass(frozen=True)
class KeyNorm(Scorer):
    name: str = "key-norm"

    def query_rows(self, q_len: int) -> int:
        return 0

    def from_keys(self, keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """keys (batch, kv_heads, S, head_dim) -> (batch, S): the gap between the row's largest
        key norm and this key's norm (norms averaged over KV heads), so low-norm keys score
        high and the scores are a non-negative mass the prefix search can allocate over."""
        norm = keys.float().norm(dim=-1).mean(1)
        top = norm.masked_fill(~valid, float("-inf")).amax(-1, keepdim=True)
        return (top - norm).masked_fill(~valid, 0.0)


@dataclass(frozen=True)
class Recency(Scorer):
    name: str = "recency"

    def query_rows(self, q_len: int) -> int:
        return 0

    def from_keys(self, keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return torch.arange(keys.shape[2], dtype=torch.float32, device=keys.device).expand(keys.shape[0], -1)


SCORERS: dict[str, type[Scorer]] = {
    "accumulated": Accumulated,
    "window": Window,
    "last-query": LastQuery,
    "key-norm": KeyNorm,
    "recency": Recency,
}


def make_scorer(name: str | Scorer, **params) -> Scorer:
    """A scorer by name (``window`` takes ``window=`` and ``pool=``)."""
    if isinstance(name, Scorer):
        return name
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; choose one of {', '.join(SCORERS)}")
    try:
        return SCORERS[name](**params)
    except TypeError as err:
        raise ValueError(f"scorer {name!r} does not take parameters {sorted(params)}") from err


def causal_mask(q_len: int, key_valid: torch.Tensor) -> torch.Tensor:
    """Bool (batch, 1, q_len, S): the last ``q_len`` of S positions attend causally to valid keys.

    A padded query row is allowed its own position only, so its softmax stays finite;
    its output is never used.
    """
    s = key_valid.shape[-1]
    rows = torch.arange(s - q_len, s, device=key_valid.device).view(-1, 1)
    cols = torch.arange(s, device=key_valid.device).view(1, -1)
    allowed = (cols <= rows).unsqueeze(0) & key_valid[:, None, :]
    own = (cols == rows).unsqueeze(0) & ~key_valid[:, s - q_len :, None]
    return (allowed | own).unsqueeze(1)


def attention_with_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_valid: torch.Tensor,
    scaling: float,
    score_rows: int | Sequence[int],
    block: int = 256,
) -> tuple[torch.Tensor, torch.Tensor | list[torch.Tensor]]:
    """Causal attention over a prefill, plus the attention mass each key receives.

    query (batch, heads, q, head_dim); key/value (batch, kv_heads, S, head_dim), S >= q
    (the last q keys belong to the queries); key_valid (batch, S) bool.
    score_rows: the trailing query rows whose probabilities are summed (0..q); a list
    gives one mass per entry from the same pass (several scorers at once).
    Returns out (batch, q, heads, head_dim) and mass (batch, S) float32 (or a list):
    attention probabilities summed over the scoring rows that are not padding, averaged
    over heads.  Rows are processed ``block`` at a time; output and mass come from the
    same probabilities.
    """
    b, h, q, d = query.shape
    hkv, s = key.shape[1], key.shape[2]
    g = h // hkv
    several = not isinstance(score_rows, int)
    row_counts = [min(int(r), q) for r in (score_rows if several else [score_rows])]
    if q == s and bool(key_valid.all()) and _flash_ready(query):
        out, masses = _flash_with_scores(query, key, value, scaling, row_counts, block)
        return out, (masses if several else masses[0])
    qg = query.reshape(b, hkv, g, q, d)
    out = torch.empty(b, hkv, g, q, value.shape[-1], dtype=query.dtype, device=query.device)
    masses = [torch.zeros(b, s, dtype=torch.float32, device=query.device) for _ in row_counts]
    first_scored = q - max(row_counts)
    query_valid = key_valid[:, s - q :]

    if first_scored > 0:  # rows that only need their output: fused SDPA
        mask = causal_mask(q, key_valid)[:, :, :first_scored]
        mask = mask.unsqueeze(2)  # (b, 1, 1, rows, S) broadcast over kv heads and groups
        out[:, :, :, :first_scored] = F.scaled_dot_product_attention(
            qg[:, :, :, :first_scored], key.unsqueeze(2), value.unsqueeze(2), attn_mask=mask, scale=scaling
        )
    for start in range(first_scored, q, block):
        stop = min(start + block, q)
        rows = torch.arange(s - q + start, s - q + stop, device=query.device).view(-1, 1)
        cols = torch.arange(s, device=query.device).view(1, -1)
        allowed = (cols <= rows).unsqueeze(0) & key_valid[:, None, :]
        allowed = allowed | ((cols == rows).unsqueeze(0) & ~query_valid[:, start:stop, None])
        logits = torch.matmul(qg[:, :, :, start:stop].float(), key.float().unsqueeze(2).transpose(-1, -2)) * scaling
        logits = logits.masked_fill(~allowed[:, None, None], float("-inf"))
        probs = torch.softmax(logits, dim=-1)  # (b, hkv, g, rows, S)
        out[:, :, :, start:stop] = torch.matmul(probs.to(value.dtype), value.unsqueeze(2))
        summed = probs.sum(dim=(1, 2))  # (b, rows, S): summed over heads
        weight = query_valid[:, start:stop].to(probs.dtype)  # padded queries give nothing
        index = torch.arange(start, stop, device=query.device)
        for mass, count in zip(masses, row_counts):
            row_weight = weight * (index >= q - count).to(probs.dtype)
            mass += torch.einsum("brs,br->bs", summed, row_weight)
    masses = [mass / h for mass in masses]
    return out.reshape(b, h, q, -1).transpose(1, 2), (masses if several else masses[0])


def _flash_ready(query: torch.Tensor) -> bool:
    return query.device.type == "cpu" and query.dtype in (torch.float32, torch.bfloat16) and hasattr(
        torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def causal_flash(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float):
    """Causal attention of a prefill without padding (q == S) through PyTorch's fused CPU kernel.

    Returns out (batch, heads, q, head_dim) and the row log-sum-exp (batch, heads, q) float32.
    """
    g = query.shape[1] // key.shape[1]
    if g > 1:
        key, value = key.repeat_interleave(g, dim=1), value.repeat_interleave(g, dim=1)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, True, scale=scaling)
    return out, lse.float()


def _flash_with_scores(query, key, value, scaling, row_counts, block):
    """``attention_with_scores`` for an unpadded prefill: the output (and each row's
    log-sum-exp) from the fused kernel, then the probabilities of the scoring rows only, as
    exp(q.k x scaling - lse) from one matmul (-lse folded in as an extra dimension), one block
    of rows at a time against the keys they can see (columns < block end; the causal mask
    only on the diagonal sub-block).  About the cost of the fused attention again, instead
    of recomputing attention with a mask."""
    b, h, q, d = query.shape
    hkv = key.shape[1]
    g = h // hkv
    out, lse = causal_flash(query, key, value, scaling)
    masses = [torch.zeros(b, q, dtype=torch.float32, device=query.device) for _ in row_counts]
    first_scored = q - max(row_counts)
    block = max(1, min(block, 64))  # small blocks stay in cache; memory O(block x S)
    qa = torch.cat([query.reshape(b, hkv, g, q, d).float() * scaling, -lse.reshape(b, hkv, g, q, 1)], dim=-1)
    ka = torch.cat([key.float(), torch.ones_like(key[..., :1], dtype=torch.float32)], dim=-1).transpose(-1, -2)
    for start in range(first_scored, q, block):
        stop = min(start + block, q)
        rows = stop - start  # the group's query heads share one GEMM per KV head: (g x rows, d + 1) @ (d + 1, stop)
        grouped = qa[:, :, :, start:stop].reshape(b, hkv, g * rows, d + 1)
        probs = torch.matmul(grouped, ka[..., :stop]).view(b, hkv, g, rows, stop)  # logit - lse
        future = torch.ones(rows, rows, dtype=torch.bool, device=query.device).triu(1)
        probs[..., start:stop].masked_fill_(future, float("-inf"))
        per_row = probs.exp_().sum(dim=(1, 2))  # (b, rows, stop): summed over heads
        for mass, count in zip(masses, row_counts):
            first = max(q - count, start) - start
            if first < stop - start:
                mass[:, :stop] += per_row[:, first:].sum(1)
    return out.transpose(1, 2), [mass / h for mass in masses]


def decode_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_valid: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Attention of q new tokens over a compacted cache whose last q slots are those tokens.

    query (batch, heads, q, head_dim); key/value (batch, kv_heads, W, head_dim);
    key_valid (batch, W) bool.  Old slots are all in the past; new ones are causal.
    Returns (batch, q, heads, head_dim).  K/V are not repeated for GQA.
    """
    b, h, q, d = query.shape
    hkv = key.shape[1]
    if q == key.shape[2] and q > 1 and bool(key_valid.all()) and _flash_ready(query):  # an unpadded prefill
        return causal_flash(query, key, value, scaling)[0].transpose(1, 2)
    mask = causal_mask(q, key_valid).unsqueeze(2)
    out = F.scaled_dot_product_attention(
        query.reshape(b, hkv, h // hkv, q, d), key.unsqueeze(2), value.unsqueeze(2), attn_mask=mask, scale=scaling
    )
    return out.reshape(b, h, q, -1).transpose(1, 2)


__all__ = [
    "Scorer",
    "Accumulated",
    "Window",
    "LastQuery",
    "KeyNorm",
    "Recency",
    "SCORERS",
    "make_scorer",
    "attention_with_scores",
    "decode_attention",
    "causal_mask",
]
