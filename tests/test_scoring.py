"""Scores from the block-wise prefixkv attention equal eager attention's, and each scorer's math."""
import pytest
import torch
from conftest import tiny_llama

from prefixkv.cache import PrefixKVCache
from prefixkv.scoring import (
    KeyNorm,
    LastQuery,
    Window,
    attention_with_scores,
    make_scorer,
)


def eager_mass(model, ids, mask, rows=None):
    """(layers, batch, S) from output_attentions: summed over (non-padded) query rows, mean over heads."""
    model.set_attn_implementation("eager")
    out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    masses = []
    for att in out.attentions:  # (batch, heads, S, S)
        w = att * mask[:, None, :, None].float()
        if rows is not None:
            w = w[:, :, -rows:]
        masses.append(w.sum(2).mean(1))
    return torch.stack(masses)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (8, 1)])
def test_blockwise_scores_equal_eager_attentions(heads, kv_heads):
    model = tiny_llama(layers=2, heads=heads, kv_heads=kv_heads)
    ids = torch.randint(3, 256, (2, 37), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # left padding
    cache = PrefixKVCache(method="full", keep_fraction=1.0, record=["accumulated", "last-query", Window(window=5, pool=1)], score_block=8)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, past_key_values=cache).logits
        recorded = cache.recorded_scores()
        expected = eager_mass(model, ids, mask)
        expected_last = eager_mass(model, ids, mask, rows=1)
        expected_window = eager_mass(model, ids, mask, rows=5)
        model.set_attn_implementation("sdpa")
        sdpa = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.allclose(recorded["accumulated"], expected, atol=1e-5)
    assert torch.allclose(recorded["last-query"], expected_last, atol=1e-5)
    assert torch.allclose(recorded["window(pool=1,window=5)"], expected_window, atol=1e-5)
    assert torch.allclose(plain[real], sdpa[real], atol=1e-4)  # the outputs are the model's own
    assert float(recorded["accumulated"][:, 1, :9].abs().max()) == 0.0  # padding gets no mass


def test_mass_sums_to_query_rows():
    q = torch.randn(1, 2, 10, 4)
    k, v = torch.randn(1, 1, 10, 4), torch.randn(1, 1, 10, 4)
    valid = torch.ones(1, 10, dtype=torch.bool)
    _, (all_rows, last3) = attention_with_scores(q, k, v, valid, 0.5, [10, 3], block=4)
    assert float(all_rows.sum()) == pytest.approx(10.0, rel=1e-5)  # each row's probabilities sum to 1
    assert float(last3.sum()) == pytest.approx(3.0, rel=1e-5)
    assert float(all_rows[0, 0]) >= 1.0  # the first key is seen by every row, alone by row 0


def test_window_pooling_by_hand():
    mass = torch.tensor([[0.0, 3.0, 0.0, 0.0, 6.0]])
    pooled = Window(window=2, pool=3).from_attention(mass)
    assert pooled.tolist() == [[1.5, 1.0, 1.0, 2.0, 3.0]]  # edges average over the keys that exist


def test_window_pooling_ignores_left_padding():
    """A left-padded row scores as it does alone: padding columns are not neighbours.  (Before,
    the first real keys of a padded row averaged zeros from the padding, so batched evaluation
    differed from one prompt at a time wherever fewer than 2 sinks protected them.)"""
    mass = torch.tensor([[0.0, 3.0, 0.0, 0.0, 6.0]])
    padded = torch.cat([torch.zeros(1, 2), mass], dim=-1)
    valid = torch.tensor([[False, False, True, True, True, True, True]])
    got = Window(window=2, pool=3).from_attention(padded, valid)
    assert got.tolist() == [[0.0, 0.0, 1.5, 1.0, 1.0, 2.0, 3.0]]
    alone = Window(window=2, pool=3).from_attention(mass, torch.ones(1, 5, dtype=torch.bool))
    assert alone.tolist() == [[1.5, 1.0, 1.0, 2.0, 3.0]]


def test_key_norm_prefers_small_keys():
    keys = torch.zeros(1, 2, 3, 2)
    keys[0, :, 0] = torch.tensor([3.0, 4.0])  # norm 5
    keys[0, :, 1] = torch.tensor([0.0, 1.0])  # norm 1
    keys[0, :, 2] = torch.tensor([0.0, 2.0])  # norm 2
    scores = KeyNorm().from_keys(keys, torch.ones(1, 3, dtype=torch.bool))
    assert scores.tolist() == [[0.0, 4.0, 3.0]]


def test_last_query_rows_and_unknown_scorer():
    assert LastQuery().query_rows(50) == 1
    assert make_scorer("window", window=16).query_rows(10) == 10
    with pytest.raises(ValueError, match="unknown scorer"):
        make_scorer("attention-ish")


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
def test_unpadded_prefill_fast_path_equals_eager_attentions(heads, kv_heads, monkeypatch):
    """Without padding the output comes from PyTorch's fused causal kernel and the mass from
    exp(logit - row log-sum-exp) over the visible keys only: same numbers as eager."""
    import prefixkv.scoring as scoring

    calls = []
    fused = scoring.causal_flash
    monkeypatch.setattr(scoring, "causal_flash", lambda *a: calls.append(1) or fused(*a))
    model = tiny_llama(layers=2, heads=heads, kv_heads=kv_heads)
    ids = torch.randint(3, 256, (2, 45), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    cache = PrefixKVCache(method="full", keep_fraction=1.0, record=["accumulated", Window(window=7, pool=1), "key-norm"],
                          score_block=16)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, past_key_values=cache).logits
        recorded = cache.recorded_scores()
        expected, expected_window = eager_mass(model, ids, mask), eager_mass(model, ids, mask, rows=7)
        model.set_attn_implementation("sdpa")
        sdpa = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(recorded["accumulated"], expected, atol=1e-5)
    assert torch.allclose(recorded["window(pool=1,window=7)"], expected_window, atol=1e-5)
    assert torch.allclose(logits, sdpa, atol=1e-4)
    assert len(calls) == 2  # one fused prefill per layer
