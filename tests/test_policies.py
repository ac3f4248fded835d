"""Allocations and the named methods."""
import pytest
import torch

from prefixkv.defaults import METHOD_SINKS
from prefixkv.policies import METHODS, Online, Pyramid, Uniform, make_method
from prefixkv.search import SearchSettings, prefix_search


def test_uniform_and_pyramid_keep_the_mean():
    assert Uniform().fractions(0.2, 4).tolist() == [0.2] * 4
    pyr = Pyramid().fractions(0.2, 5)
    assert torch.allclose(pyr, torch.tensor([0.3, 0.25, 0.2, 0.15, 0.1], dtype=torch.float64))
    capped = Pyramid().fractions(0.9, 4)
    assert float(capped.max()) <= 1.0 and float(capped.mean()) == pytest.approx(0.9)
    assert bool((capped[:-1] >= capped[1:]).all())


def test_online_is_the_search_per_row():
    scores = torch.rand(3, 2, 20, generator=torch.Generator().manual_seed(0))
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[1, :5] = False
    f = Online().fractions(0.35, 3, scores, valid, sink=2)
    assert f.shape == (3, 2)
    assert float(f[:, 0].mean()) == pytest.approx(0.35, abs=1e-9)  # 21 of 60 entries
    assert float(f[:, 1].mean()) == pytest.approx(16 / 45, abs=1e-9)  # 15 real tokens: round(15.75) of 45
    floored = Online(SearchSettings(min_layer_keep=0.9)).fractions(0.3, 3, scores, valid, sink=2)
    assert bool((floored >= 0.27 - 1e-9).all())


@pytest.mark.parametrize("name,scorer,allocation", [
    ("h2o", "accumulated", "uniform"), ("snapkv", "window", "uniform"), ("tova", "last-query", "uniform"),
    ("streaming", "recency", "uniform"), ("pyramidkv", "window", "pyramid"), ("prefixkv-online", "accumulated", "online"),
])
def test_baselines_are_scorer_allocation_pairs(name, scorer, allocation):
    method = make_method(name)
    assert (method.scorer.name, method.allocation.name) == (scorer, allocation)


def test_each_method_keeps_its_own_papers_sink():
    """StreamingLLM keeps 4 initial tokens; H2O, SnapKV, TOVA and PyramidKV no fixed sinks;
    PrefixKV one (its released evaluation's --start-size 1).  ``sink=`` overrides."""
    expected = {"full": 0, "streaming": 4, "h2o": 0, "snapkv": 0, "tova": 0, "pyramidkv": 0,
                "prefixkv-online": 1}
    for name, sink in expected.items():
        assert make_method(name).sink == sink == METHOD_SINKS[name]
    assert set(METHOD_SINKS) >= set(METHODS)
    assert make_method("snapkv", sink=3).sink == 3


def test_online_uses_the_cache_sink_and_the_paper_search():
    """The online allocation is the paper's search (curve over all positions) with the
    cache's own protected entries; another curve is asked for by name."""
    scores = torch.rand(4, 1, 30, generator=torch.Generator().manual_seed(1))
    valid = torch.ones(1, 30, dtype=torch.bool)
    got = Online().fractions(0.3, 4, scores, valid, sink=1)[:, 0]
    want = prefix_search(scores[:, 0], 0.3, sink=1, curve="all").double() / 30
    assert torch.equal(got, want)
    other = Online(SearchSettings(curve="unprotected")).fractions(0.3, 4, scores, valid, sink=3)[:, 0]
    assert torch.equal(other, prefix_search(scores[:, 0], 0.3, sink=3, curve="unprotected").double() / 30)


def test_overrides_and_errors():
    m = make_method("custom", scorer="last-query", allocation="online")
    assert (m.scorer.name, m.allocation.name) == ("last-query", "online")
    with pytest.raises(ValueError, match="unknown allocation"):
        make_method("custom", allocation="diagonal")
