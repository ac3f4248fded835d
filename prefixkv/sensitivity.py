"""The ``sensitivity`` allocation rule (beyond the paper): per-layer lengths from measured harm.

PrefixKV's prefix search gives a layer the entries that hold a share of its attention
mass.  This rule gives a layer the entries whose loss would hurt the output most:

1. ``measure_harm``: for each tuning prompt, one full-cache prefill records the scorer;
   then, for each layer ``l`` and each fraction ``f`` of ``GRID``, a fork of that prefill in
   which only layer ``l`` is compressed to ``f`` (every other layer keeps everything) is
   teacher-forced over the prompt's continuation (its tokens in one forward).  The harm is the KL divergence of the
   fork's next-token distributions from the full cache's, averaged over the continuation
   tokens.  -> harm (samples, layers, grid), with harm 0 at fraction 1.
2. ``allocate``: per layer, harm against fraction is made non-increasing and replaced by
   its lower convex hull, so each hull segment has a marginal harm (harm saved per unit of
   fraction) that falls as the fraction grows.  One global threshold on that marginal harm
   decides every layer at once: a layer takes each segment worth more than the threshold.
   The threshold is where the layers' fractions average to the keep fraction; sorting the
   segments by marginal harm finds it exactly (what a bisection on it converges to), and
   the segment it falls in is taken in part.

The harm of compressing several layers is assumed to add up; ``prefixkv eval`` measures
whether the result beats uniform lengths.  ``calibrate_sensitivity`` puts the two together
into a profile (``rule`` "sensitivity").  No files here.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from .cache import cache_argument
from .calibration import Calibration, calibration_record
from .evaluation import fork, prefill
from .policies import Allocation, Method
from .profile import Fingerprint, LayerKeep, RetentionProfile
from .scoring import Scorer, make_scorer
from .search import PAPER, SearchSettings

GRID = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75)   # fractions each layer is measured at (1.0: no harm)
CONTINUATION = 16                         # continuation tokens per tuning prompt (its last ones)


# -- 2. the allocation (pure math) -------------------------------------------------------------
def _hull(fractions: list[float], harm: list[float]) -> list[tuple[float, float]]:
    """The lower convex hull of points (fraction, harm), left to right, harm non-increasing."""
    points = list(zip(fractions, harm))
    for i in range(len(points) - 2, -1, -1):  # more entries never hurt more: non-increasing
        points[i] = (points[i][0], max(points[i][1], points[i + 1][1]))
    hull: list[tuple[float, float]] = []
    for p in points:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):  # hull[-1] on or above the chord
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def allocate(harm: torch.Tensor, keep_fraction: float, grid: Sequence[float] = GRID) -> torch.Tensor:
    """Per-layer keep fractions (layers,) float64 with mean ``keep_fraction``, from harm
    (layers, len(grid)) measured at the ``grid`` fractions (harm at fraction 1 is 0).

    Every layer gets at least ``min(grid)``; a keep fraction below it is refused."""
    grid = [float(g) for g in grid]
    if sorted(grid) != grid or len(set(grid)) != len(grid) or not grid or grid[0] <= 0 or grid[-1] >= 1:
        raise ValueError(f"the grid must be increasing fractions in (0, 1), got {grid}")
    harm = torch.as_tensor(harm, dtype=torch.float64)
    if harm.dim() != 2 or harm.shape[1] != len(grid):
        raise ValueError(f"harm must be (layers, {len(grid)}), got shape {tuple(harm.shape)}")
    if not bool(torch.isfinite(harm).all()) or bool((harm < 0).any()):
        raise ValueError("harm must be finite and non-negative")
    if not grid[0] <= keep_fraction <= 1:
        raise ValueError(f"keep fraction {keep_fraction:g} is outside [{grid[0]:g}, 1], the fractions the harm was measured over")
    layers = harm.shape[0]
    segments = []  # (marginal harm, layer, length)
    for l in range(layers):
        hull = _hull(grid + [1.0], [float(h) for h in harm[l]] + [0.0])
        for (x1, y1), (x2, y2) in zip(hull, hull[1:]):
            segments.append(((y1 - y2) / (x2 - x1), l, x2 - x1))
    fractions = torch.full((layers,), grid[0], dtype=torch.float64)
    budget = keep_fraction * layers - grid[0] * layers
    # worth most first; within a tie, lower layers first (a layer's own segments stay in order)
    for _, l, length in sorted(segments, key=lambda s: (-s[0], s[1])):
        if budget <= 0:
            break
        take = min(length, budget)
        fractions[l] += take
        budget -= take
    return fractions.clamp(max=1.0)


# -- 1. the measurement (a model, no files) -----------------------------------------------------
class _OneLayer(Allocation):
    """Every layer keeps everything except ``layer``, which keeps ``fraction``."""

    name = "one-layer"

    def __init__(self, layer: int, fraction: float):
        self.layer, self.fraction = layer, fraction

    def fractions(self, keep_fraction, layers, scores=None, valid=None, sink=None, protect_last=None):
        out = torch.ones(layers, dtype=torch.float64)
        out[self.layer] = self.fraction
        return out


def _continuation_logits(model, cache, mask, continuation: torch.Tensor) -> torch.Tensor:
    """Logits (batch, q - 1, vocab) float32 of the continuation's tokens 2..q, fed in one
    forward after the prompt: causal among themselves, over the layer's kept entries."""
    fed = continuation[:, :-1]
    mask = torch.cat([mask, torch.ones_like(fed)], dim=-1)
    positions = cache.seen.view(-1, 1) + torch.arange(fed.shape[1], device=fed.device)
    out = model(input_ids=fed, attention_mask=mask, position_ids=positions, **cache_argument(model, cache), use_cache=True)
    return out.logits.float()


@torch.no_grad()
def measure_harm(model, samples: Sequence[Sequence[int]], scorer: Scorer, sink: int, protect_last: bool,
                 grid: Sequence[float] = GRID, continuation: int = CONTINUATION, batch_size: int = 4,
                 pad_id: int = 0, progress: bool = True) -> torch.Tensor:
    """Harm (samples, layers, len(grid)): mean KL(full || only that layer compressed) of the
    next-token distributions of each sample's last ``continuation`` tokens after a prefill
    of the rest.  The continuation is fed in one forward (teacher forcing), so a layer's
    decode-phase evictions during those few tokens (a fraction of one entry per token) are
    not applied; the first continuation token is predicted by the full prefill in every
    fork and is left out."""
    if continuation < 2:
        raise ValueError(f"the continuation needs at least 2 tokens, got {continuation}")
    short = [i for i, s in enumerate(samples) if len(s) < continuation + 2]
    if short:
        raise ValueError(f"sample {short[0]} has {len(samples[short[0]])} tokens; sensitivity needs at least "
                         f"{continuation + 2} (a prompt of 2 and {continuation} continuation tokens)")
    grid = [float(g) for g in grid]
    batches = [list(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]
    out = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        layers = getattr(getattr(model.config, "get_text_config", lambda: model.config)(), "num_hidden_layers", None)
        bar = tqdm(total=len(batches) * (layers or 1) * len(grid), desc="sensitivity", unit="fork")
    device = next(model.parameters()).device
    for rows in batches:
        prompts = [list(r[:-continuation]) for r in rows]
        ref = torch.tensor([list(r[-continuation:]) for r in rows], dtype=torch.long, device=device)
        base, _, mask = prefill(model, prompts, [scorer], pad_id)
        full = fork(base, Method("full", scorer, _OneLayer(0, 1.0), compresses=False), 1.0)
        want = torch.log_softmax(_continuation_logits(model, full, mask, ref), -1)
        harm = torch.zeros(len(rows), len(base.layers), len(grid), dtype=torch.float64)
        for l in range(len(base.layers)):
            for j, f in enumerate(grid):
                method = Method("sensitivity", scorer, _OneLayer(l, f), sink=sink)
                cache = fork(base, method, f, sink=sink, protect_last=protect_last)
                got = torch.log_softmax(_continuation_logits(model, cache, mask, ref), -1)
                kl = (want.exp() * (want - got)).sum(-1)  # (batch, q - 1)
                harm[:, l, j] = kl.double().mean(-1).clamp_min(0)
                if bar is not None:
                    bar.update(1)
        out.append(harm)
    if bar is not None:
        bar.close()
    return torch.cat(out)


# -- 1 + 2: a profile -----------------------------------------------------------------------------
def calibrate_sensitivity(
    model,
    samples: Sequence[Sequence[int]],
    keep_fractions: Sequence[float],
    scorer: str | Scorer = "accumulated",
    search: SearchSettings = PAPER,
    grid: Sequence[float] = GRID,
    continuation: int = CONTINUATION,
    pad_id: int = 0,
    progress: bool = True,
    seed: int = 0,
    data_name: str = "custom",
) -> Calibration:
    """A ``sensitivity`` profile (``prefixkv.sensitivity``): the harm of compressing each layer
    alone, measured once on ``samples`` (their last ``continuation`` tokens teacher-forced),
    then allocated at every keep fraction.  The spread is that of the samples' own allocations.
    The search's sink and last-token protection apply; its curve, floor and blend do not."""
    keep_fractions = sorted({float(k) for k in keep_fractions})
    if not keep_fractions or any(not 0 < k <= 1 for k in keep_fractions):
        raise ValueError(f"keep fractions must be in (0, 1], got {keep_fractions}")
    if not samples:
        raise ValueError("calibration needs at least one sample")
    low = [k for k in keep_fractions if k < min(grid)]
    if low:
        raise ValueError(f"the sensitivity rule measures fractions from {min(grid):g}; keep fraction {low[0]:g} is below it")
    sc = make_scorer(scorer) if isinstance(scorer, str) else scorer
    started = time.time()
    harm = measure_harm(model, samples, sc, search.sink, search.protect_last, grid, continuation, pad_id=pad_id,
                        progress=progress)  # (samples, layers, grid)
    mean = harm.mean(0)
    calibrated = {}
    for kf in keep_fractions:
        per_sample = torch.stack([allocate(h, kf, grid) for h in harm])
        calibrated[kf] = LayerKeep([float(x) for x in allocate(mean, kf, grid)],
                                   [float(x) for x in per_sample.std(0, unbiased=False)])
    profile = RetentionProfile(
        fingerprint=Fingerprint.of(model.config), sink=search.sink, protect_last=search.protect_last,
        calibrated=calibrated, scorer=sc.name, scorer_params=dict(sc.params), rule="sensitivity",
        calibration={
            **calibration_record(samples, data_name, seed, started),
            "sensitivity": {
                "metric": "KL(full cache || only this layer compressed), next-token distributions, mean over the continuation",
                "continuation_tokens": continuation,
                "grid": list(grid),
                "harm": [[round(float(x), 6) for x in row] for row in mean],
            },
        },
    )
    return Calibration(profiles={sc.key: profile})
