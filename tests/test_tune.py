"""``prefixkv tune``: the winner rule by hand, the candidates, and a tiny model end to end."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from prefixkv.tune import (
    Candidate,
    TuneConfig,
    _ranks,
    choose,
    default_candidates,
    narrow,
    tune,
)


def test_ranks_share_ties_and_put_nan_last():
    assert _ranks([3.0, 1.0, 2.0], higher=False) == [3.0, 1.0, 2.0]
    assert _ranks([3.0, 1.0, 2.0], higher=True) == [1.0, 3.0, 2.0]
    assert _ranks([1.0, 1.0, 5.0], higher=False) == [1.5, 1.5, 3.0]
    assert _ranks([math.nan, 2.0, 1.0], higher=True) == [3.0, 1.0, 2.0]


def test_the_winner_has_the_lowest_mean_rank():
    higher = {"ppl": False, "acc": True}
    scores = {  # A: best PPL at both keeps, worst accuracy; B: second everywhere; C: best accuracy, worst PPL
        "A": {(0.1, "ppl"): 10.0, (0.2, "ppl"): 8.0, (0.1, "acc"): 0.1, (0.2, "acc"): 0.2},
        "B": {(0.1, "ppl"): 11.0, (0.2, "ppl"): 9.0, (0.1, "acc"): 0.5, (0.2, "acc"): 0.6},
        "C": {(0.1, "ppl"): 20.0, (0.2, "ppl"): 15.0, (0.1, "acc"): 0.9, (0.2, "acc"): 0.9},
    }
    label, mean = choose(scores, higher, agreement={})
    assert mean == {"A": 2.0, "B": 2.0, "C": 2.0} and label == "A"  # all tied: the first
    label, _ = choose(scores, higher, agreement={"C": 0.7, "B": 0.6})
    assert label == "C"  # tied ranks: the higher agreement with the full cache
    scores["B"][(0.2, "acc")] = 0.95  # B now best accuracy at 0.2: rank sums A 1+1+3+3, B 2+2+2+1, C 3+3+1+2
    label, mean = choose(scores, higher, agreement={"C": 1.0})
    assert label == "B" and mean == {"A": 2.0, "B": 1.75, "C": 2.25}


def test_the_winner_rule_refuses_uneven_scores():
    with pytest.raises(ValueError, match="every candidate"):
        choose({"A": {(0.1, "ppl"): 1.0}, "B": {}}, {"ppl": False}, {})
    with pytest.raises(ValueError, match="no candidates"):
        choose({}, {}, {})


def test_the_default_candidates_hold_the_baselines_and_both_curves():
    labels = [c.label for c in default_candidates()]
    assert len(labels) == len(set(labels))
    for baseline in ("accumulated+uniform sink=0", "window+uniform sink=0", "last-query+uniform sink=0",
                     "window+pyramid sink=0", "accumulated+profile sink=1 curve=all",
                     "accumulated+profile sink=4 curve=unprotected", "window+sensitivity sink=4",
                     "recency+uniform sink=4 evict=oldest"):  # the last: StreamingLLM, its decode rule too
        assert baseline in labels
    assert [c.label for c in narrow(default_candidates(), "window+uniform*,*sensitivity*")] == [
        "window+uniform sink=0", "window+sensitivity sink=4"]
    with pytest.raises(ValueError, match="no candidate matches"):
        narrow(default_candidates(), "vibes+*")


@pytest.mark.parametrize("kwargs, message", [
    ({"scorer": "vibes", "rule": "uniform"}, "unknown scorer"),
    ({"scorer": "window", "rule": "magic"}, "unknown rule"),
    ({"scorer": "window", "rule": "uniform", "blend": 0.5}, "shape the prefix search"),
])
def test_a_bad_candidate_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Candidate(**kwargs)


def test_a_bad_config_is_refused():
    with pytest.raises(ValueError, match="keep fractions"):
        TuneConfig(keep_fractions=(1.0,))
    with pytest.raises(ValueError, match="unknown task"):
        TuneConfig(tasks=("vibes",))


SMALL = dict(calibration_samples=2, sensitivity_samples=2, tune_samples=2, tokens=64, reference_tokens=8, new_tokens=8,
             retrieval_samples=2, retrieval_length=320, progress=False)


def test_tune_end_to_end_on_the_tiny_model(tmp_path):
    from test_export import tiny_model_folder, write_tokenizer  # noqa: F401

    from prefixkv.cache import PrefixKVCache, cache_argument
    from prefixkv.models import load_model
    from prefixkv.profile import RetentionProfile

    _, folder = tiny_model_folder(tmp_path)
    model, tokenizer = load_model(str(folder))
    candidates = narrow(default_candidates(), "window+uniform*,accumulated+uniform*,window+pyramid*,"
                                              "window+profile sink=1*,window+sensitivity*")
    result = tune(model, tokenizer, TuneConfig(keep_fractions=(0.3, 0.5), candidates=tuple(candidates), **SMALL),
                  log=lambda m: None)
    record = result.profile.calibration["tune"]
    assert record["winner"] == result.winner.label
    assert [c["label"] for c in record["candidates"]] == [c.label for c in candidates]
    assert min(result.mean_rank.values()) == result.mean_rank[result.winner.label]
    assert all(len(c["scores"]) == 2 * 4 for c in record["candidates"])  # 2 keeps x (2 continuation + 2 retrieval)
    assert record["data"]["tuning_prompts"] == 2 and record["data"]["retrieval_questions"] == 2
    assert {r["label"] for r in result.results} == {"full"} | {c.label for c in candidates}
    # the profile applies as recorded: its scorer, sink and lengths
    path = result.profile.save(tmp_path / "tuned.json")
    loaded = RetentionProfile.load(path)
    assert loaded.scorer == result.winner.scorer and loaded.sink == result.winner.sink
    rule = {"prefix-search": "prefix-search"}.get(result.winner.rule, result.winner.rule)
    assert loaded.rule == rule
    import torch

    cache = PrefixKVCache(loaded, keep_fraction=0.3)
    ids = torch.randint(3, 256, (1, 50), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, **cache_argument(model, cache), use_cache=True)
    want = [max(round(f * 50), 0) for f in loaded.layer_fractions(0.3)]
    got = cache.layer_lengths()[:, 0].tolist()
    assert all(abs(g - w) <= max(loaded.sink, 1) + 1 for g, w in zip(got, want))


def test_a_uniform_winner_is_written_out_as_its_lengths(tmp_path):
    from test_export import tiny_model_folder

    from prefixkv.models import load_model

    _, folder = tiny_model_folder(tmp_path)
    model, tokenizer = load_model(str(folder))
    candidates = narrow(default_candidates(), "window+pyramid*")
    result = tune(model, tokenizer, TuneConfig(keep_fractions=(0.2,), tasks=("continuation",),
                                               candidates=tuple(candidates), **SMALL), log=lambda m: None)
    profile = result.profile
    assert profile.rule == "pyramid" and profile.scorer == "window" and profile.sink == 0
    fractions = profile.layer_fractions(0.2)
    assert fractions[0] > fractions[-1] and sum(fractions) / len(fractions) == pytest.approx(0.2)


def test_a_streamingllm_winner_keeps_its_decode_rule_in_the_engine(tmp_path):
    """StreamingLLM as the tuned winner: the profile records the oldest-entry rule, the cache
    it makes equals ``method="streaming"``, and the engine built from it keeps, at every decode
    step, the 4 sinks and the most recent entries (by hand), as the PyTorch reference does."""
    import torch
    from test_export import SMALL_VALIDATION, tiny_model_folder

    from prefixkv.cache import PrefixKVCache, cache_argument
    from prefixkv.defaults import OLDEST
    from prefixkv.engines.onnxruntime import OnnxRuntimeRunner
    from prefixkv.engines.validate import ValidationConfig
    from prefixkv.models import load_model
    from prefixkv.pipeline import BuildConfig, build_engine
    from prefixkv.profile import RetentionProfile

    _, folder = tiny_model_folder(tmp_path)
    model, tokenizer = load_model(str(folder))
    keep = 0.3
    result = tune(model, tokenizer, TuneConfig(keep_fractions=(keep,), tasks=("continuation",),
                                               candidates=tuple(narrow(default_candidates(), "recency+*")), **SMALL),
                  log=lambda m: None)
    loaded = RetentionProfile.load(result.profile.save(tmp_path / "streaming.json"))
    assert (loaded.scorer, loaded.rule, loaded.sink, loaded.evict_distance) == ("recency", "uniform", 4, OLDEST)
    assert "evict_distance=1073741824" in loaded.departures()

    ids = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(2))
    outs = []
    for cache in (PrefixKVCache(loaded, keep_fraction=keep), PrefixKVCache(method="streaming", keep_fraction=keep)):
        assert cache.method.evict_distance == OLDEST and cache.sink == 4
        outs.append(model.generate(ids, max_new_tokens=12, do_sample=False, **cache_argument(model, cache)))
    assert torch.equal(outs[0], outs[1])

    built = build_engine(BuildConfig(str(folder), tmp_path / "streaming-engine", keep, profile=loaded,
                                     validation=ValidationConfig(**SMALL_VALIDATION)), model=model, log=lambda m: None)
    assert built.passed, built.validation
    assert json.loads((built.path / "manifest.json").read_text())["evict_distance"] == OLDEST
    engine = OnnxRuntimeRunner(built.path, threads=1)
    n = 40
    logits, state = engine.prefill(*engine.pad([ids[0].tolist()]))
    for step in range(20):
        seen = n + step
        for positions in engine.kept_positions(state):
            held = positions[0][positions[0] >= 0].tolist()
            assert held == [0, 1, 2, 3] + list(range(seen - (len(held) - 4), seen)), (step, held)
        logits, state = engine.decode(state, logits.argmax(-1))


def test_cli_tune_writes_the_profile_plot_and_results_and_eval_applies_it(tmp_path, capsys):
    from test_export import tiny_model_folder

    from prefixkv.cli import main

    _, folder = tiny_model_folder(tmp_path)
    out = tmp_path / "tuned.json"
    assert main(["tune", "--model", str(folder), "--keep", "0.3", "--samples", "2", "--tokens", "64",
                 "--tasks", "continuation", "--candidates", "window+uniform*,window+profile sink=1*",
                 "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert "winner: " in err
    doc = json.loads(out.read_text())
    assert doc["calibration"]["tune"]["winner"] in ("window+uniform sink=0", "window+profile sink=1 curve=all")
    assert (tmp_path / "tuned_tune_continuation.png").stat().st_size > 0
    assert json.loads((tmp_path / "tuned_tune.json").read_text())["winner"] == doc["calibration"]["tune"]["winner"]
    assert main(["tune", "--model", str(folder), "--output", str(out)]) == 2  # exists: refused before any work
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["eval", "--model", str(folder), "--profile", str(out), "--keep", "0.3", "--samples", "1",
                 "--tokens", "48"]) == 0


def test_build_refuses_tuning_flags_without_tune(tmp_path, capsys):
    from prefixkv.cli import main

    assert main(["build", "--calibrate", "--candidates", "window+*", "--output", str(tmp_path / "e")]) == 2
    assert "--candidates narrows the tuning: it takes --tune" in capsys.readouterr().err
    assert main(["build", "--tune", "--scorer", "window", "--output", str(tmp_path / "e")]) == 2
    assert "--scorer sets what --tune chooses" in capsys.readouterr().err


def test_the_tuning_windows_are_not_the_calibration_windows():
    from prefixkv.data import builtin_samples

    class Chars:  # a tokenizer of characters: windows are character spans
        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]

        def decode(self, ids):
            return "".join(map(chr, ids))

    calib = builtin_samples(Chars(), "calibration", n=8, tokens=512, reference_tokens=0)
    tune = builtin_samples(Chars(), "calibration", n=8, tokens=512, reference_tokens=32, phase=0.5)
    assert not {s["prompt"] for s in calib} & {s["prompt"] for s in tune}
    assert all(t["prompt"] not in c["prompt"] and c["prompt"] not in t["prompt"] for c in calib for t in tune)
    with pytest.raises(ValueError, match="phase"):
        builtin_samples(Chars(), "calibration", n=2, phase=1.0)


def test_build_tune_tunes_then_builds_the_winner(tmp_path, capsys):
    from test_export import tiny_model_folder

    from prefixkv.cli import main
    from prefixkv.engine_folder import read_manifest
    from prefixkv.profile import RetentionProfile

    _, folder = tiny_model_folder(tmp_path)
    engine = tmp_path / "engine"
    assert main(["build", "--model", str(folder), "--tune", "--keep", "0.3", "--samples", "2", "--tokens", "64",
                 "--tasks", "continuation", "--candidates", "window+pyramid*", "--no-validate",
                 "--output", str(engine)]) == 0
    assert "tuned: window+pyramid sink=0" in capsys.readouterr().err
    tuned = RetentionProfile.load(tmp_path / "engine_tune" / "profile.json")
    manifest = read_manifest(engine)
    assert manifest["layer_keep_fractions"] == pytest.approx(tuned.layer_fractions(0.3))
    assert manifest["scorer"]["name"] == "window" and manifest["sink"] == 0
    assert RetentionProfile.load(engine / "profile.json").rule == "pyramid"


def test_the_benchmarks_issue_15_comparisons_on_hand_made_results():
    """tune_targets: tuned vs every uniform row (a loss whose interval excludes 0 fails the
    target), and S+sensitivity vs S+uniform (a sure win meets it)."""
    from prefixkv.bench.quality import tune_targets

    rng = np.random.default_rng(0)

    def result(label, allocation, nll, rouge, scorer="window", sink=0):
        rows = [{"nll_sum": float(n), "reference_tokens": 10, "rouge_l": float(r)} for n, r in zip(nll, rouge)]
        return {"label": label, "keep_fraction": 0.2, "allocation": allocation, "per_sample": rows, "scorer": scorer,
                "sink": sink}

    base = rng.uniform(20, 30, size=40)
    rouge = rng.uniform(0.3, 0.6, size=40)
    tied = rng.normal(0, 0.01, size=40)
    results = [
        result("tova", "uniform", base, rouge, scorer="last-query"),
        result("window+uniform", "uniform", base + 2.0, rouge - 0.1, sink=4),   # clearly worse than the others
        result("snapkv", "uniform", base + 2.0, rouge - 0.1),
        result("window+sensitivity", "sensitivity", base + 0.5, rouge - 0.02, sink=4),  # better than uniform lengths
        result("tuned", "profile", base + tied, rouge + tied),           # no sure loss against anyone
    ]
    got = tune_targets({"continuation": results}, resamples=500, seed=0)
    assert got["tuned"]["cells"] == 6 and got["tuned"]["significant_losses"] == 0 and got["tuned"]["met"] is True
    # against the same scorer's uniform row with the nearest sink (window+uniform, 4 sinks; not SnapKV's 0)
    assert {(r["b"], tuple(r["sinks"])) for r in got["sensitivity"]["rows"]} == {("window+uniform", (4, 4))}
    assert got["sensitivity"]["significant_wins"] == [["window+sensitivity", "continuation"]]
    assert got["sensitivity"]["met"] is True
    worse = [result("tova", "uniform", base, rouge), result("tuned", "profile", base + 3.0, rouge - 0.2)]
    lost = tune_targets({"continuation": worse}, resamples=500, seed=0)
    assert lost["tuned"]["significant_losses"] == 2 and lost["tuned"]["met"] is False
    assert lost["sensitivity"]["met"] is None  # nothing to compare
