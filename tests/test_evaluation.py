"""prefixkv.evaluation on a tiny seeded random Llama (token ids, no tokenizer) + one slow SmolLM2 run."""
from __future__ import annotations

import math

import pytest
import torch

from prefixkv.cache import PrefixKVCache
from prefixkv.evaluation import (
    EvalSettings,
    MethodConfig,
    evaluate,
    evaluate_many,
    fork,
    greedy,
    prefill,
    rouge_l,
    teacher_force,
)


def _samples(n=3, seed=1, vocab=256):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(3, vocab, (40 + 7 * i,), generator=g).tolist()
        ref = torch.randint(3, vocab, (6 + i,), generator=g).tolist()
        out.append({"prompt_ids": prompt, "reference_ids": ref})
    return out


def _plain_nll(model, prompt, ref):
    """Summed NLL of ``ref`` after ``prompt`` from one plain forward, no cache."""
    ids = torch.tensor([prompt + ref])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0].float()
    logp = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)
    return float(-logp.gather(-1, torch.tensor(ref).view(-1, 1)).sum())


def test_full_cache_ppl_equals_plain_forward(tiny_model):
    samples = _samples()
    result = evaluate(tiny_model, None, samples, MethodConfig("full"), 1.0, EvalSettings(batch_size=3, max_new_tokens=4, progress=False))
    for row, s in zip(result["per_sample"], samples):
        expected = _plain_nll(tiny_model, s["prompt_ids"], s["reference_ids"])
        assert row["nll_sum"] == pytest.approx(expected, rel=1e-4, abs=1e-4)
        assert row["ppl"] == pytest.approx(math.exp(expected / len(s["reference_ids"])), rel=1e-4)
    total = sum(_plain_nll(tiny_model, s["prompt_ids"], s["reference_ids"]) for s in samples)
    tokens = sum(len(s["reference_ids"]) for s in samples)
    assert result["ppl"] == pytest.approx(math.exp(total / tokens), rel=1e-4)
    assert result["rouge_l"] == 1.0
    assert result["kv_fraction"] == pytest.approx(1.0)


def test_uniform_distribution_ppl_is_vocab_size(tiny_model):
    """Zero output weights: every next token has probability 1/256, so PPL is 256 for any method."""
    with torch.no_grad():
        tiny_model.lm_head.weight.zero_()
    for method in ("full", "h2o", "streaming"):
        result = evaluate(tiny_model, None, _samples(2), MethodConfig(method), 0.3, EvalSettings(batch_size=2, generate=False, progress=False))
        assert result["ppl"] == pytest.approx(256.0, rel=1e-5)


@pytest.mark.parametrize("method", ["h2o", "snapkv", "streaming", "prefixkv-online"])
def test_fork_matches_a_cache_of_that_method(tiny_model, method):
    """One recorded prefill + fork gives what PrefixKVCache(method=...) gives on its own prefill."""
    samples = _samples(3)
    result = evaluate(tiny_model, None, samples, MethodConfig(method), 0.4, EvalSettings(batch_size=3, max_new_tokens=6, progress=False))
    for row, s in zip(result["per_sample"], samples):
        prompt = torch.tensor([s["prompt_ids"]])
        mask = torch.ones_like(prompt)
        cache = PrefixKVCache(method=method, keep_fraction=0.4)
        with torch.no_grad():
            logits = tiny_model(input_ids=prompt, attention_mask=mask, past_key_values=cache, logits_to_keep=1).logits[:, -1]
        cache.compress()
        nll = teacher_force(tiny_model, cache, logits.float(), mask, [s["reference_ids"]], 0)
        assert row["nll_sum"] == pytest.approx(float(nll[0]), rel=1e-4, abs=1e-4)
        # greedy text equals transformers' generate with the same cache method
        ref_cache = PrefixKVCache(method=method, keep_fraction=0.4)
        out = tiny_model.generate(prompt, attention_mask=mask, past_key_values=ref_cache, max_new_tokens=6,
                                  do_sample=False, pad_token_id=0, eos_token_id=2)
        expected = out[0, prompt.shape[1]:].tolist()
        expected = expected[: expected.index(2)] if 2 in expected else expected
        assert row["generation_ids"] == expected


def test_left_padding_does_not_change_results(tiny_model):
    samples = _samples(3)
    one = evaluate(tiny_model, None, samples, MethodConfig("h2o"), 0.3, EvalSettings(batch_size=1, max_new_tokens=5, progress=False))
    three = evaluate(tiny_model, None, samples, MethodConfig("h2o"), 0.3, EvalSettings(batch_size=3, max_new_tokens=5, progress=False))
    for a, b in zip(one["per_sample"], three["per_sample"]):
        assert a["nll_sum"] == pytest.approx(b["nll_sum"], rel=1e-4, abs=1e-4)
        assert a["generation_ids"] == b["generation_ids"]
        assert a["kv_fraction"] == pytest.approx(b["kv_fraction"])


def test_kept_fraction_and_budget_during_decoding(tiny_model):
    samples = [{"prompt_ids": list(range(3, 103)), "reference_ids": list(range(5, 25))}]
    result = evaluate(tiny_model, None, samples, MethodConfig("snapkv"), 0.2, EvalSettings(generate=False, progress=False))
    assert result["kv_fraction"] == pytest.approx(0.2)  # round(0.2 x 100) entries per layer
    assert result["kv_fraction_end"] == pytest.approx(0.2, abs=0.02)  # budget kept while teacher forcing
    assert result["layer_keep_fractions"] == [0.2] * 3


def test_without_reference_the_full_generation_is_scored(tiny_model):
    samples = [{"prompt_ids": s["prompt_ids"]} for s in _samples(2)]
    full = evaluate(tiny_model, None, samples, MethodConfig("full"), 1.0, EvalSettings(max_new_tokens=5, progress=False))
    h2o = evaluate(tiny_model, None, samples, MethodConfig("h2o"), 0.5, EvalSettings(max_new_tokens=5, progress=False), full_generations=full)
    for f, h in zip(full["per_sample"], h2o["per_sample"]):
        assert f["reference_source"] == h["reference_source"] == "full-generation"
        assert h["reference_tokens"] == max(len(f["generation_ids"]), 1)


def test_evaluate_many_shares_one_prefill_across_settings(tiny_model):
    from prefixkv.calibration import calibrate_profile

    samples = _samples(2)
    profile = calibrate_profile(tiny_model, [s["prompt_ids"] for s in _samples(3, seed=5)], [0.2, 0.5], progress=False)
    configs = [MethodConfig("full"), MethodConfig("h2o"), MethodConfig("prefixkv"), MethodConfig(scorer="window", allocation="online"),
               MethodConfig(scorer="last-query", allocation="pyramid", label="lq-pyr")]
    results = evaluate_many(tiny_model, None, samples, configs, [0.2, 0.5], EvalSettings(max_new_tokens=3, batch_size=2, progress=False), profile=profile)
    labels = [(r["label"], r["keep_fraction"]) for r in results]
    assert labels == [("full", 1.0), ("h2o", 0.2), ("h2o", 0.5), ("prefixkv", 0.2), ("prefixkv", 0.5),
                      ("window+online", 0.2), ("window+online", 0.5), ("lq-pyr", 0.2), ("lq-pyr", 0.5)]
    for r in results:
        assert r["samples"] == 2 and len(r["per_sample"]) == 2
        assert 0 <= r["rouge_l"] <= 1 and r["ppl"] > 1
        assert r["kv_fraction"] == pytest.approx(r["keep_fraction"], abs=0.05)
    prefix = results[3]
    assert prefix["allocation"] == "profile" and prefix["scorer"] == "accumulated"
    assert prefix["layer_keep_fractions"] == pytest.approx(profile.layer_fractions(0.2), abs=0.03)


def test_fork_refuses_a_compressed_cache(tiny_model):
    base, _, _ = prefill(tiny_model, [[5, 6, 7, 8, 9, 10]], [], 0)
    base.compress()
    from prefixkv.policies import make_method

    with pytest.raises(RuntimeError):
        fork(base, make_method("full"), 1.0)


def test_greedy_stops_at_eos(tiny_model):
    base, first, mask = prefill(tiny_model, [[5, 6, 7, 8]], [], 0)
    from prefixkv.policies import make_method

    cache = fork(base, make_method("full"), 1.0)
    forced_eos = int(first.argmax(-1))
    assert greedy(tiny_model, cache, first, mask, 5, [forced_eos], 0) == [[]]


def test_rouge_l():
    assert rouge_l("a b c", "a b c") == 1.0
    assert rouge_l("a b c", "a b d") == pytest.approx(2 / 3)
    assert rouge_l("", "") == 1.0
    assert rouge_l("x", "") == 0.0


@pytest.mark.slow
def test_every_method_on_smollm2(smollm2):
    from prefixkv.calibration import calibrate_profile
    from prefixkv.data import builtin_samples
    from prefixkv.policies import METHODS

    model, tokenizer = smollm2
    samples = builtin_samples(tokenizer, "evaluation", n=2, tokens=96, reference_tokens=12)
    calib = builtin_samples(tokenizer, "calibration", n=2, tokens=96, reference_tokens=0)
    ids = [tokenizer.encode(s["prompt"], add_special_tokens=False) for s in calib]
    profile = calibrate_profile(model, ids, [0.2], progress=False)
    configs = [MethodConfig(m) for m in METHODS]
    results = evaluate_many(model, tokenizer, samples, configs, [0.2], EvalSettings(max_new_tokens=8, batch_size=2, progress=False), profile=profile)
    by = {r["method"]: r for r in results}
    assert set(by) == set(METHODS)
    assert by["full"]["rouge_l"] == 1.0
    assert 1 < by["full"]["ppl"] < 100
    for name, r in by.items():
        assert math.isfinite(r["ppl"]) and 0 <= r["rouge_l"] <= 1
        if name != "full":
            assert r["kv_fraction"] == pytest.approx(0.2, abs=0.02)
            assert r["ppl"] >= by["full"]["ppl"] * 0.9


def test_grid_profiles_match_calibrate(tiny_model):
    """The sweep's one-pass profiles equal calibrate()'s for the same floor and blend."""
    from prefixkv.bench.quality import grid_profiles
    from prefixkv.calibration import calibrate
    from prefixkv.search import SearchSettings

    samples = [s["prompt_ids"] for s in _samples(3, seed=9)]
    grid = [(0.0, 1.0), (0.5, 0.75)]
    got = grid_profiles(tiny_model, samples, [0.2, 0.5], ["accumulated", "window"], grid)
    for floor, blend in grid:
        ref = calibrate(tiny_model, samples, [0.2, 0.5], scorers=("accumulated", "window"),
                        search=SearchSettings(min_layer_keep=floor, blend=blend), progress=False)
        for key, profile in ref.profiles.items():
            mine = got[(key, floor, blend)]
            assert (mine.min_layer_keep, mine.blend, mine.scorer) == (floor, blend, profile.scorer)
            for kf in (0.2, 0.5):
                assert mine.layer_fractions(kf) == pytest.approx(profile.layer_fractions(kf), abs=1e-6)


def test_bench_quality_end_to_end(tmp_path):
    """The whole benchmark on a tiny random model with SmolLM2's tokenizer: files and figures are there."""
    import json

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from prefixkv.cli import main
    from prefixkv.models import resolve

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         pad_token_id=2, bos_token_id=1, eos_token_id=2)
    folder = tmp_path / "tiny"
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve("smollm2-135m")).save_pretrained(folder)
    out = tmp_path / "out"
    code = main(["bench", "quality", "--model", str(folder), "--samples", "2", "--prompt-tokens", "64", "--reference-tokens", "4",
                 "--max-new-tokens", "3", "--retrieval-samples", "2", "--lengths", "128,160", "--keep", "0.2,0.5",
                 "--calibration-samples", "2", "--calibration-tokens", "64", "--sweep-floor-blend", "--floors", "0,0.5",
                 "--blends", "1", "--sweep-scorers", "accumulated", "--sweep-samples", "2", "--resamples", "50",
                 "--pairs", "window+profile", "--variants", "unprotected", "--threads", "1", "--output", str(out), "--quiet"])
    assert code == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["command"].startswith("prefixkv bench quality --model")
    cont = doc["results"]["continuation"]
    labels = {r["label"] for r in cont}
    assert {"full", "h2o", "prefixkv", "streaming", "window+profile"} <= labels
    variants = {"accumulated+profile [curve='unprotected', sink=4]", "accumulated+online [curve='unprotected', sink=4]"}
    assert variants <= labels
    assert len(cont) == 1 + 10 * 2 + (1 if len(labels) == 12 else 0) * 2
    by_label = {r["label"]: r for r in cont}
    assert (by_label["prefixkv"]["sink"], by_label["prefixkv"]["curve"]) == (1, "all")  # the paper's settings
    assert (by_label["snapkv"]["sink"], by_label["streaming"]["sink"]) == (0, 4)  # each method's own
    assert all("sink" in r for task in doc["results"].values() for r in task)
    # the paper's settings against the unprotected rule, pair by pair, at each keep and on every metric
    rules = doc["rules"]
    assert {(r["a"], r["b"]) for r in rules} == {("prefixkv", "accumulated+profile [curve='unprotected', sink=4]"),
                                                ("prefixkv-online", "accumulated+online [curve='unprotected', sink=4]")}
    assert {(r["task"], r["keep"], r["metric"]) for r in rules} == {
        (t, k, m) for t, ms in (("continuation", ("ppl", "rouge_l")), ("retrieval", ("accuracy", "answer_ppl")))
        for k in (0.2, 0.5) for m in ms}
    retr = doc["results"]["retrieval"]
    assert {r["length"] for r in retr} == {128, 160}
    assert all("accuracy" in r and "answer_ppl" in r for r in retr)
    assert len(doc["sweep"]["rows"]) == 2  # (floor, blend) settings x keep 0.2 (the sweep keeps 0.1 and 0.2 only)
    assert doc["targets"]["issue7"]["best_pair"] is not None
    assert doc["targets"]["issue2"]["ppl_increase_at_0.2"]["paper"] == 0.49
    md = (out / "quality.md").read_text()
    assert "## Continuation" in md and "## Retrieval" in md and "Target (issue 7)" in md
    assert "## The paper's search settings against the variants" in md
    for name in ("continuation.png", "retrieval.png", "retrieval_pooled.png", "calibration/lorenz_accumulated.png",
                 "calibration/keep_fractions_window-pool5-window8.png", "profiles/accumulated.json"):
        assert (out / name).is_file(), name
