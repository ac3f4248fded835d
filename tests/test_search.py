"""The prefix search against hand-computed curves and against the released code's rule."""
import numpy as np
import pytest
import torch

from prefixkv.search import (
    SEARCH_CURVES,
    cumulative_priority,
    curve_gini,
    floor_and_blend,
    prefix_search,
)


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
    # the unprotected rule bisects to the end: half of 12 entries, one threshold p in (0.6, 0.8]
    # gives layer 0 two entries, layer 1 four
    unprotected = dict(sink=0, protect_last=False, curve="unprotected")
    assert prefix_search(two_layers(), 0.5, **unprotected).tolist() == [2, 4]
    # a third: p in (0.4, 0.5] -> 1 and 3
    assert prefix_search(two_layers(), 1 / 3, **unprotected).tolist() == [1, 3]
    # everything, under both curves
    assert prefix_search(two_layers(), 1.0, **unprotected).tolist() == [6, 6]
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


@pytest.mark.parametrize("curve", SEARCH_CURVES)
@pytest.mark.parametrize("kf", [0.05, 0.1, 0.2, 0.37, 0.5, 0.9, 1.0])
def test_total_is_exact_and_bounds_hold(kf, curve):
    imp = torch.rand(30, 257, generator=torch.Generator().manual_seed(0)) ** 3
    counts = prefix_search(imp, kf, sink=4, protect_last=True, curve=curve)
    target = max(round(kf * 30 * 257), 5 * 30)
    assert int(counts.sum()) == target
    assert bool((counts >= 5).all()) and bool((counts <= 257).all())


@pytest.mark.parametrize("curve", SEARCH_CURVES)
def test_protected_entries_are_a_floor(curve):
    imp = torch.rand(2, 10)
    # 2 sinks + the last token are kept even when the budget (2 entries) is smaller
    assert prefix_search(imp, 0.1, sink=2, protect_last=True, curve=curve).tolist() == [3, 3]
    # with no free budget beyond them, exactly the protected entries
    assert prefix_search(imp, 0.3, sink=2, protect_last=True, curve=curve).tolist() == [3, 3]


def test_protected_positions_take_no_part_in_the_unprotected_curve():
    # all mass on the sink: the free curve is uniform, so free entries split evenly
    imp = torch.tensor([[100.0, 1, 1, 1, 1, 1, 1, 1], [100.0, 8, 1, 1, 1, 1, 1, 1]])
    counts = prefix_search(imp, 0.5, sink=1, protect_last=False, curve="unprotected")
    assert int(counts.sum()) == 8
    assert counts[1] < counts[0]  # layer 1 reaches the mass with its one heavy entry


@pytest.mark.parametrize("curve", SEARCH_CURVES)
def test_several_fractions_at_once_equal_separate_calls(curve):
    imp = torch.rand(5, 64, generator=torch.Generator().manual_seed(3))
    both = prefix_search(imp, [0.2, 0.5], curve=curve)
    assert both.shape == (2, 5)
    assert both[0].tolist() == prefix_search(imp, 0.2, curve=curve).tolist()
    assert both[1].tolist() == prefix_search(imp, 0.5, curve=curve).tolist()


def test_rejects_bad_fraction():
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        prefix_search(torch.rand(2, 8), 0.0)


def test_rejects_unknown_curve():
    assert SEARCH_CURVES == ("all", "unprotected")
    with pytest.raises(ValueError, match="curve must be one of all, unprotected"):
        prefix_search(torch.rand(2, 8), 0.5, curve="protected")
    with pytest.raises(ValueError, match="curve must be one of"):
        cumulative_priority(torch.rand(2, 8), curve="")


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


# --- the released code's rule (THU-MIG/PrefixKV, prefixkv.py), written here from its description ---

def released_rule(importance, keep, sink, protect_last=True):
    """Kept counts per layer under the released rule, in plain numpy loops.

    Each layer's curve spans all N positions (sorted descending, normalised, cumulated).  A
    threshold p gives each layer the shortest prefix reaching it; the layer evicts
    max(N - prefix - protected, 0).  Bisect p until the evicted total is within 5 of
    (1 - keep) * L * N, rescale the evicted counts to that target, truncate, keep N - evicted.
    """
    imp = np.asarray(importance, dtype=np.float64)
    layers, n = imp.shape
    protected = min(sink, n) + (1 if protect_last and n > sink else 0)
    curves = []
    for row in imp:
        ordered = np.sort(row)[::-1]
        curves.append(np.cumsum(ordered / ordered.sum()))
    target = (1 - keep) * layers * n

    def evicted(p):
        out = []
        for curve in curves:
            prefix = 1
            while prefix < n and curve[prefix - 1] < p:
                prefix += 1
            out.append(max(n - prefix - protected, 0))
        return np.array(out, dtype=np.float64)

    left, right = 0.0, 1.0
    for _ in range(100):
        mid = (left + right) / 2
        total = evicted(mid).sum()
        if abs(total - target) < 5:
            break
        if total < target:
            right = mid
        else:
            left = mid
    counts = evicted(mid)
    counts = counts * target / counts.sum()
    return n - counts.astype(np.int64)


def sinky(layers, positions, seed):
    """Heavy-tailed importances with attention sinks of a different strength in every layer:
    the first 4 positions hold 5%..90% of a layer's mass (mostly on position 0), the last
    token a few times an average entry."""
    rng = np.random.default_rng(seed)
    imp = rng.random((layers, positions)) ** rng.uniform(2, 6, (layers, 1))
    imp *= rng.uniform(0.5, 2.0, (layers, 1))
    strength = np.linspace(0.05, 0.9, layers)
    rng.shuffle(strength)
    body = imp[:, 4:].sum(1)
    imp[:, :4] = (strength / (1 - strength) * body)[:, None] * np.array([0.7, 0.15, 0.1, 0.05])
    imp[:, -1] = rng.uniform(2, 8, layers) * body / positions
    return torch.tensor(imp, dtype=torch.float32)


@pytest.mark.parametrize("layers,positions", [(12, 200), (30, 2000), (24, 777), (16, 1500)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_all_curve_matches_the_released_rule(layers, positions, seed):
    imp = sinky(layers, positions, seed)
    for sink in (1, 4):
        for keep in (0.1, 0.2, 0.5):
            ours = prefix_search(imp, keep, sink=sink, protect_last=True, curve="all").numpy()
            ref = released_rule(imp.numpy(), keep, sink)
            diff = np.abs(ours - ref) / positions
            assert diff.mean() <= 0.01 and diff.max() <= 0.03, (sink, keep, diff.mean(), diff.max())
            # the total: ours is exact, the released truncation keeps up to L - 1 more
            assert ours.sum() == round(keep * layers * positions)
            assert 0 <= ref.sum() - ours.sum() < layers


def test_all_curve_by_hand():
    imp = torch.tensor([
        [0.6, 0.1, 0.08, 0.06, 0.05, 0.04, 0.03, 0.02, 0.01, 0.01],  # cum .6 .7 .78 .84 .89 .93 .96 .98 .99 1
        [0.15, 0.14, 0.13, 0.12, 0.11, 0.10, 0.09, 0.07, 0.05, 0.04],  # cum .15 .29 .42 .54 .65 .75 .84 .91 .96 1
    ], dtype=torch.float64)
    curves = cumulative_priority(imp, sink=1, protect_last=True, curve="all")
    assert curves.shape == (2, 10)  # every position, the sink and the last token included
    assert torch.allclose(curves[0, :3], torch.tensor([0.6, 0.7, 0.78], dtype=torch.float64))
    # 1 sink + the last token protected.  keep 0.5: evict 10 of 20.  p = 0.5 gives prefixes 1 and 4,
    # evicting 10-1-2 = 7 and 10-4-2 = 4; 11 is within 5 of 10, so the bisection stops there.
    # Rescaled: 70/11 = 6.36 and 40/11 = 3.64 evicted, kept 3.64 and 6.36.  The released code
    # truncates the evicted counts (kept 4 and 7, 11 in all); largest remainder gives 4 and 6.
    assert released_rule(imp.numpy(), 0.5, sink=1).tolist() == [4, 7]
    assert prefix_search(imp, 0.5, sink=1, protect_last=True).tolist() == [4, 6]
    # keep 0.2: evict 16.  p = 0.5 evicts 11 (5 short: not within 5), so p = 0.25: prefixes 1 and 2,
    # evicting 7 + 6 = 13, within 5.  Rescaled: 8.62 and 7.38 evicted, kept 1.38 and 2.62; the
    # protected floor is 2, the total 4, so both keep 2 (the released truncation: 2 and 3).
    assert released_rule(imp.numpy(), 0.2, sink=1).tolist() == [2, 3]
    assert prefix_search(imp, 0.2, sink=1, protect_last=True).tolist() == [2, 2]


def test_sink_heavy_layers_get_fewer_entries_under_the_all_curve():
    # eight layers with the same unprotected scores; the first four put 80% of their mass on the sink
    body = torch.rand(1, 400, generator=torch.Generator().manual_seed(7)) ** 4
    imp = body.repeat(8, 1)
    share = torch.tensor([0.8] * 4 + [0.1] * 4).view(-1, 1)
    imp[:, 0] = (share / (1 - share) * imp[:, 1:].sum(1, keepdim=True)).squeeze(1)
    unprotected = prefix_search(imp, 0.2, sink=1, protect_last=True, curve="unprotected")
    released = prefix_search(imp, 0.2, sink=1, protect_last=True, curve="all")
    # the unprotected curve never sees the sink: all layers look alike
    assert int(unprotected.max() - unprotected.min()) <= 1
    # the full curve counts the sink's mass towards p: sink-heavy layers reach it sooner
    assert int(released[:4].max()) < int(released[4:].min())
    assert bool((released[:4] < unprotected[:4]).all()) and bool((released[4:] > unprotected[4:]).all())
    assert int(released.sum()) == int(unprotected.sum()) == round(0.2 * 8 * 400)
