"""Offline calibration: run prompts, search each one, average the per-layer keep fractions.

For every sample: one prefill records each scorer's importance (all scorers from the
same attention pass), the prefix search gives per-layer kept counts for every keep
fraction, the optional floor and blend bound them, and counts / prompt length become
that sample's per-layer keep fractions.  The profile holds their mean and spread, and
the ``SearchSettings`` that made them (the paper's by default).

The other allocation rule, ``sensitivity``, calibrates in ``prefixkv.sensitivity``.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from . import __version__
from .cache import PrefixKVCache, cache_argument
from .data import samples_hash
from .profile import Fingerprint, LayerKeep, RetentionProfile
from .scoring import Scorer, make_scorer
from .search import PAPER, SearchSettings, cumulative_priority, curve_gini


@dataclass
class Calibration:
    """Everything one calibration run measured: profiles per scorer plus per-layer curves."""

    profiles: dict[str, RetentionProfile]
    # scorer key -> (layers, 101) mean cumulative priority curve sampled at 0..100% of entries
    curves: dict[str, torch.Tensor] = field(default_factory=dict)
    gini: dict[str, list[float]] = field(default_factory=dict)


@torch.no_grad()
def score_sample(model, token_ids: Sequence[int], scorers: Sequence[Scorer], score_block: int = 256) -> dict[str, torch.Tensor]:
    """Importance of one prompt under each scorer: key -> (layers, S) float32."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(token_ids)], dtype=torch.long, device=device)
    cache = PrefixKVCache(method="full", keep_fraction=1.0, record=scorers, score_block=score_block)
    model(input_ids=ids, attention_mask=torch.ones_like(ids), **cache_argument(model, cache), use_cache=True, logits_to_keep=1)
    return {k: v[:, 0].float().cpu() for k, v in cache.recorded_scores().items()}


def calibrate(
    model,
    samples: Sequence[Sequence[int]],
    keep_fractions: Sequence[float],
    scorers: Sequence[str | Scorer] = ("accumulated",),
    search: SearchSettings = PAPER,
    progress: bool = True,
    seed: int = 0,
    data_name: str = "custom",
) -> Calibration:
    """Calibrate one profile per scorer in a single pass over ``samples`` (token-id lists)."""
    keep_fractions = sorted({float(k) for k in keep_fractions})
    if not keep_fractions or any(not 0 < k <= 1 for k in keep_fractions):
        raise ValueError(f"keep fractions must be in (0, 1], got {keep_fractions}")
    if not samples:
        raise ValueError("calibration needs at least one sample")
    scorers = [make_scorer(s) for s in scorers]
    fingerprint = Fingerprint.of(model.config)
    per_sample: dict[str, list[torch.Tensor]] = {sc.key: [] for sc in scorers}  # (F, L) each
    curves: dict[str, list[torch.Tensor]] = {sc.key: [] for sc in scorers}
    started = time.time()
    iterator = samples
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(samples, desc="calibrating", unit="sample")
    for ids in iterator:
        if len(ids) < 2:
            raise ValueError("every calibration sample needs at least 2 tokens")
        scores = score_sample(model, ids, scorers)
        for sc in scorers:
            imp = scores[sc.key]
            per_sample[sc.key].append(search.fractions(imp, keep_fractions))
            curves[sc.key].append(_resample_curves(imp, search))

    result = Calibration(profiles={})
    for sc in scorers:
        calibrated = average(per_sample[sc.key], keep_fractions)
        curve = torch.stack(curves[sc.key]).mean(0)
        result.curves[sc.key] = curve
        result.gini[sc.key] = [round(float(g), 4) for g in curve_gini(curve)]
        result.profiles[sc.key] = RetentionProfile(
            fingerprint=fingerprint,
            sink=search.sink,
            protect_last=search.protect_last,
            calibrated=calibrated,
            scorer=sc.name,
            scorer_params=dict(sc.params),
            min_layer_keep=search.min_layer_keep,
            blend=search.blend,
            curve=search.curve,
            calibration={**calibration_record(samples, data_name, seed, started), "gini": result.gini[sc.key]},
        )
    return result



def calibration_record(samples: Sequence[Sequence[int]], data_name: str, seed: int, started: float) -> dict:
    """A profile's ``calibration`` entry: the data it came from, the tools, when and how long."""
    lengths = [len(ids) for ids in samples]
    return {
        "samples": len(samples),
        "tokens": {"min": min(lengths), "mean": round(sum(lengths) / len(lengths), 1), "max": max(lengths)},
        "data": data_name,
        "data_hash": samples_hash(samples),
        "seed": seed,
        "tool": f"prefixkv {__version__}",
        "torch": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.time() - started, 1),
    }


def average(per_sample: Sequence[torch.Tensor], keep_fractions: Sequence[float]) -> dict[float, LayerKeep]:
    """The profile's entries from per-sample (fractions, layers) keep fractions: their mean,
    rescaled so each layer list's mean is exactly its keep fraction, and their spread."""
    stacked = torch.stack(list(per_sample))  # (samples, F, L)
    mean, std = stacked.mean(0), stacked.std(0, unbiased=False)
    out = {}
    for i, kf in enumerate(keep_fractions):
        layer_f = (mean[i] * (kf / mean[i].mean())).clamp(max=1.0)  # exact mean after averaging
        out[kf] = LayerKeep([float(x) for x in layer_f], [float(x) for x in std[i]])
    return out

def calibrate_profile(model, samples, keep_fractions, scorer: str | Scorer = "accumulated",
                      scorer_params: dict | None = None, search: SearchSettings = PAPER,
                      progress: bool = True, **kwargs) -> RetentionProfile:
    """One scorer's profile (see ``calibrate``)."""
    sc = make_scorer(scorer, **(scorer_params or {}))
    run = calibrate(model, samples, keep_fractions, [sc], search=search, progress=progress, **kwargs)
    return run.profiles[sc.key]


def _resample_curves(importance: torch.Tensor, search: SearchSettings, points: int = 101) -> torch.Tensor:
    """(layers, S) -> (layers, points): cumulative priority (the search's curve) at evenly
    spaced shares of entries."""
    curve = cumulative_priority(importance, search.sink, search.protect_last, curve=search.curve)
    m = curve.shape[-1]
    if m == 0:
        return torch.zeros(curve.shape[0], points, dtype=torch.float64)
    padded = torch.cat([torch.zeros(curve.shape[0], 1, dtype=curve.dtype), curve], dim=-1)  # share 0 -> 0
    share = torch.linspace(0, 1, points, dtype=torch.float64) * m
    lo = share.floor().long().clamp(max=m)
    hi = (lo + 1).clamp(max=m)
    w = share - lo.double()
    return padded[:, lo] * (1 - w) + padded[:, hi] * w

