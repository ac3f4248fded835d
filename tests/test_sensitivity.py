"""The ``sensitivity`` allocation rule: hand-computed allocations, and a tiny model whose
layers are made to differ."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prefixkv.sensitivity import allocate, calibrate_sensitivity, measure_harm


def test_allocation_by_hand():
    # grid (0.5,): layer 0 saves 1.0 of harm per half of its entries (slope 2), layer 1 saves 0.1 (slope 0.2).
    # keep 0.75: 1.5 in all, 1.0 at the floor; the 0.5 left goes to layer 0 entirely.
    assert allocate(torch.tensor([[1.0], [0.1]]), 0.75, grid=[0.5]).tolist() == [1.0, 0.5]
    # keep 0.6: 0.2 left, still all to layer 0 (its segment is worth more)
    assert allocate(torch.tensor([[1.0], [0.1]]), 0.6, grid=[0.5]).tolist() == pytest.approx([0.7, 0.5])
    # equal layers: equal lengths (the tie goes segment by segment, a layer's own in order)
    assert allocate(torch.tensor([[4.0, 1.0], [4.0, 1.0]]), 0.5, grid=[0.25, 0.5]).tolist() == [0.5, 0.5]


def test_the_hull_makes_marginal_harm_fall():
    # layer 0's harm is flat then steep (0.9 at 0.2, 0.85 at 0.6): the hull joins 0.2 to 1.0 (slope 1.125);
    # layer 1 is convex already: 0.5 at 0.2, 0.1 at 0.6 (slope 1.0), 0 at 1 (slope 0.25).
    # keep 0.5 leaves 0.6: layer 0's whole hull segment is 0.8 long and worth the most, so it takes 0.6.
    out = allocate(torch.tensor([[0.9, 0.85], [0.5, 0.1]]), 0.5, grid=[0.2, 0.6])
    assert out.tolist() == pytest.approx([0.8, 0.2])
    # a measured harm that rises with more entries (noise) counts as flat
    assert allocate(torch.tensor([[0.1, 0.3], [0.2, 0.2]]), 0.4, grid=[0.2, 0.6]).sum() == pytest.approx(0.8)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.floats(0, 10), min_size=3, max_size=3), min_size=1, max_size=6),
       st.floats(0.1, 1.0))
def test_allocation_keeps_the_mean_and_the_bounds(rows, keep):
    out = allocate(torch.tensor(rows, dtype=torch.float64), keep, grid=[0.1, 0.4, 0.7])
    assert float(out.mean()) == pytest.approx(keep, abs=1e-9)
    assert bool((out >= 0.1 - 1e-12).all()) and bool((out <= 1 + 1e-12).all())


@pytest.mark.parametrize("harm, keep, grid, message", [
    ([[1.0]], 0.05, [0.1], "outside"),
    ([[1.0, 2.0]], 0.5, [0.1], "must be"),
    ([[-1.0]], 0.5, [0.1], "non-negative"),
    ([[1.0, 1.0]], 0.5, [0.4, 0.2], "increasing"),
])
def test_allocation_refuses_bad_input(harm, keep, grid, message):
    with pytest.raises(ValueError, match=message):
        allocate(torch.tensor(harm), keep, grid=grid)


def _one_layer_matters(layers: int = 3, loud: int = 1):
    """A tiny Llama whose layer ``loud`` writes 20x its attention output into the residual
    stream and whose other layers write almost none: compressing ``loud`` hurts, the others not."""
    from conftest import tiny_llama

    model = tiny_llama(layers=layers, seed=3)
    with torch.no_grad():
        for l, layer in enumerate(model.model.layers):
            layer.self_attn.o_proj.weight.mul_(20.0 if l == loud else 0.01)
    return model


def _samples(n=4, length=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (length,), generator=g).tolist() for _ in range(n)]


def test_the_layer_that_matters_gets_more_entries():
    from prefixkv.scoring import make_scorer

    model = _one_layer_matters()
    harm = measure_harm(model, _samples(), make_scorer("accumulated"), sink=1, protect_last=True,
                        grid=(0.1, 0.3, 0.6), continuation=8, progress=False)
    assert harm.shape == (4, 3, 3)
    mean = harm.mean(0)
    assert bool((mean[1] > 10 * mean[0]).all()) and bool((mean[1] > 10 * mean[2]).all())
    assert bool((mean[1, :-1] >= mean[1, 1:]).all())  # fewer entries, more harm
    fractions = allocate(mean, 0.3, grid=(0.1, 0.3, 0.6))
    assert fractions[1] > 0.6 and fractions[0] == pytest.approx(0.1) and fractions[2] == pytest.approx(0.1)


def test_a_sensitivity_profile_records_its_rule_and_applies_like_any_profile(tmp_path):
    from prefixkv.cache import PrefixKVCache, cache_argument
    from prefixkv.profile import RetentionProfile

    model = _one_layer_matters()
    run = calibrate_sensitivity(model, _samples(), [0.2, 0.5], "window", grid=(0.1, 0.3, 0.6), continuation=8,
                                progress=False, data_name="random")
    (profile,) = run.profiles.values()
    assert profile.rule == "sensitivity" and profile.departures()[0] == "rule='sensitivity'"
    assert profile.scorer == "window"
    assert sum(profile.layer_fractions(0.2)) / 3 == pytest.approx(0.2)
    assert profile.layer_fractions(0.5)[1] == max(profile.layer_fractions(0.5))
    recorded = profile.calibration["sensitivity"]
    assert recorded["grid"] == [0.1, 0.3, 0.6] and len(recorded["harm"]) == 3
    loaded = RetentionProfile.load(profile.save(tmp_path / "p.json"))
    assert loaded.rule == "sensitivity" and loaded.layer_fractions(0.2) == profile.layer_fractions(0.2)
    cache = PrefixKVCache(loaded, keep_fraction=0.2)  # applied as recorded: the profile's lengths
    ids = torch.tensor([_samples(1, 80, seed=5)[0]])
    model(input_ids=ids, **cache_argument(model, cache), use_cache=True)
    lengths = cache.layer_lengths()[:, 0].tolist()
    assert lengths[1] == max(lengths) and lengths[1] > lengths[0]


def test_a_prefix_search_profile_file_is_unchanged(tmp_path):
    """Profiles of the paper's rule are written as before (no "rule" key) and read as the prefix search."""
    import json

    from prefixkv.profile import Fingerprint, LayerKeep, RetentionProfile

    fp = Fingerprint("LlamaForCausalLM", 2, 4, 2, 16, "abc")
    path = RetentionProfile(fp, 1, {0.2: LayerKeep([0.2, 0.2], [0.0, 0.0])}).save(tmp_path / "p.json")
    assert "rule" not in json.loads(path.read_text())["allocation"]
    assert RetentionProfile.load(path).rule == "prefix-search"
    data = json.loads(path.read_text())
    data["allocation"]["rule"] = "bogus"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="rule"):
        RetentionProfile.load(path)


def test_cli_refuses_search_settings_with_the_sensitivity_rule(capsys, tmp_path):
    from prefixkv.cli import main

    assert main(["calibrate", "--rule", "sensitivity", "--blend", "0.5", "--output", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--blend shapes the prefix search" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "p.json").exists()


def test_cli_calibrates_by_sensitivity_and_eval_applies_it(capsys, tmp_path):
    import json

    from test_export import tiny_model_folder

    from prefixkv.cli import main

    _, folder = tiny_model_folder(tmp_path)
    out = tmp_path / "sens.json"
    assert main(["calibrate", "--model", str(folder), "--rule", "sensitivity", "--scorer", "window", "--keep", "0.2,0.3",
                 "--samples", "2", "--tokens", "48", "--output", str(out)]) == 0
    assert "allocation rule sensitivity" in capsys.readouterr().err
    doc = json.loads(out.read_text())
    assert doc["allocation"]["rule"] == "sensitivity" and set(doc["budgets"]) == {"0.2", "0.3"}
    result = tmp_path / "eval.json"
    assert main(["eval", "--model", str(folder), "--profile", str(out), "--keep", "0.2", "--samples", "1",
                 "--tokens", "48", "--json", str(result)]) == 0


def test_the_quality_benchmark_takes_sensitivity_pairs():
    from prefixkv.bench.quality import attach_profiles, configs_from

    configs = configs_from("snapkv", "window+sensitivity,window+profile")
    labels = [c.name() if c.method != "custom" else (c.label or f"{c.scorer}+{c.allocation}") for c in configs]
    assert labels == ["snapkv", "window+sensitivity", "window+profile"]
    sens = configs[1]
    assert sens.allocation == "profile" and sens.extra["rule"] == "sensitivity"
    attach_profiles(configs, {"window(pool=5,window=8)": "the prefix-search profile"})
    assert sens.profile is None and configs[2].profile == "the prefix-search profile"
    assert len(configs_from("", "all")) == 4 * 5
    # a pair runs beside a named method of the same parts when its sink differs (SnapKV: 0, a pair: 1)
    both = configs_from("snapkv,pyramidkv", "window+uniform,window+pyramid")
    assert [(c.method, c.scorer, c.allocation) for c in both] == [
        ("snapkv", None, None), ("pyramidkv", None, None), ("custom", "window", "uniform"), ("custom", "window", "pyramid")]
