"""prefixkv.bench.stats on constructed data with hand-computed answers."""
from __future__ import annotations

import math

import numpy as np
import pytest

from prefixkv.bench.stats import bootstrap_ci, paired_bootstrap, pooled_ppl


def test_constant_difference_has_a_zero_width_interval():
    rng = np.random.default_rng(3)
    b = rng.normal(10, 5, size=30)
    cmp = paired_bootstrap(b + 1.5, b)
    assert cmp.diff == pytest.approx(1.5)
    assert cmp.low == pytest.approx(1.5) and cmp.high == pytest.approx(1.5)
    assert cmp.share_positive == 1.0 and cmp.significant
    assert (cmp.wins, cmp.losses, cmp.ties) == (30, 0, 0)


def test_two_point_bootstrap_distribution_by_hand():
    """Values {0, 1}: resampled means are 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4,
    so the 95% percentile interval is [0, 1] and about half the resamples exceed 0.5."""
    ci = bootstrap_ci([0.0, 1.0], resamples=4000, seed=1)
    assert ci.value == 0.5
    assert (ci.low, ci.high) == (0.0, 1.0)
    cmp = paired_bootstrap([1.0, 0.0], [0.0, 0.0], resamples=4000, seed=1)  # differences {1, 0}
    assert cmp.diff == 0.5 and (cmp.low, cmp.high) == (0.0, 1.0)
    assert cmp.share_positive == pytest.approx(0.75, abs=0.03)  # only the resample (0, 0) has mean 0
    assert not cmp.significant


def test_pairing_removes_between_prompt_spread():
    """Prompts differ a lot, the methods differ little but consistently: the paired interval excludes 0."""
    rng = np.random.default_rng(0)
    base = rng.lognormal(2, 1, size=40)
    a = base + 0.2 + rng.normal(0, 0.05, size=40)
    cmp = paired_bootstrap(a, base)
    assert cmp.low > 0.1 and cmp.high < 0.3
    unpaired_a = bootstrap_ci(a)
    assert unpaired_a.high - unpaired_a.low > 10 * (cmp.high - cmp.low)


def test_interval_covers_the_true_mean_and_is_seeded():
    rng = np.random.default_rng(7)
    x = rng.normal(3.0, 1.0, size=400)
    ci = bootstrap_ci(x, confidence=0.99)
    assert ci.low < 3.0 < ci.high
    assert ci.high - ci.low == pytest.approx(2 * 2.576 / math.sqrt(400), rel=0.2)  # normal theory
    assert bootstrap_ci(x, seed=5) == bootstrap_ci(x, seed=5)


def test_pooled_ppl_rows_are_resampled_together():
    # (summed NLL, tokens): pooled PPL is exp(total NLL / total tokens)
    a = np.array([[2.0, 1], [6.0, 3]])
    assert pooled_ppl(a) == pytest.approx(math.exp(8 / 4))
    b = np.array([[1.0, 1], [3.0, 3]])
    cmp = paired_bootstrap(a, b, statistic=pooled_ppl, resamples=500)
    assert cmp.diff == pytest.approx(math.exp(2) - math.exp(1))
    assert cmp.low == pytest.approx(cmp.diff) and cmp.high == pytest.approx(cmp.diff)  # every row: 2 vs 1 nats/token
    assert cmp.wins is None  # per-row wins only for 1-D figures


def test_bad_input():
    with pytest.raises(ValueError):
        paired_bootstrap([1, 2], [1, 2, 3])
    with pytest.raises(ValueError):
        bootstrap_ci([])
    with pytest.raises(ValueError):
        bootstrap_ci([1.0], confidence=1.5)


def test_strata_are_resampled_within_themselves_by_hand():
    """The mean of two groups' means, {1, 3} resampled in pairs (means 1, 2, 3 with
    probabilities 1/4, 1/2, 1/4) and {10}: 5.5, 6 or 6.5, never a resample of one group."""
    from prefixkv.bench.stats import stratified_bootstrap_ci

    got = stratified_bootstrap_ci([[1.0, 3.0], [10.0]], lambda groups: float(np.mean([g.mean() for g in groups])))
    assert (got.value, got.low, got.high) == (pytest.approx(6.0), pytest.approx(5.5), pytest.approx(6.5))
    with pytest.raises(ValueError, match="every group"):
        stratified_bootstrap_ci([[1.0], []], lambda groups: 0.0)
