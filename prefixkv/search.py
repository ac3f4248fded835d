"""The PrefixKV prefix search: one global cumulative-priority threshold, per-layer lengths.

Pure tensor math, no model and no I/O. Read top to bottom:

1. ``cumulative_priority``: per layer, sort importances (descending), normalise to
   sum 1 and take the cumulative sum (the layer's Lorenz-like "priority" curve).
   Two curves (``SEARCH_CURVES``):

   - ``"all"``, the released code's (THU-MIG/PrefixKV, ``obtain_cdf_num``): the curve spans
     all N positions, the protected ones (the first ``sink`` tokens and the last token)
     included.  A layer whose sinks hold much of its attention reaches a threshold with a
     short prefix, so it gets fewer entries.
   - ``"unprotected"``: the curve spans only the N - protected unprotected positions,
     renormalised to sum 1; the protected mass takes no part.

2. ``prefix_search``: bisect one threshold ``p`` in (0, 1); layer ``l`` keeps the shortest
   prefix of its sorted list whose cumulative mass reaches ``p``.

   - ``"all"``: the layer evicts ``max(N - prefix - protected, 0)``.  The bisection stops at
     the first ``p`` whose evicted total is within ``RELEASED_STOP`` (5) entries of the target
     ``(1 - keep) x L x N``, as the released code does; the evicted counts are then rescaled
     to that target.  The released code truncates the rescaled counts to integers; here they
     are rounded by largest remainder to the exact total instead (see ``prefix_search``).
   - ``"unprotected"``: the prefix is the number of unprotected entries kept; the bisection
     runs to the end, looking for a free total equal to the budget, and the counts are
     rescaled to the exact total.

3. ``floor_and_blend``: optional bounds on the allocation (beyond the paper): a
   per-layer floor and a blend towards uniform lengths, keeping the mean exact.

4. ``SearchSettings``: the curve, the protected entries, the floor and the blend, in one
   object; its defaults are the paper's (the released code's): curve "all", one sink, the
   last token, no floor, blend 1.  ``departures()`` names the settings that differ.

Protected positions are always kept and are counted in the returned counts under both curves.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .defaults import BLEND, CURVE, MIN_LAYER_KEEP, PROTECT_LAST, SINK, departures

SEARCH_CURVES = ("all", "unprotected")

# The released bisection stops once the evicted total is strictly within this many entries of the target.
RELEASED_STOP = 5


def _check_curve(curve: str) -> None:
    if curve not in SEARCH_CURVES:
        raise ValueError(f"curve must be one of {', '.join(SEARCH_CURVES)}, got {curve!r}")


def n_protected(positions: int, sink: int, protect_last: bool) -> int:
    """How many of ``positions`` entries are always kept (sinks, then the last token)."""
    sinks = min(sink, positions)
    return sinks + int(protect_last and positions > sinks)


def cumulative_priority(
    importance: torch.Tensor, sink: int = 0, protect_last: bool = False, curve: str = "unprotected"
) -> torch.Tensor:
    """Per-layer cumulative priority curves.

    importance: (layers, positions) non-negative scores of one sample.
    curve: ``"unprotected"`` (default) spans the entries left after the ``sink`` first and,
    with ``protect_last``, the last; ``"all"`` spans every position (``sink`` and
    ``protect_last`` are then ignored).
    Returns (layers, positions - n_protected) for "unprotected", (layers, positions) for "all",
    float64: sorted descending, normalised to sum 1 per layer, cumulated.  A layer whose mass
    is zero gets a uniform curve.
    """
    _check_curve(curve)
    if importance.dim() != 2:
        raise ValueError(f"importance must be (layers, positions), got shape {tuple(importance.shape)}")
    scores = importance.detach().to(torch.float64).clamp_min(0)
    layers, positions = scores.shape
    if curve == "all":
        free = scores
    else:
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


def _search_all(curves: torch.Tensor, fractions: torch.Tensor, prot: int, iterations: int) -> torch.Tensor:
    """The released rule on full curves (L, N).  Returns real-valued kept counts (F, L):
    ``N - evicted``, the evicted counts at the stopping threshold rescaled to the target."""
    layers, positions = curves.shape

    def evicted_at(p: torch.Tensor) -> torch.Tensor:  # (F,) -> (F, L)
        return (positions - _counts_at(curves, p) - prot).clamp(min=0).double()

    goal = (1.0 - fractions) * layers * positions  # evicted entries, not rounded (released)
    lo, hi = torch.zeros_like(fractions), torch.ones_like(fractions)
    p = torch.full_like(fractions, 0.5)
    done = torch.zeros_like(fractions, dtype=torch.bool)
    for _ in range(iterations):  # vectorised over fractions; each stops at its first close threshold
        mid = (lo + hi) / 2
        total = evicted_at(mid).sum(-1)
        p = torch.where(done, p, mid)
        done = done | ((total - goal).abs() < RELEASED_STOP)
        if bool(done.all()):
            break
        too_few = total < goal  # evict more: a lower threshold, a shorter prefix
        hi = torch.where(~done & too_few, mid, hi)
        lo = torch.where(~done & ~too_few, mid, lo)
    evicted = evicted_at(p)
    sums = evicted.sum(-1, keepdim=True)
    scaled = torch.where(sums > 0, evicted * (goal.view(-1, 1) / sums.clamp_min(1)), goal.view(-1, 1) / layers)
    return positions - scaled


def _search_unprotected(curves: torch.Tensor, free_targets: torch.Tensor, iterations: int) -> torch.Tensor:
    """Today's rule on the unprotected curves (L, M).  Returns real-valued free counts (F, L)
    at the smallest threshold whose free total reaches the target, rescaled to it."""
    layers = curves.shape[0]
    lo = torch.zeros(free_targets.numel(), dtype=torch.float64)
    hi = torch.ones_like(lo)
    for _ in range(iterations):  # vectorised over fractions; counts are monotone in p
        mid = (lo + hi) / 2
        total = _counts_at(curves, mid).sum(-1)
        hit = total == free_targets
        too_many = total > free_targets
        hi = torch.where(too_many | hit, mid, hi)
        lo = torch.where(too_many | hit, lo, mid)
    counts = _counts_at(curves, hi).double()  # (F, L), total >= target up to plateaus
    sums = counts.sum(-1, keepdim=True)
    goal = free_targets.double().view(-1, 1)
    return torch.where(sums > 0, counts * (goal / sums.clamp_min(1)), goal / layers)


def prefix_search(
    importance: torch.Tensor,
    keep_fraction: float | Sequence[float] | torch.Tensor,
    sink: int = SINK,
    protect_last: bool = PROTECT_LAST,
    iterations: int = 60,
    curve: str = CURVE,
) -> torch.Tensor:
    """Per-layer kept counts for one sample under a global keep fraction.

    importance: (layers, positions) float scores (attention mass received, per layer).
    keep_fraction: one fraction in (0, 1], or several.
    curve: ``"all"`` (the released code's rule, curves over every position) or
    ``"unprotected"`` (curves over the unprotected entries only); see the module docstring.
    Returns LongTensor (layers,) for one fraction, (fractions, layers) for several.  Counts
    include the protected entries, are never fewer than them nor more than ``positions``,
    and sum to round(keep_fraction x layers x positions) whenever those bounds allow.

    The total under ``"all"``: the released code truncates the rescaled evicted counts, so
    it keeps at least keep x L x N entries and fewer than L more (each layer's kept count is
    rounded up).  Here the rescaled real counts are rounded by largest remainder to the exact
    total above instead (``_exact_total``), so that a budget means the same under both curves
    and a profile's mean is the keep fraction; each layer is then the released count or one
    entry below it, except where the protected floor moves entries between layers.  Where no
    threshold gets within ``RELEASED_STOP`` of the target (tiny or flat inputs; the released
    loop would not end), the last of ``iterations`` bisection steps is used.
    """
    _check_curve(curve)
    fractions = torch.as_tensor(keep_fraction, dtype=torch.float64).reshape(-1)
    single = not isinstance(keep_fraction, (Sequence, torch.Tensor)) or (
        isinstance(keep_fraction, torch.Tensor) and keep_fraction.dim() == 0
    )
    if fractions.numel() == 0 or bool(((fractions <= 0) | (fractions > 1)).any()):
        raise ValueError(f"keep fractions must be in (0, 1], got {fractions.tolist()}")
    layers, positions = importance.shape
    prot = n_protected(positions, sink, protect_last)
    targets = torch.round(fractions * layers * positions).long()  # half-to-even, like Python's round

    if curve == "all":
        raw = _search_all(cumulative_priority(importance, curve="all"), fractions, prot, iterations)
        low, high, offset = prot, positions, 0
    else:
        curves = cumulative_priority(importance, sink, protect_last)
        targets = (targets - prot * layers).clamp(min=0)  # free entries beyond the protected ones
        raw = _search_unprotected(curves, targets, iterations)
        low, high, offset = 0, curves.shape[-1], prot

    result = torch.stack([_exact_total(raw[f], int(targets[f]), low, high) + offset for f in range(fractions.numel())])
    return result[0] if single else result


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


@dataclass(frozen=True)
class SearchSettings:
    """How the prefix search turns one sample's importances into per-layer keep fractions.

    The defaults are the paper's, as its released code runs them: the curve over all
    positions, one sink (``--start-size 1``), the last token kept, no floor, blend 1.
    """

    curve: str = CURVE
    sink: int = SINK
    protect_last: bool = PROTECT_LAST
    min_layer_keep: float = MIN_LAYER_KEEP
    blend: float = BLEND

    def __post_init__(self):
        _check_curve(self.curve)
        if isinstance(self.sink, bool) or not isinstance(self.sink, int) or self.sink < 0:
            raise ValueError(f"the sink must be a non-negative integer (first tokens always kept), got {self.sink!r}")
        if not isinstance(self.protect_last, bool):
            raise ValueError(f"protect_last must be true or false, got {self.protect_last!r}")
        for name in ("min_layer_keep", "blend"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 1:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")

    def fractions(self, importance: torch.Tensor, keep_fractions: Sequence[float]) -> torch.Tensor:
        """(fractions, layers) float64: the search's counts / positions, floored and blended;
        each row's mean is its keep fraction."""
        counts = prefix_search(importance, list(keep_fractions), sink=self.sink, protect_last=self.protect_last,
                               curve=self.curve)
        raw = counts.double() / importance.shape[-1]
        return torch.stack([floor_and_blend(raw[i], kf, self.min_layer_keep, self.blend)
                            for i, kf in enumerate(keep_fractions)])

    def departures(self) -> list[str]:
        """The settings that differ from the paper's, as ``name=value`` (empty: the paper's)."""
        return departures(self)


PAPER = SearchSettings()  # the paper's settings, as its released code runs them
