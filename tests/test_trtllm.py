"""TensorRT-LLM integration: the pure parts against hand values and ``prefixkv.compaction``;
the TensorRT-LLM classes only where TensorRT-LLM is installed."""
import importlib.util

import pytest
import torch

from prefixkv.compaction import compact
from prefixkv.exporter import trtllm as L
from prefixkv.plugins.reference import width_bound

HAS_TRTLLM = importlib.util.find_spec("tensorrt_llm") is not None


def test_max_attention_window_by_hand():
    # 25% / 50% / 100% of 100 tokens; 0% keeps the 4 sinks and the last token
    assert L.max_attention_window_from_profile([0.25, 0.5, 1.0, 0.0], 100, sink=4) == [25, 50, 100, 5]
    assert L.max_attention_window_from_profile([0.0], 100, sink=0, protect_last=False) == [1]  # never 0
    assert L.max_attention_window_from_profile([0.125], 4096) == [512]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        L.max_attention_window_from_profile([0.2, 1.3], 100)
    with pytest.raises(ValueError, match="empty"):
        L.max_attention_window_from_profile([], 100)
    with pytest.raises(ValueError, match="max_seq_len"):
        L.max_attention_window_from_profile([0.5], 0)


@pytest.mark.parametrize("fraction,sink,protect_last", [(0.3, 4, True), (0.5, 0, False), (0.05, 2, True)])
def test_top_positions_match_compaction(fraction, sink, protect_last):
    torch.manual_seed(0)
    for n in (1, 5, 17, 64):
        scores = torch.randint(0, 4, (n,)).float()  # ties included
        count = L.keep_count(n, fraction, sink, protect_last)
        got = L.top_positions(scores, count, sink, protect_last)
        k = torch.randn(1, 1, n, 2)
        _, _, positions, kept = compact(k, k, scores[None], torch.ones(1, n, dtype=torch.bool), fraction, sink, protect_last)
        assert torch.equal(got, positions[kept])
        assert bool((got[1:] > got[:-1]).all())  # sorted, as sparse_kv_predict must return


def test_shared_width_and_layer_masks():
    torch.manual_seed(1)
    fractions = [0.1, 0.4, 0.25]
    n = 40
    width = L.shared_width(n, fractions)
    assert width == max(L.keep_count(n, f) for f in fractions) == 16
    for f in fractions:
        importance = torch.rand(n)
        positions = L.top_positions(importance, width)
        mask = L.layer_keep_masks(positions, importance, f)
        assert int(mask.sum()) == L.keep_count(n, f)  # the layer's own budget, a subset of the shared W
        _, _, own, kept = compact(torch.zeros(1, 1, n, 1), torch.zeros(1, 1, n, 1), importance[None],
                                  torch.ones(1, n, dtype=torch.bool), f, 4, True)
        assert torch.equal(positions[mask], own[kept])


def test_flatten_sparse_kv_indices():
    indices, offsets = L.flatten_sparse_kv_indices([torch.tensor([0, 3, 7]), torch.tensor([1, 2])], num_kv_heads=2)
    assert indices.dtype == torch.int32 and offsets.dtype == torch.int32
    assert indices.tolist() == [[0, 3, 7, 1, 2], [0, 3, 7, 1, 2]]
    assert offsets.tolist() == [0, 3, 5]
    with pytest.raises(ValueError, match="increasing"):
        L.flatten_sparse_kv_indices([torch.tensor([3, 1])], 1)


def test_loose_width_bounds_width_bound():
    for fraction, sink, last in [(0.2, 4, True), (0.0, 0, False), (1.0, 4, True), (0.33, 2, False)]:
        for s in range(0, 3000, 7):
            assert L.loose_width(s, fraction, sink, last) >= width_bound(s, fraction, sink, last)


def test_dispatch_patch_names_the_algorithm():
    assert '"prefixkv"' in L.DISPATCH_PATCH and L.ALGORITHM == "prefixkv"


@pytest.mark.skipif(HAS_TRTLLM, reason="TensorRT-LLM is installed: the missing-package message cannot be shown")
def test_clear_error_without_trtllm():
    for make in (L.pytorch_backend_classes, L.python_plugins, lambda: L.kv_cache_config([0.5], 100)):
        with pytest.raises(RuntimeError, match="TensorRT-LLM is not installed: pip install tensorrt_llm"):
            make()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_trtllm_classes():
    pytest.importorskip("tensorrt_llm", reason="needs TensorRT-LLM: pip install tensorrt_llm")
    config_cls, attention_cls, metadata_cls = L.pytorch_backend_classes()
    config = config_cls(layer_keep_fractions=[0.2, 0.3], sink=4)
    assert config.algorithm == "prefixkv" and config.supports_backend("pytorch")
    assert hasattr(attention_cls, "sparse_kv_predict") and attention_cls.Metadata is metadata_cls
    kv = L.kv_cache_config([0.2, 0.3], 1000)
    assert list(kv.max_attention_window) == [200, 300]
