"""The prefix search against hand-computed curves."""
import pytest
import torch

from prefixkv.search import cumulative_priority, curve_gini, floor_and_blend, prefix_search


def two_layers():
    return torch.tensor([
        [0.5, 0.3, 0.1, 0.05, 0.03, 0.02],  # cumulative .5 .8 .9 .95 .98 1
        [0.2, 0.0, 0.2, 0.2, 0.2, 0.2],     # sorted: .2 x5 then 0 -> .2 .4 .6 .8 1 1
    ])


def test_cumulative_priority_is_sorted_normalised_cumsum():
    curves = cumulative_priority(two_layers())
    assert torch.allclose(curves[0], torch.tensor([0.5, 0.8, 0.9, 0.95, 0.98, 1.0], dtype=torch.float64))
    assert torch.allclose(curves[1], torch.tensor([0.2, 0.4, 0.6, 0.8, 1.0, 1.0], dtype=torch.float64))


def test_known_curves_give_known_counts():
    # half of 12 entries: one threshold p in (0.6, 0.8] gives layer 0 two entries, layer 1 four
    assert prefix_search(two_layers(), 0.5, sink=0, protect_last=False).tolist() == [2, 4]
    # a third: p in (0.4, 0.5] -> 1 and 3
    assert prefix_search(two_layers(), 1 / 3, sink=0, protect_last=False).tolist() == [1, 3]
    # everything
    assert prefix_search(two_layers(), 1.0, sink=0, protect_last=False).tolist() == [6, 6]


def test_same_information_mass_in_every_layer():
    imp = torch.rand(6, 50, generator=torch.Generator().manual_seed(1)) ** 4
    counts = prefix_search(imp, 0.3, sink=0, protect_last=False)
    curves = cumulative_priority(imp)
    reached = torch.stack([curves[l, counts[l] - 1] for l in range(6)])
    assert float(reached.max() - reached.min()) < 0.15  # equal mass up to the rescale


def test_plateau_is_rescaled_to_exact_total():
    imp = torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0]])
    assert prefix_search(imp, 0.5, sink=0, protect_last=False).tolist() == [2, 2]


@pytest.mark.parametrize("kf", [0.05, 0.1, 0.2, 0.37, 0.5, 0.9, 1.0])
def test_total_is_exact_and_bounds_hold(kf):
    imp = torch.rand(30, 257, generator=torch.Generator().manual_seed(0)) ** 3
    counts = prefix_search(imp, kf, sink=4, protect_last=True)
    target = max(round(kf * 30 * 257), 5 * 30)
    assert int(counts.sum()) == target
    assert bool((counts >= 5).all()) and bool((counts <= 257).all())


def test_protected_entries_are_a_floor():
    imp = torch.rand(2, 10)
    # 2 sinks + the last token are kept even when the budget (2 entries) is smaller
    assert prefix_search(imp, 0.1, sink=2, protect_last=True).tolist() == [3, 3]
    # with no free budget beyond them, exactly the protected entries
    assert prefix_search(imp, 0.3, sink=2, protect_last=True).tolist() == [3, 3]


def test_protected_positions_take_no_part_in_the_curve():
    # all mass on the sink: the free curve is uniform, so free entries split evenly
    imp = torch.tensor([[100.0, 1, 1, 1, 1, 1, 1, 1], [100.0, 8, 1, 1, 1, 1, 1, 1]])
    counts = prefix_search(imp, 0.5, sink=1, protect_last=False)
    assert int(counts.sum()) == 8
    assert counts[1] < counts[0]  # layer 1 reaches the mass with its one heavy entry


def test_several_fractions_at_once_equal_separate_calls():
    imp = torch.rand(5, 64, generator=torch.Generator().manual_seed(3))
    both = prefix_search(imp, [0.2, 0.5])
    assert both.shape == (2, 5)
    assert both[0].tolist() == prefix_search(imp, 0.2).tolist()
    assert both[1].tolist() == prefix_search(imp, 0.5).tolist()


def test_rejects_bad_fraction():
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        prefix_search(torch.rand(2, 8), 0.0)


def test_floor_and_blend_are_exact():
    x = torch.tensor([0.02, 0.02, 0.36, 0.4], dtype=torch.float64)  # mean 0.2
    floored = floor_and_blend(x, 0.2, min_layer_keep=0.5)
    assert torch.all(floored >= 0.1 - 1e-12)
    assert abs(float(floored.mean()) - 0.2) < 1e-12
    assert floored[0] == pytest.approx(0.1) and floored[1] == pytest.approx(0.1)
    # the excess (0.16) comes from the two upper layers in proportion to what they hold above the floor
    assert floored[2] == pytest.approx(0.36 - 0.16 * 0.26 / 0.56)
    half = floor_and_blend(x, 0.2, blend=0.5)
    assert torch.allclose(half, (x + 0.2) / 2)
    assert torch.allclose(floor_and_blend(x, 0.2, blend=0.0), torch.full_like(x, 0.2))


def test_gini_of_known_curves():
    share = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert float(curve_gini(share.unsqueeze(0))) == pytest.approx(0.0, abs=1e-9)
    concentrated = torch.ones(1, 101, dtype=torch.float64)
    concentrated[0, 0] = 0
    assert float(curve_gini(concentrated)) == pytest.approx(0.99, abs=1e-9)
