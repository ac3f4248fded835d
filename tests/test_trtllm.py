"""TensorRT-LLM integration: the pure parts against hand values and ``prefixkv.compaction``;
the TensorRT-LLM classes only where TensorRT-LLM is installed."""
import importlib.util

import pytest
import torch

from prefixkv.compaction import compact, keep_counts
from prefixkv.defaults import PROTECT_LAST, SINK
from prefixkv.exporter import trtllm as L
from prefixkv.plugins.reference import width_bound
from prefixkv.serving.trtllm_repository import (
    attention_windows,
    write_trtllm_repository,
)

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


def test_windows_are_keep_counts():
    # the one window rule is the one count rule (at least 1), for the exporter and for deploy --trtllm
    for sink, last in [(SINK, PROTECT_LAST), (0, False), (0, True), (2, False), (7, True)]:
        for n in (1, 3, 8, 100, 1000, 4096):
            fractions = [0.0, 0.001, 0.05, 0.145, 0.2, 0.5, 0.999, 1.0]
            want = [max(1, int(keep_counts(torch.tensor([n]), f, sink, last)[0])) for f in fractions]
            assert L.max_attention_window_from_profile(fractions, n, sink, last) == want
            assert attention_windows(fractions, n, sink, last) == want
    assert L.keep_count(1000, 0.001) == keep_counts(torch.tensor([1000]), 0.001, SINK, PROTECT_LAST).item() == SINK + 1


def _engine(folder, fractions, sink, protect_last, context):
    """A manifest-complete engine folder (placeholder graphs) with these layer keep fractions."""
    from placeholders import engine_fields

    from prefixkv.engine_folder import write_manifest
    from prefixkv.profile import Fingerprint, LayerKeep, RetentionProfile

    folder.mkdir()
    for name in ("decoder.onnx", "compact.onnx", "tokenizer.json"):
        (folder / name).write_bytes(b"placeholder")
    fingerprint = Fingerprint("LlamaForCausalLM", len(fractions), 4, 2, 16, "0123456789abcdef")
    RetentionProfile(fingerprint, sink=sink, calibrated={0.2: LayerKeep(fractions, [0.0] * len(fractions))},
                     protect_last=protect_last).save(folder / "profile.json")
    write_manifest(folder, engine_fields(fingerprint, fractions, sink=sink, protect_last=protect_last, max_context=context))
    return folder


def test_repository_windows_are_the_exporters(tmp_path):
    """deploy --trtllm writes the exporter's windows, protected-entry clamp included."""
    yaml = pytest.importorskip("yaml")
    fractions = [0.001, 0.03, 0.145, 0.5, 1.0]  # a profile's layer keep fractions are in (0, 1]
    engine = _engine(tmp_path / "engine", fractions, sink=4, protect_last=False, context=100)
    model_dir = write_trtllm_repository(engine, tmp_path / "trt", reference_tokens=100)
    windows = yaml.safe_load((model_dir / "1" / "model.yaml").read_text())["kv_cache_config"]["max_attention_window"]
    # by hand, 100 tokens, 4 sinks, last token not protected (4 protected entries):
    #   0.001 -> round(0.1) = 0, clamped up to the 4 sinks -> 4
    #   0.03 -> round(3) = 3 -> 4
    #   0.145 -> 0.145 is 0.14499999582767487 in float32; x 100 rounds (float32) to 14.5 exactly,
    #            floor(14.5 + 0.5) = 15 (keep_counts' float32 rule, what the engine keeps)
    #   0.5 -> 50; 1.0 -> 100
    assert windows == [4, 4, 15, 50, 100]
    assert windows == L.max_attention_window_from_profile(fractions, 100, sink=4, protect_last=False)
    # The old serving rule, min(L, max(sink + 1, floor(f x L + 0.5))) in float64, ignored the
    # manifest's protect_last and rounded in float64: it wrote [5, 5, 14, 50, 100] (5 = sinks +
    # a last token that is not kept; 14 from 0.145 x 100 = 14.499999999999998 in float64).


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
                                  torch.ones(1, n, dtype=torch.bool), f, SINK, True)  # the defaults' sink, as L's
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
