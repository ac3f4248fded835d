"""PrefixKVCache: compaction, the decode rule, padding, and generate for every method."""
import pytest
import torch
from conftest import tiny_llama

from prefixkv.cache import PrefixKVCache
from prefixkv.policies import METHODS
from prefixkv.profile import Fingerprint, LayerKeep, RetentionProfile


def prompt(n=40, seed=0, batch=1):
    return torch.randint(3, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


def make_profile(model, fractions, kf=0.25, sink=2, scorer="accumulated"):
    return RetentionProfile(Fingerprint.of(model.config), sink, {kf: LayerKeep(list(fractions), [0.0] * len(fractions))}, scorer=scorer)


@torch.no_grad()
def test_compaction_equals_manual_gather(tiny_model):
    ids = prompt(40)
    full = PrefixKVCache(method="full", keep_fraction=1.0, record=["accumulated"])
    tiny_model(input_ids=ids, past_key_values=full)
    scores = full.recorded_scores()["accumulated"][:, 0]  # (layers, 40)
    cache = PrefixKVCache(method="h2o", keep_fraction=0.25, sink=2)
    tiny_model(input_ids=ids, past_key_values=cache)
    cache.compress()
    for layer in range(3):
        s = scores[layer].clone()
        s[:2] = float("inf")
        s[-1] = float("inf")
        keep = torch.sort(torch.argsort(s, descending=True, stable=True)[:10]).values  # round(0.25 * 40) = 10
        assert cache.layers[layer].positions[0].tolist() == keep.tolist()
        assert torch.equal(cache.layers[layer].keys, full.layers[layer].keys[:, :, keep])
        assert torch.equal(cache.layers[layer].values, full.layers[layer].values[:, :, keep])


@torch.no_grad()
def test_profile_lengths_per_layer(tiny_model):
    profile = make_profile(tiny_model, [0.5, 0.15, 0.1])
    cache = PrefixKVCache(profile, keep_fraction=0.25)
    tiny_model(input_ids=prompt(40), past_key_values=cache)
    assert cache.layer_lengths()[:, 0].tolist() == [20, 6, 4]  # round(f x 40)
    assert cache.kv_bytes() == (20 + 6 + 4) * 2 * 2 * 16 * 4  # entries x (K and V) x kv heads x head dim x fp32


@torch.no_grad()
def test_decode_sizes_follow_the_rule_step_by_step(tiny_model):
    ids = prompt(40)
    cache = PrefixKVCache(method="h2o", keep_fraction=0.25, sink=2, evict_distance=3)
    out = tiny_model(input_ids=ids, past_key_values=cache)
    prompt_positions = None
    for step in range(1, 13):
        token = out.logits[:, -1:].argmax(-1)
        out = tiny_model(input_ids=token, past_key_values=cache, position_ids=torch.tensor([[39 + step]]))
        if prompt_positions is None:
            prompt_positions = cache.layers[0].positions[0, :10].tolist()
        cap = max(10, int(0.25 * (40 + step) + 0.5))
        assert cache.layer_lengths()[:, 0].tolist() == [cap] * 3
    # evictions happen at rank 10 - 3 = 7: the first 7 kept prompt entries never move
    assert cache.layers[0].positions[0, :7].tolist() == prompt_positions[:7]
    assert cache.layers[0].positions[0, -1].item() == 40 + 11  # the newest token is always there


@torch.no_grad()
def test_streaming_keeps_sinks_and_recent_window(tiny_model):
    cache = PrefixKVCache(method="streaming", keep_fraction=0.25, sink=2)
    out = tiny_model(input_ids=prompt(40), past_key_values=cache)
    for step in range(1, 9):
        out = tiny_model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache)
    positions = cache.layers[1].positions[0].tolist()
    cap = int(0.25 * 48 + 0.5)
    assert positions == [0, 1] + list(range(48 - (cap - 2), 48))


@torch.no_grad()
def test_batch_with_padding_equals_batch_of_one(tiny_model):
    a, b = prompt(40, seed=1)[0], prompt(27, seed=2)[0]
    batch = torch.zeros(2, 40, dtype=torch.long)
    mask = torch.zeros(2, 40, dtype=torch.long)
    batch[0], mask[0] = a, 1
    batch[1, 13:], mask[1, 13:] = b, 1
    for method in ("h2o", "prefixkv-online", "snapkv"):
        together = tiny_model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                       past_key_values=PrefixKVCache(method=method, keep_fraction=0.3, sink=2))
        cache_b = PrefixKVCache(method=method, keep_fraction=0.3, sink=2)
        alone = tiny_model.generate(b[None], max_new_tokens=8, do_sample=False, past_key_values=cache_b)
        assert together[1, 40:].tolist() == alone[0, 27:].tolist(), method
        alone_a = tiny_model.generate(a[None], max_new_tokens=8, do_sample=False,
                                      past_key_values=PrefixKVCache(method=method, keep_fraction=0.3, sink=2))
        assert together[0, 40:].tolist() == alone_a[0, 40:].tolist(), method


@torch.no_grad()
def test_kept_positions_of_a_padded_row_match_batch_of_one(tiny_model):
    b = prompt(27, seed=2)
    batch = torch.cat([torch.zeros(1, 13, dtype=torch.long), b], dim=1)
    mask = torch.cat([torch.zeros(1, 13, dtype=torch.long), torch.ones_like(b)], dim=1)
    padded = PrefixKVCache(method="h2o", keep_fraction=0.3, sink=2)
    tiny_model(input_ids=batch, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0), past_key_values=padded)
    single = PrefixKVCache(method="h2o", keep_fraction=0.3, sink=2)
    tiny_model(input_ids=b, past_key_values=single)
    for p, s in zip(padded.kept_positions(), single.kept_positions()):
        assert [x for x in p[0].tolist() if x >= 0] == s[0].tolist()


@pytest.mark.parametrize("method", METHODS)
def test_generate_runs_for_every_method(tiny_model, method):
    profile = make_profile(tiny_model, [0.4, 0.2, 0.15]) if method == "prefixkv" else None
    cache = PrefixKVCache(profile, keep_fraction=0.25, method=method, sink=2)
    out = tiny_model.generate(prompt(40), max_new_tokens=6, do_sample=False, past_key_values=cache)
    assert out.shape == (1, 46)
    lengths = cache.layer_lengths()[:, 0]
    if method == "full":
        assert lengths.tolist() == [45] * 3  # the last token is produced, not yet cached
    else:
        assert int(lengths.sum()) <= 3 * 45 * 0.4


@torch.no_grad()
def test_online_allocation_varies_by_layer_with_exact_total(tiny_model):
    cache = PrefixKVCache(method="prefixkv-online", keep_fraction=0.25, sink=2)
    tiny_model(input_ids=prompt(40), past_key_values=cache)
    lengths = cache.layer_lengths()[:, 0]
    assert abs(int(lengths.sum()) - round(0.25 * 3 * 40)) <= 3  # per-layer rounding of the fractions


def test_needs_the_prefixkv_attention():
    model = tiny_llama(attn="sdpa")
    with pytest.raises(RuntimeError, match="prefixkv.enable"):
        model.generate(prompt(20), max_new_tokens=3, past_key_values=PrefixKVCache(method="h2o", keep_fraction=0.5))


def test_bad_arguments_name_the_fix(tiny_model):
    with pytest.raises(ValueError, match="keep_fraction"):
        PrefixKVCache(method="h2o", keep_fraction=0.0)
    with pytest.raises(ValueError, match="needs a retention profile"):
        PrefixKVCache(method="prefixkv", keep_fraction=0.2, allocation="profile")
    profile = make_profile(tiny_model, [0.4, 0.2, 0.15])
    with pytest.raises(ValueError, match="nearest"):
        PrefixKVCache(profile, keep_fraction=0.3)
    with pytest.raises(ValueError, match="calibrated with scorer 'accumulated'"):
        PrefixKVCache(profile, keep_fraction=0.25, scorer="last-query")
    PrefixKVCache(profile, keep_fraction=0.25, scorer="last-query", force_scorer=True)
    with pytest.raises(ValueError, match="unknown method"):
        PrefixKVCache(method="h3o")
