"""Calibration on the tiny model: the profile is the mean of per-sample searches."""
import torch

from prefixkv.calibration import calibrate, score_sample
from prefixkv.scoring import make_scorer
from prefixkv.search import SearchSettings, floor_and_blend, prefix_search


def samples(n=3, length=48):
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, 256, (length,), generator=g).tolist() for _ in range(n)]


def test_profile_is_mean_of_per_sample_searches(tiny_model):
    data = samples()
    run = calibrate(tiny_model, data, [0.25, 0.5], ["accumulated"], SearchSettings(sink=2), progress=False)
    profile = run.profiles["accumulated"]
    expected = torch.stack([
        prefix_search(score_sample(tiny_model, ids, [make_scorer("accumulated")])["accumulated"], 0.25, sink=2).double() / 48
        for ids in data
    ]).mean(0)
    expected = expected * (0.25 / expected.mean())
    assert torch.allclose(torch.tensor(profile.layer_fractions(0.25), dtype=torch.float64), expected, atol=1e-6)
    assert profile.calibration["samples"] == 3 and profile.calibration["tokens"]["max"] == 48
    assert len(run.gini["accumulated"]) == 3 and run.curves["accumulated"].shape == (3, 101)


def test_default_settings_are_the_papers_and_are_recorded(tiny_model):
    """A plain calibration runs the released code's settings (curve over all positions, one
    sink, the last token, no floor, blend 1) and writes them into the profile; any other
    setting is asked for by name and recorded."""
    profile = calibrate(tiny_model, samples(1), [0.3], ["accumulated"], progress=False).profiles["accumulated"]
    assert (profile.curve, profile.sink, profile.protect_last, profile.min_layer_keep, profile.blend) == ("all", 1, True, 0.0, 1.0)
    assert profile.departures() == []
    other = calibrate(tiny_model, samples(1), [0.3], ["accumulated"], SearchSettings(curve="unprotected", sink=4, blend=0.5),
                      progress=False).profiles["accumulated"]
    assert other.departures() == ["curve='unprotected'", "sink=4", "blend=0.5"]
    doc = other.to_dict()
    assert doc["allocation"] == {"min_layer_keep": 0.0, "blend": 0.5, "curve": "unprotected"} and doc["sink"] == 4


def test_several_scorers_in_one_pass_equal_separate_runs(tiny_model):
    data = samples(2)
    both = calibrate(tiny_model, data, [0.3], ["accumulated", "last-query"], SearchSettings(sink=2), progress=False)
    alone = calibrate(tiny_model, data, [0.3], ["last-query"], SearchSettings(sink=2), progress=False)
    assert both.profiles["last-query"].layer_fractions(0.3) == alone.profiles["last-query"].layer_fractions(0.3)
    assert both.profiles["last-query"].scorer == "last-query"


def test_floor_and_blend_are_recorded_and_respected(tiny_model):
    run = calibrate(tiny_model, samples(2), [0.2], ["accumulated"], SearchSettings(sink=2, min_layer_keep=0.8, blend=0.5),
                    progress=False)
    profile = run.profiles["accumulated"]
    assert (profile.min_layer_keep, profile.blend) == (0.8, 0.5)
    assert min(profile.layer_fractions(0.2)) >= 0.16 - 1e-6
    x = torch.tensor([0.05, 0.05, 0.5], dtype=torch.float64)
    assert torch.allclose(floor_and_blend(x, 0.2, 0.8, 0.5), torch.tensor([0.16, 0.16, 0.28], dtype=torch.float64))
