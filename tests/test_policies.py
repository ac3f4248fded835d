"""Allocations and the named methods."""
import pytest
import torch

from prefixkv.policies import Online, Pyramid, Uniform, make_method


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
    floored = Online(min_layer_keep=0.9).fractions(0.3, 3, scores, valid, sink=2)
    assert bool((floored >= 0.27 - 1e-9).all())


@pytest.mark.parametrize("name,scorer,allocation", [
    ("h2o", "accumulated", "uniform"), ("snapkv", "window", "uniform"), ("tova", "last-query", "uniform"),
    ("streaming", "recency", "uniform"), ("pyramidkv", "window", "pyramid"), ("prefixkv-online", "accumulated", "online"),
])
def test_baselines_are_scorer_allocation_pairs(name, scorer, allocation):
    method = make_method(name)
    assert (method.scorer.name, method.allocation.name) == (scorer, allocation)


def test_overrides_and_errors():
    m = make_method("custom", scorer="last-query", allocation="online")
    assert (m.scorer.name, m.allocation.name) == ("last-query", "online")
    with pytest.raises(ValueError, match="unknown allocation"):
        make_method("custom", allocation="diagonal")
