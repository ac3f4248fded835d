"""The PrefixKV prefix search: one global cumulative-priority threshold, per-layer lengths.

Pure tensor math, no model and no I/O. Read top to bottom:

1. ``cumulative_priority``: per layer, sort importances (descending), normalise to
   sum 1 and take the cumulative sum (the layer's Lorenz-like "priority" curve).
2. ``prefix_search``: binary-search one threshold ``p`` in [0, 1]; layer ``l`` keeps the
   shortest prefix of its sorted list whose cumulative mass reaches ``p``.  Stop when
   the total kept matches the budget, then rescale the counts so the total is exact.
3. ``floor_and_blend``: optional bounds on the allocation (beyond the paper): a
   per-layer floor and a blend towards uniform lengths, keeping the mean exact.

Protected positions (the first ``sink`` tokens and the last token) are always kept;
they are counted in the returned counts but take no part in the curves.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def n_protected(positions: int, sink: int, protect_last: bool) -> int:
    """How many of ``positions`` entries are always kept (sinks, then the last token)."""
    sinks = min(sink, positions)
    return sinks + int(protect_last and positions > sinks)


def cumulative_priority(importance: torch.Tensor, sink: int = 0, protect_last: bool = False) -> torch.Tensor:
    """Per-layer cumulative priority curves of the unprotected entries.

    importance: (layers, positions) non-negative scores of one sample.
    Returns (layers, positions - n_protected) float64: sorted descending, normalised to
    sum 1 per layer, cumulated.  A layer whose unprotected mass is zero gets a uniform curve.
    """
    if importance.dim() != 2:
        raise ValueError(f"importance must be (layers, positions), got shape {tuple(importance.shape)}")
    scores = importance.detach().to(torch.float64).clamp_min(0)
    layers, positions = scores.shape
    first = min(sink, positions)
    last = positions - 1 if (protect_last and positions > first) else positions
    free = scores[:, first:last] if last > first else scores[:, :0]
    ordered = free.sort(dim=-1, descending=True).values
    total = ordered.sum(-1, keepdim=True)
    uniform = torch.full_like(ordered, 1.0 / max(ordered.shape[-1], 1))
    ordered = torch.where(total > 0, ordered / total.clamp_min(1e-300), uniform)
    return ordered.cumsum(-1)


def _counts_at(curves: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Shortest prefix of each curve reaching threshold p.  curves (L, M), p (F,) -> (F, L)."""
    layers, m = curves.shape
    if m == 0:
        return torch.zeros(p.numel(), layers, dtype=torch.long)
    # entries strictly below p, plus the one that reaches it; p == 0 keeps nothing
    below = (curves.unsqueeze(0) < p.view(-1, 1, 1) - 1e-12).sum(-1)
    return torch.where(p.view(-1, 1) > 0, (below + 1).clamp(max=m), torch.zeros_like(below))


def _exact_total(raw: torch.Tensor, target: int, low: int, high: int) -> torch.Tensor:
    """Integer counts in [low, high] closest to real ``raw`` with sum exactly ``target``
    (largest remainder, then redistribution of what the bounds clipped).  raw (L,) float64."""
    layers = raw.numel()
    target = max(low * layers, min(high * layers, target))
    counts = raw.floor().clamp(low, high).long()
    frac = (raw - raw.floor()).where((raw >= low) & (raw < high), torch.full_like(raw, -1.0))
    deficit = target - int(counts.sum())
    while deficit != 0:
        if deficit > 0:
            room = counts < high
            order = torch.argsort(torch.where(room, frac, torch.full_like(frac, -2.0)), descending=True, stable=True)
            take = order[: min(deficit, int(room.sum()))]
            counts[take] += 1
            frac[take] = -1.0
        else:
            room = counts > low
            order = torch.argsort(torch.where(room, frac, torch.full_like(frac, 2.0)), stable=True)
            take = order[: min(-deficit, int(room.sum()))]
            counts[take] -= 1
            frac[take] = 2.0
        new_deficit = target - int(counts.sum())
        if new_deficit == deficit:  # bounds make the target unreachable
            break
        deficit = new_deficit
    return counts


def prefix_search(
    importance: torch.Tensor,
    keep_fraction: float | Sequence[float] | torch.Tensor,
    sink: int = 4,
    protect_last: bool = True,
    iterations: int = 60,
) -> torch.Tensor:
    """Per-layer kept counts for one sample under a global keep fraction.

    importance: (layers, positions) float scores (attention mass received, per layer).
    keep_fraction: one fraction in (0, 1], or several.
    Returns LongTensor (layers,) for one fraction, (fractions, layers) for several.  Counts
    include the protected entries, are never fewer than them nor more than ``positions``,
    and sum to round(keep_fraction x layers x positions) whenever those bounds allow.
    """
    fractions = torch.as_tensor(keep_fraction, dtype=torch.float64).reshape(-1)
    single = not isinstance(keep_fraction, (Sequence, torch.Tensor)) or (
        isinstance(keep_fraction, torch.Tensor) and keep_fraction.dim() == 0
    )
    if fractions.numel() == 0 or bool(((fractions <= 0) | (fractions > 1)).any()):
        raise ValueError(f"keep fractions must be in (0, 1], got {fractions.tolist()}")
    layers, positions = importance.shape
    prot = n_protected(positions, sink, protect_last)
    curves = cumulative_priority(importance, sink, protect_last)
    free = curves.shape[-1]
    targets = torch.round(fractions * layers * positions).long()  # half-to-even, like Python's round
    free_targets = (targets - prot * layers).clamp(min=0)

    lo = torch.zeros_like(fractions)
    hi = torch.ones_like(fractions)
    for _ in range(iterations):  # vectorised over fractions; counts are monotone in p
        mid = (lo + hi) / 2
        total = _counts_at(curves, mid).sum(-1)
        hit = total == free_targets
        too_many = total > free_targets
        hi = torch.where(too_many | hit, mid, hi)
        lo = torch.where(too_many | hit, lo, mid)
    counts = _counts_at(curves, hi).double()  # (F, L), total >= target up to plateaus

    out = []
    for f in range(fractions.numel()):
        c, goal = counts[f], int(free_targets[f])
        raw = c * (goal / c.sum()) if c.sum() > 0 else torch.full_like(c, goal / layers)
        out.append(_exact_total(raw, goal, 0, free) + prot)
    result = torch.stack(out)
    return result[0] if single else result


# The calibration default for ``blend``, measured: the floor x blend sweep of
# `prefixkv bench quality --sweep-floor-blend` on SmolLM2-135M (calibration-split prompts,
# scorers accumulated / window / last-query, keep 0.1 and 0.2) ranked blend 0.5 first at every
# floor (README, "Quality").  blend=1.0 is the paper's allocation.
DEFAULT_BLEND = 0.5


def floor_and_blend(
    layer_fractions: torch.Tensor, keep_fraction: float, min_layer_keep: float = 0.0, blend: float = 1.0
) -> torch.Tensor:
    """Bound a per-layer allocation without changing its mean.

    layer_fractions: (layers,) fractions whose mean is ``keep_fraction``.
    blend: 1.0 = the allocation as given, 0.0 = uniform lengths; linear in between.
    min_layer_keep: every layer keeps at least ``min_layer_keep x keep_fraction``
    (a fraction of the uniform share); the excess is taken from layers above the floor
    in proportion to what they hold above it.  Returns (layers,) float64, each in
    [floor, 1], with mean ``keep_fraction``.
    """
    if not 0.0 <= blend <= 1.0:
        raise ValueError(f"blend must be in [0, 1], got {blend}")
    if not 0.0 <= min_layer_keep <= 1.0:
        raise ValueError(f"min_layer_keep must be in [0, 1] (a fraction of the uniform share), got {min_layer_keep}")
    x = layer_fractions.to(torch.float64)
    x = blend * x + (1.0 - blend) * keep_fraction
    floor = min_layer_keep * keep_fraction
    if floor <= 0:
        return x
    for _ in range(len(x) + 1):  # each pass pins at least one more layer at the floor
        low = x < floor - 1e-15
        if not bool(low.any()):
            break
        need = float((floor - x[low]).sum())
        above = x - floor
        above = torch.where(low, torch.zeros_like(above), above.clamp_min(0))
        x = torch.where(low, torch.full_like(x, floor), x - above * (need / float(above.sum())))
    return x


def curve_gini(curves: torch.Tensor) -> torch.Tensor:
    """Gini coefficient of cumulative priority curves sampled evenly from 0% to 100% of entries.

    curves: (layers, points), curves[:, 0] == 0 and curves[:, -1] == 1, descending order.
    0 when every entry holds the same mass, towards 1 when a few entries hold it all.
    """
    c = curves.to(torch.float64)
    area = torch.trapezoid(c, dx=1.0 / (c.shape[-1] - 1), dim=-1)
    return (2 * area - 1).clamp(0, 1)
