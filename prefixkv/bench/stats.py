"""Paired bootstrap confidence intervals for per-prompt comparisons (numpy only).

Two methods evaluated on the same prompts give paired figures: prompt ``i`` has a value
under method A and one under method B.  Resampling prompts (the same indices for both)
keeps the pairing, so the interval reflects how consistently A beats B prompt by prompt,
not the spread between prompts.

    cmp = paired_bootstrap(ppl_a, ppl_b)             # difference of means, A - B
    cmp = paired_bootstrap(np.c_[nll_a, tok], np.c_[nll_b, tok], statistic=pooled_ppl)
    cmp.diff, cmp.low, cmp.high                      # point estimate and 95% interval
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np


def mean(x: np.ndarray) -> float:
    """The mean of a 1-D sample (the default statistic)."""
    return float(np.mean(x))


def pooled_ppl(x: np.ndarray) -> float:
    """Perplexity pooled over tokens from rows of (summed NLL, token count)."""
    x = np.asarray(x, dtype=np.float64)
    return float(np.exp(x[:, 0].sum() / max(x[:, 1].sum(), 1.0)))


@dataclass(frozen=True)
class Interval:
    """A statistic with a percentile bootstrap interval."""

    value: float
    low: float
    high: float
    confidence: float
    resamples: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PairedComparison:
    """statistic(A) - statistic(B) over the same prompts, with its bootstrap interval.

    ``share_positive`` is the share of resamples whose difference is > 0 (a bootstrap
    view of how sure the sign is).  ``wins``/``losses``/``ties`` count prompts where
    A's own value is greater / smaller / equal to B's (for 1-D figures).
    """

    a: float
    b: float
    diff: float
    low: float
    high: float
    confidence: float
    resamples: int
    share_positive: float
    n: int
    wins: int | None = None
    losses: int | None = None
    ties: int | None = None

    @property
    def significant(self) -> bool:
        """The interval excludes zero."""
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict:
        return {**asdict(self), "significant": self.significant}


def _resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, size=(resamples, n))


def _percentiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def _check(confidence: float, resamples: int) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")


def bootstrap_ci(
    values, statistic: Callable[[np.ndarray], float] = mean, resamples: int = 2000,
    confidence: float = 0.95, seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of ``statistic`` over the rows of ``values``."""
    _check(confidence, resamples)
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        raise ValueError("bootstrap needs at least one value")
    idx = _resample_indices(len(x), resamples, seed)
    stats = np.array([statistic(x[i]) for i in idx])
    low, high = _percentiles(stats, confidence)
    return Interval(statistic(x), low, high, confidence, resamples)


def stratified_bootstrap_ci(
    groups, statistic: Callable[[list], float], resamples: int = 2000, confidence: float = 0.95, seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of ``statistic(groups)`` (a function of the list of the
    groups' 1-D arrays), each group resampled within itself, so that every resample keeps
    each group's size: a statistic that weighs the groups equally is not moved by resamples
    that hold more of one group."""
    _check(confidence, resamples)
    arrays = [np.asarray(g, dtype=np.float64) for g in groups]
    if not arrays or any(len(a) == 0 for a in arrays):
        raise ValueError("bootstrap needs at least one value in every group")
    indices = [_resample_indices(len(a), resamples, seed + k) for k, a in enumerate(arrays)]
    stats = np.array([statistic([a[i[r]] for a, i in zip(arrays, indices)]) for r in range(resamples)])
    low, high = _percentiles(stats, confidence)
    return Interval(statistic(arrays), low, high, confidence, resamples)


def paired_bootstrap(
    a, b, statistic: Callable[[np.ndarray], float] = mean, resamples: int = 2000,
    confidence: float = 0.95, seed: int = 0,
) -> PairedComparison:
    """statistic(a) - statistic(b) with a paired percentile bootstrap interval.

    a, b: per-prompt figures of the same prompts, shape (n,) or (n, k) (rows are
    resampled together, e.g. (summed NLL, tokens) with ``statistic=pooled_ppl``).
    """
    _check(confidence, resamples)
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired figures need the same shape, got {x.shape} and {y.shape}")
    n = len(x)
    if n == 0:
        raise ValueError("paired bootstrap needs at least one prompt")
    idx = _resample_indices(n, resamples, seed)
    diffs = np.array([statistic(x[i]) - statistic(y[i]) for i in idx])
    low, high = _percentiles(diffs, confidence)
    sa, sb = statistic(x), statistic(y)
    counts = {}
    if x.ndim == 1:
        counts = {"wins": int((x > y).sum()), "losses": int((x < y).sum()), "ties": int((x == y).sum())}
    return PairedComparison(
        a=sa, b=sb, diff=sa - sb, low=low, high=high, confidence=confidence, resamples=resamples,
        share_positive=float((diffs > 0).mean()), n=n, **counts,
    )
