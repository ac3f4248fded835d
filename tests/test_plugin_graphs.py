"""Whole-model plugin-mode graphs (the TensorRT path) on the tiny random Llama, on CPU.

The graphs are exported exactly as ``prefixkv build --backend tensorrt`` does; their PrefixKV
nodes are checked for what TensorRT's ONNX parser needs, and the graphs are *run* by onnx's
reference evaluator with the ops' PyTorch specification, against the PyTorch reference
(HF model + PrefixKVCache): logits, kept positions and greedy steps.  Building the engines
needs TensorRT and a GPU (tests/test_tensorrt.py).
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from test_export import FRACTIONS, KEEP, LAYERS, tiny_model_folder, tiny_profile

from prefixkv.exporter.onnx import graph_spec, io_names
from prefixkv.exporter.plugin_onnx import evaluator, export_plugin_graphs
from prefixkv.exporter.tensorrt import plugin_nodes
from prefixkv.plugins.reference import width_bound


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """(graph paths, model, profile, spec) exported once."""
    root = tmp_path_factory.mktemp("plugin")
    model, folder = tiny_model_folder(root)
    profile = tiny_profile(model)
    spec = graph_spec(model, profile, KEEP)
    return export_plugin_graphs(model, spec, root / "graphs"), model, profile, spec, folder


@pytest.fixture(scope="module")
def reference(plugin):
    from prefixkv.engines.torch import TorchRunner

    _, model, profile, _, folder = plugin
    return TorchRunner(model, folder, profile=profile, keep_fraction=KEEP, method="prefixkv")


def _trim(positions: np.ndarray, valid: np.ndarray):
    used = valid.astype(bool).any(0)
    first = int(np.argmax(used)) if used.any() else valid.shape[1]
    return positions[:, first:], valid[:, first:]


def test_nodes_carry_what_the_tensorrt_parser_needs(plugin):
    paths, _, _, spec, _ = plugin
    for graph, ops in (("prefill", {"PrefixKVPrefillScores", "PrefixKVSelect"}), ("decode", {"PrefixKVDecode"})):
        onnx.checker.check_model(str(paths[graph]))
        model = onnx.load(str(paths[graph]), load_external_data=False)
        assert [i.name for i in model.graph.input] == io_names(LAYERS)[graph]["inputs"]
        assert [o.name for o in model.graph.output] == io_names(LAYERS)[graph]["outputs"]
        nodes = plugin_nodes(model)  # raises on a TopK node or missing namespace/version
        assert {n["op_type"] for n in nodes} == ops
        for op in ops:
            assert sorted(n["layer"] for n in nodes if n["op_type"] == op) == list(range(LAYERS))
        assert all(n["aot"] == 1 and n["plugin_namespace"] == "prefixkv" for n in nodes)
        assert any(o.domain == "prefixkv" for o in model.opset_import)
    prefill = plugin_nodes(onnx.load(str(paths["prefill"]), load_external_data=False))
    selects = sorted((n for n in prefill if n["op_type"] == "PrefixKVSelect"), key=lambda n: n["layer"])
    assert [n["keep_fraction"] for n in selects] == pytest.approx(FRACTIONS, abs=1e-7)  # the profile, baked in
    assert all(n["sink"] == spec.sink and n["protect_last"] == 1 for n in selects)
    scores = [n for n in prefill if n["op_type"] == "PrefixKVPrefillScores"]
    assert all(n["scaling"] == pytest.approx(spec.head_dim ** -0.5) for n in scores)


@torch.no_grad()
def test_prefill_graph_runs_like_the_reference(plugin, reference):
    paths, *_ = plugin
    rng = np.random.default_rng(0)
    ids, mask = reference.pad([list(rng.integers(3, 256, n)) for n in (37, 20)])
    out = evaluator(paths["prefill"]).run(None, {"input_ids": ids, "attention_mask": mask})
    logits, state = reference.prefill(ids, mask)
    np.testing.assert_allclose(out[0], logits, atol=1e-4, rtol=1e-4)
    for l, layer in enumerate(state.cache.layers):
        key, value, positions, valid = out[1 + 4 * l : 5 + 4 * l]
        assert positions.shape[1] == width_bound(ids.shape[1], FRACTIONS[l], 4)  # the static bound
        got_positions, got_valid = _trim(positions, valid)
        np.testing.assert_array_equal(got_positions, layer.positions.numpy())
        np.testing.assert_array_equal(got_valid, layer.valid.numpy())
        first = positions.shape[1] - got_positions.shape[1]
        kept = layer.valid.numpy()
        for got_cache, ref_cache in ((key, layer.keys), (value, layer.values)):  # kept slots only
            np.testing.assert_allclose(got_cache[:, :, first:].transpose(0, 2, 1, 3)[kept],
                                       ref_cache.numpy().transpose(0, 2, 1, 3)[kept], atol=1e-5)


@torch.no_grad()
def test_decode_graph_follows_the_reference_step_by_step(plugin, reference):
    """Plugin prefill, then greedy steps through the plugin decode graph, in lockstep with the
    reference: same argmax and same kept positions (the decode-phase eviction) every step."""
    paths, *_ = plugin
    rng = np.random.default_rng(1)
    ids, mask = reference.pad([list(rng.integers(3, 256, n)) for n in (30, 18)])
    prefill, decode = evaluator(paths["prefill"]), evaluator(paths["decode"])
    out = prefill.run(None, {"input_ids": ids, "attention_mask": mask})
    logits, state = reference.prefill(ids, mask)
    lengths = mask.sum(-1)
    position = lengths.copy()
    past_names = io_names(LAYERS)["decode"]["inputs"][3:]
    for step in range(6):
        np.testing.assert_allclose(out[0], logits, atol=1e-4, rtol=1e-4)
        for l, ref_positions in enumerate(reference.kept_positions(state)):
            got, _ = _trim(out[3 + 4 * l], out[4 + 4 * l])
            np.testing.assert_array_equal(got, ref_positions, err_msg=f"step {step} layer {l}")
        token = logits.argmax(-1)
        feeds = {"input_ids": token.reshape(-1, 1).astype(np.int64), "position_ids": position.reshape(-1, 1),
                 "prompt_lengths": lengths, **dict(zip(past_names, out[1:]))}
        out = decode.run(None, feeds)
        logits, state = reference.decode(state, token)
        position = position + 1


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "prefixkv.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_build_tensorrt_onnx_only_writes_a_plugin_engine_folder(tmp_path):
    model, folder = tiny_model_folder(tmp_path)
    profile_path = tmp_path / "profile.json"
    tiny_profile(model).save(profile_path)
    out = tmp_path / "trt-engine"
    done = _cli("build", "--model", str(folder), "--profile", str(profile_path), "--keep", str(KEEP),
                "--output", str(out), "--backend", "tensorrt", "--onnx-only")
    assert done.returncode == 0, done.stderr
    assert "validation skipped" in done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend"] == "tensorrt" and manifest["tensorrt"] is None
    assert manifest["layer_keep_fractions"] == pytest.approx(FRACTIONS)
    assert plugin_nodes(onnx.load(str(out / "prefill.onnx"), load_external_data=False))

    from prefixkv.engines.onnxruntime import OnnxRuntimeRunner

    with pytest.raises(ValueError, match="built for tensorrt"):
        OnnxRuntimeRunner(out)
    if not torch.cuda.is_available():
        ran = _cli("generate", str(out), "--prompt", "hello", "--max-new-tokens", "2")
        assert ran.returncode == 2 and ran.stderr.startswith("error:") and "TensorRT" in ran.stderr, ran.stderr


def test_tensorrt_build_refuses_early_without_tensorrt_or_with_another_scorer(tmp_path):
    try:
        import tensorrt  # noqa: F401
        has_trt = True
    except ImportError:
        has_trt = False
    model, folder = tiny_model_folder(tmp_path)
    profile = tiny_profile(model)
    profile.save(tmp_path / "profile.json")
    out = tmp_path / "engine"
    if not has_trt:
        done = _cli("build", "--model", str(folder), "--profile", str(tmp_path / "profile.json"), "--keep", str(KEEP),
                    "--output", str(out), "--backend", "tensorrt")
        assert done.returncode == 2 and "--onnx-only" in done.stderr and "TensorRT" in done.stderr, done.stderr
        assert not out.exists() and not list(tmp_path.glob(".engine.partial-*"))
    windowed = profile.__class__.from_dict({**profile.to_dict(), "scorer": {"name": "window", "params": {"window": 8, "pool": 5}}})
    windowed.save(tmp_path / "window.json")
    done = _cli("build", "--model", str(folder), "--profile", str(tmp_path / "window.json"), "--keep", str(KEEP),
                "--output", str(out), "--backend", "tensorrt", "--onnx-only")
    assert done.returncode == 2 and "accumulated" in done.stderr, done.stderr
    assert not out.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (and TensorRT >= 10.8 with tensorrt.plugin)")
def test_tensorrt_engine_validates_against_the_reference(tmp_path):
    """The whole pipeline on a GPU: plugin graphs -> TensorRT engines (fp32, AOT Triton kernels)
    -> ``validate`` with the TensorRT runner against the PyTorch reference."""
    pytest.importorskip("tensorrt", reason="needs TensorRT: pip install tensorrt")
    pytest.importorskip("triton", reason="the plugins compile Triton kernels: pip install triton")
    from test_export import SMALL_VALIDATION

    from prefixkv.defaults import TensorRTProfile
    from prefixkv.engines import load_runner
    from prefixkv.engines.validate import ValidationConfig
    from prefixkv.pipeline import BuildConfig, build_engine

    model, folder = tiny_model_folder(tmp_path)
    config = BuildConfig(str(folder), tmp_path / "trt", KEEP, profile=tiny_profile(model), backend="tensorrt",
                         tensorrt=TensorRTProfile(precision="fp32", max_seq=512), validation=ValidationConfig(**SMALL_VALIDATION))
    result = build_engine(config, model=model, log=print)
    assert result.manifest["tensorrt"]["engines"] == {"prefill": "tensorrt/prefill.engine", "decode": "tensorrt/decode.engine"}
    assert result.passed, json.dumps(result.validation, indent=1)[:4000]
    assert load_runner(result.path).name == "tensorrt"
