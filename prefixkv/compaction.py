"""Cache compaction ops: which entries a layer keeps after prefill, and the decode-phase rule.

These functions are the specification shared by the PyTorch reference cache, the
exported ONNX graphs and the fused kernels.  They use only tensor ops that
``torch.onnx.export`` lowers to plain ONNX (no Python branching on tensor values), and
work on a batch of left-padded rows.

Layout of one layer's compacted cache (batch of rows, ``W`` slots):
    keys, values: (batch, kv_heads, W, head_dim)
    positions:    (batch, W) int64, original token position of each slot, -1 for an empty slot
    valid:        (batch, W) bool
Valid slots are right-aligned and in original order; empty slots (rows that keep fewer
entries than the widest row) sit at the front, like left padding.
"""
from __future__ import annotations

import torch


def keep_counts(lengths: torch.Tensor, fraction: torch.Tensor | float, sink: int, protect_last: bool) -> torch.Tensor:
    """Entries a layer keeps for prompts of ``lengths`` tokens.

    lengths: (batch,) int64 real (unpadded) prompt lengths.
    fraction: scalar keep fraction of this layer (a graph constant when exported), or
    (layers,) fractions with lengths (batch, 1) for (batch, layers) counts.
    Returns (batch,) int64: floor(fraction x length + 0.5) in float32, clamped to
    [protected entries, length].
    """
    n = lengths.to(torch.float32)
    k = torch.floor(torch.as_tensor(fraction, dtype=torch.float32) * n + 0.5).to(torch.int64)
    sinks = torch.clamp(lengths, max=sink)
    protected = sinks + ((lengths > sinks) & protect_last).to(torch.int64)
    return torch.maximum(torch.minimum(k, lengths), protected)


def protect(scores: torch.Tensor, valid: torch.Tensor, sink: int, protect_last: bool) -> torch.Tensor:
    """Scores with protected entries at +inf and padding at -inf.

    scores: (batch, S) float; valid: (batch, S) bool, left padding (False at the front).
    The first ``sink`` real tokens and (if ``protect_last``) the last position are protected.
    """
    rank = torch.cumsum(valid.to(torch.int64), dim=-1) - 1
    is_sink = valid & (rank < sink)
    is_last = torch.zeros_like(valid)
    if protect_last:
        is_last = torch.cat([torch.zeros_like(valid[:, :-1]), valid[:, -1:]], dim=-1)
    inf = torch.full_like(scores, float("inf"))
    out = torch.where(is_sink | is_last, inf, scores.to(inf.dtype))
    return torch.where(valid, out, -inf)


def select(
    scores: torch.Tensor, valid: torch.Tensor, counts: torch.Tensor, width: int | torch.Tensor, stable: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the kept entries, in original order, right-aligned.

    scores: (batch, S) protected scores (see ``protect``); counts: (batch,) entries per row;
    width: max(counts) (the layer's slot count).
    ``stable=True`` breaks exact ties towards the lower index (what ONNX TopK does);
    ``stable=False`` uses ``torch.topk`` (the op that exports to TopK).
    Returns index (batch, width) int64 into S, and kept (batch, width) bool.
    """
    if stable:
        top = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :width]
    else:
        top = torch.topk(scores, width, dim=-1, largest=True, sorted=True).indices
    rank = torch.arange(top.shape[-1], device=scores.device).unsqueeze(0)
    kept = rank < counts.unsqueeze(-1)
    seq = scores.shape[-1]
    order = torch.argsort(torch.where(kept, top, top - seq), dim=-1)
    return torch.gather(top, -1, order), torch.gather(kept, -1, order)


def gather_kv(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """states (batch, kv_heads, S, head_dim) gathered at index (batch, W) -> (batch, kv_heads, W, head_dim)."""
    b, h, _, d = states.shape
    idx = index.expand(b, -1)[:, None, :, None].expand(b, h, index.shape[-1], d)
    return torch.gather(states, 2, idx)


def compact(
    keys: torch.Tensor,
    values: torch.Tensor,
    scores: torch.Tensor,
    valid: torch.Tensor,
    fraction: torch.Tensor | float,
    sink: int,
    protect_last: bool = True,
    stable: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's prefill compaction.

    keys/values (batch, kv_heads, S, head_dim); scores (batch, S); valid (batch, S) bool.
    Returns keys, values (batch, kv_heads, W, head_dim), positions (batch, W) int64 original
    positions (-1 for empty slots) and kept (batch, W) bool, W = max over rows of the count.
    """
    lengths = valid.sum(-1)
    counts = keep_counts(lengths, fraction, sink, protect_last)
    width = counts.max()
    index, kept = select(protect(scores, valid, sink, protect_last), valid, counts, width, stable)
    original = torch.cumsum(valid.to(torch.int64), dim=-1) - 1
    positions = torch.where(kept, torch.gather(original, -1, index), torch.full_like(index, -1))
    return gather_kv(keys, index), gather_kv(values, index), positions, kept


def decode_budget(
    prompt_lengths: torch.Tensor,
    seen: torch.Tensor,
    fraction: torch.Tensor | float,
    sink: int,
    protect_last: bool,
    distance: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode-phase rule's two numbers per row.

    prompt_lengths: (batch,) real prompt lengths; seen: (batch,) tokens seen so far,
    the new one included.  Returns (cap, slot): the layer may hold ``cap`` entries, and
    when over it evicts the valid entry of rank ``slot`` (0-based, in original order):
    ``distance`` entries before the end of the compacted prompt, never a sink.
    Every layer at once: prompt_lengths and seen (batch, 1), fraction (layers,) ->
    cap and slot (batch, layers), the same numbers.
    """
    prompt_kept = keep_counts(prompt_lengths, fraction, sink, protect_last)
    cap = torch.maximum(prompt_kept, keep_counts(seen, fraction, sink, protect_last))
    slot = torch.clamp(prompt_kept - distance, min=0)
    slot = torch.maximum(slot, torch.clamp(prompt_lengths, max=sink))
    return cap, slot


def append(keys, values, positions, valid, new_keys, new_values, new_positions):
    """Append q new tokens per row: new_keys/new_values (batch, kv_heads, q, head_dim), new_positions (batch, q)."""
    return (
        torch.cat([keys, new_keys], dim=2),
        torch.cat([values, new_values], dim=2),
        torch.cat([positions, new_positions.to(positions.dtype)], dim=-1),
        torch.cat([valid, torch.ones_like(new_positions, dtype=torch.bool)], dim=-1),
    )


def evict(
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    cap: torch.Tensor,
    slot: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """In rows holding more than ``cap`` valid entries, evict the valid entry of rank ``slot``.

    keys/values (batch, kv_heads, W, head_dim); positions/valid (batch, W); cap, slot (batch,).
    A row that evicts shifts its entries before the evicted one right by one slot and
    leaves an empty slot at the front; leading columns empty in every row are dropped.
    Returns the four tensors with W' <= W slots.
    """
    over, hit = _evicted(valid, cap, slot)
    column = torch.argmax(hit.to(torch.int64), dim=-1)  # column of the evicted entry
    cols = torch.arange(valid.shape[-1], device=valid.device).unsqueeze(0)
    shift = over.unsqueeze(-1) & (cols <= column.unsqueeze(-1))
    source = torch.clamp(cols - shift.to(torch.int64), min=0)
    empty_front = shift & (cols == 0)

    valid = torch.gather(valid, -1, source) & ~empty_front
    positions = torch.where(valid, torch.gather(positions, -1, source), torch.full_like(positions, -1))
    keys = gather_kv(keys, source)
    values = gather_kv(values, source)

    # leading columns empty in every row are dropped: a slice from a data-dependent start,
    # written with an unbacked int so torch.export can trace it (the decode graph uses this)
    width = valid.shape[-1]
    first = torch.min(torch.argmax(valid.to(torch.int64), dim=-1)).item()
    torch._check(first >= 0)
    torch._check(first < width)
    keep = width - first
    return keys.narrow(2, first, keep), values.narrow(2, first, keep), positions.narrow(1, first, keep), valid.narrow(1, first, keep)


def _evicted(valid: torch.Tensor, cap: torch.Tensor, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(over (batch,), hit (batch, W)): rows holding more than ``cap`` valid entries, and the
    column of each row's valid entry of rank ``slot`` (the one ``evict`` removes when over)."""
    over = valid.sum(-1) > cap
    rank = torch.cumsum(valid.to(torch.int64), dim=-1) - 1
    return over, valid & (rank == slot.unsqueeze(-1))


def evict_in_place(positions: torch.Tensor, valid: torch.Tensor, cap: torch.Tensor, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``evict`` for a cache whose slots never move: the evicted entry's slot is marked empty
    (position -1, not valid) instead of shifting the entries before it.

    positions/valid (batch, W) in original order with empty slots anywhere; cap, slot (batch,)
    or (batch, 1).
    Keeps the same entries as ``evict``; the K/V tensors are not touched (the decode graph's
    fixed-capacity buffers), so a step costs no copy of the cache.
    """
    # the rank to evict in rows over their cap, -1 (no valid entry's rank) in the others: the
    # same entries as ``_evicted``'s, in fewer ops (each one a kernel launch per layer per step)
    if cap.dim() == 1:
        cap, slot = cap[:, None], slot[:, None]
    target = torch.where(valid.sum(-1, keepdim=True) > cap, slot, -1)  # (batch, 1)
    rank = torch.cumsum(valid.to(torch.int64), dim=-1) - 1
    valid = valid & (rank != target)
    return torch.where(valid, positions, -1), valid


def segments(widths: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """widths (L,) int64, each >= 1, summing to N; columns: any (N,) tensor -> (N,) int64: the
    segment each column of L side-by-side segments belongs to (0 for the first ``widths[0]``
    columns, ...).  The zeros come from ``columns`` by an elementwise op, not from a size:
    an exported graph would compute N from every layer's shape."""
    starts = torch.cumsum(widths, 0)[:-1]  # where segments 1 .. L-1 begin
    marks = (columns.to(torch.int64) * 0).scatter_add(0, starts, torch.ones_like(starts))
    return torch.cumsum(marks, 0)


def evict_in_place_layers(positions: torch.Tensor, valid: torch.Tensor, widths: torch.Tensor, cap: torch.Tensor,
                          slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``evict_in_place`` for every layer at once, their slots side by side.

    positions/valid (batch, N): layer l's slots are columns [sum(widths[:l]), sum(widths[:l + 1]));
    widths (L,) int64, each >= 1, summing to N; cap, slot (batch, L).  Returns positions and
    valid (batch, N), each layer's part what ``evict_in_place`` returns for it.  One set of
    ops for all layers (a decode step's graph would otherwise run them once per layer): a
    running count over all the slots, less the entries of the layers before, is each entry's
    rank in its own layer.
    """
    b = valid.shape[0]
    held = torch.cumsum(valid.to(torch.int64), dim=-1)  # entries up to and including each slot
    ends = (torch.cumsum(widths, 0) - 1).unsqueeze(0).expand(b, -1)  # (batch, L): each layer's last column
    through = torch.gather(held, -1, ends)  # entries up to each layer's end
    before = torch.cat([torch.zeros_like(through[:, :1]), through[:, :-1]], dim=-1)  # in the layers before
    # the running rank to evict in layers over their cap, -1 (no entry's rank) in the others
    target = torch.where(through - before > cap, before + slot, -1)
    per_slot = torch.gather(target, -1, segments(widths, valid[0]).unsqueeze(0).expand(b, -1))
    valid = valid & (held - 1 != per_slot)
    return torch.where(valid, positions, -1), valid


def append_and_evict(keys, values, positions, valid, new_keys, new_values, new_positions, cap, slot):
    """One decode step of one layer: append one token per row (new_* with q == 1), then ``evict``.

    The cache returned is within budget: the graph form of the decode-phase rule.
    """
    state = append(keys, values, positions, valid, new_keys, new_values, new_positions)
    return evict(*state, cap, slot)
