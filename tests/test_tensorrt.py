"""TensorRT: the plugin-mode ONNX graph (checked, read back, executed with reference ops),
the plugin shape contract, the builder's profile, and (GPU only) the engine itself."""
import importlib.util

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from prefixkv.compaction import keep_counts
from prefixkv.engines.tensorrt import past_names
from prefixkv.exporter import tensorrt as T
from prefixkv.exporter.plugin_onnx import reference_ops
from prefixkv.plugins import reference as R
from prefixkv.plugins.trt import (
    DECODE,
    NAMESPACE,
    PREFILL,
    SELECT,
    VERSION,
    symbolic_width,
)

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


# ---------------------------------------------------------------------------- the plugin contract in numpy
OPS = reference_ops()  # the plugins' contract in numpy, from the PyTorch specification


def toy_inputs(b=2, h=4, hkv=2, s=14, d=16, pads=(0, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    feeds = {"q": torch.randn(b, h, s, d, generator=g), "k": torch.randn(b, hkv, s, d, generator=g),
             "v": torch.randn(b, hkv, s, d, generator=g), "q_new": torch.randn(b, h, 1, d, generator=g),
             "k_new": torch.randn(b, hkv, 1, d, generator=g), "v_new": torch.randn(b, hkv, 1, d, generator=g)}
    mask = torch.ones(b, s, dtype=torch.int64)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    feeds["attention_mask"] = mask
    return feeds


# ---------------------------------------------------------------------------- the graph
def test_plugin_graph_checks_and_reads_back():
    model = T.build_plugin_layer_graph(heads=4, kv_heads=2, head_dim=16, keep_fraction=0.3, sink=3, layer=7)
    onnx.checker.check_model(model, full_check=True)
    nodes = T.plugin_nodes(model)
    assert [n["op_type"] for n in nodes] == [PREFILL, SELECT, DECODE]
    for n in nodes:
        assert n["plugin_namespace"] == NAMESPACE == "prefixkv" and n["plugin_version"] == VERSION == "1"
        assert n["aot"] == 1
        assert n["layer"] == 7
    select = nodes[1]
    assert select["keep_fraction"] == pytest.approx(0.3) and select["sink"] == 3 and select["protect_last"] == 1
    assert nodes[0]["scaling"] == pytest.approx(16 ** -0.5) and nodes[2]["scaling"] == pytest.approx(16 ** -0.5)
    assert not any(n.op_type == "TopK" for n in model.graph.node)
    assert {o.domain for o in model.opset_import} == {"", NAMESPACE}


def test_plugin_graph_computes_the_reference_layer():
    """Executed with numpy stand-ins for the plugins, the graph's wiring (casts, ReduceSum,
    attributes, the decode step's cache) reproduces the reference ops called directly."""
    model = T.build_plugin_layer_graph(heads=4, kv_heads=2, head_dim=16, keep_fraction=0.4, sink=2, dtype="float32")
    feeds = toy_inputs()
    got = dict(zip([o.name for o in model.graph.output],
                   ReferenceEvaluator(model, new_ops=OPS).run(None, {k: v.numpy() for k, v in feeds.items()})))
    valid = feeds["attention_mask"].bool()
    scaling = 16 ** -0.5
    out, importance = R.prefill_attention_with_scores(feeds["q"], feeds["k"], feeds["v"], valid, scaling)
    kk, vv, pos, kept = R.select_and_gather(feeds["k"], feeds["v"], importance, valid, 0.4, 2, True)
    np.testing.assert_allclose(got["attn_out"], out.numpy(), atol=1e-5)
    np.testing.assert_allclose(got["importance"], importance.numpy(), atol=1e-6)
    width = R.width_bound(14, 0.4, 2, True)
    assert got["positions"].shape == (2, width) and width >= pos.shape[1]
    assert (got["positions"][:, width - pos.shape[1]:] == pos.numpy()).all()
    assert (got["positions"][:, : width - pos.shape[1]] == -1).all()
    cache_valid = torch.cat([kept, torch.ones(2, 1, dtype=torch.bool)], 1)
    want = R.decode_attention(feeds["q_new"], torch.cat([kk, feeds["k_new"]], 2), torch.cat([vv, feeds["v_new"]], 2),
                              cache_valid, scaling)
    np.testing.assert_allclose(got["decode_out"], want.numpy(), atol=1e-5)


def _three_layer_graph():
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 2, "seq", 8]) for n in ("k", "v")]
    inputs += [helper.make_tensor_value_info("importance", TensorProto.FLOAT, ["batch", "seq"]),
               helper.make_tensor_value_info("valid", TensorProto.INT32, ["batch", "seq"])]
    nodes, outputs = [], []
    for layer in range(3):
        outs = [f"k{layer}", f"v{layer}", f"p{layer}", f"m{layer}"]
        nodes.append(T.plugin_node(SELECT, ["k", "v", "importance", "valid"], outs, f"select{layer}", layer,
                                   keep_fraction=0.5, sink=4))
        outputs.append(helper.make_tensor_value_info(f"p{layer}", TensorProto.INT32, ["batch", "w"]))
    graph = helper.make_graph(nodes, "three", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(NAMESPACE, 1)])


def test_per_layer_fractions_written_and_read_back():
    model = T.set_layer_fractions(_three_layer_graph(), [0.1, 0.35, 0.9])
    onnx.checker.check_model(model)
    model = onnx.load_from_string(model.SerializeToString())  # survives serialisation
    fractions = {n["layer"]: n["keep_fraction"] for n in T.plugin_nodes(model)}
    assert fractions == pytest.approx({0: 0.1, 1: 0.35, 2: 0.9})
    with pytest.raises(ValueError, match="3 PrefixKVSelect nodes but 2"):
        T.set_layer_fractions(model, [0.1, 0.2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        T.set_layer_fractions(model, [0.1, 0.2, 1.5])


def test_graph_checks_reject_topk_and_bad_nodes():
    model = _three_layer_graph()
    model.graph.node.append(helper.make_node("TopK", ["importance", "kk"], ["tv", "ti"], name="topk"))
    with pytest.raises(ValueError, match="TopK"):
        T.plugin_nodes(model)
    bare = _three_layer_graph()
    del bare.graph.node[0].attribute[:]
    with pytest.raises(ValueError, match="plugin_namespace"):
        T.plugin_nodes(bare)
    with pytest.raises(ValueError, match="keep_fraction"):
        T.plugin_node(SELECT, ["k"], ["o"], "s", keep_fraction=1.2)
    with pytest.raises(ValueError, match="unknown PrefixKV op"):
        T.plugin_node("PrefixKVTopK", ["k"], ["o"], "s")


# ---------------------------------------------------------------------------- shapes and profiles
@pytest.mark.parametrize("fraction,sink,protect_last", [(0.2, 4, True), (0.5, 0, False), (0.0, 2, True), (1.0, 4, True), (0.37, 8, False)])
def test_symbolic_width_is_width_bound(fraction, sink, protect_last):
    lengths = list(range(0, 1500))
    assert [symbolic_width(s, fraction, sink, protect_last) for s in lengths] == \
           [R.width_bound(s, fraction, sink, protect_last) for s in lengths]
    counts = keep_counts(torch.tensor(lengths), fraction, sink, protect_last)
    assert all(w >= c for w, c in zip((R.width_bound(s, fraction, sink, protect_last) for s in lengths), counts.tolist()))


def test_profile_shapes():
    model = T.build_plugin_layer_graph(heads=4, kv_heads=2, head_dim=16)
    shapes = T.profile_shapes(model, batch=(1, 2, 8), seq=(1, 128, 4096))
    assert shapes["q"] == ((1, 4, 1, 16), (2, 4, 128, 16), (8, 4, 4096, 16))
    assert shapes["attention_mask"] == ((1, 1), (2, 128), (8, 4096))
    assert shapes["k_new"] == ((1, 2, 1, 16), (2, 2, 1, 16), (8, 2, 1, 16))
    with pytest.raises(ValueError, match="min <= opt <= max"):
        T.profile_shapes(model, batch=(4, 2, 8), seq=(1, 2, 3))
    odd = _three_layer_graph()
    odd.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "beams"
    with pytest.raises(ValueError, match="'beams'"):
        T.profile_shapes(odd, batch=(1, 1, 1), seq=(1, 1, 1))
    assert T.profile_shapes(odd, (1, 1, 1), (1, 2, 3), dims={"beams": (1, 2, 4)})["k"][2] == (4, 2, 3, 8)


def test_past_names():
    assert past_names(["present.0.key", "present.11.valid"]) == ["past.0.key", "past.11.valid"]
    with pytest.raises(ValueError, match="present"):
        past_names(["logits"])


# ---------------------------------------------------------------------------- without TensorRT
@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed: the missing-TensorRT message cannot be shown")
def test_clear_error_without_tensorrt(tmp_path):
    path = tmp_path / "layer.onnx"
    onnx.save(T.build_plugin_layer_graph(), str(path))
    with pytest.raises(RuntimeError, match="TensorRT is not installed: pip install tensorrt"):
        T.build_tensorrt_engine(path, tmp_path / "out")
    from prefixkv.engines.tensorrt import TensorRTRunner

    with pytest.raises(RuntimeError, match="TensorRT is not installed"):
        TensorRTRunner(tmp_path)
    with pytest.raises(FileNotFoundError):
        T.build_tensorrt_engine(tmp_path / "missing.onnx", tmp_path / "out")


# ---------------------------------------------------------------------------- with TensorRT and a GPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_engine_runs_the_plugin_graph(tmp_path):
    trt = pytest.importorskip("tensorrt", reason="needs TensorRT: pip install tensorrt")
    pytest.importorskip("triton", reason="the plugins compile Triton kernels: pip install triton")
    model = T.build_plugin_layer_graph(heads=4, kv_heads=2, head_dim=16, keep_fraction=0.4, sink=2,
                                       dtype="float32", block_m=16, block_n=16)
    path = tmp_path / "layer.onnx"
    onnx.save(model, str(path))
    engine_path = T.build_tensorrt_engine(path, tmp_path / "engine", precision="fp32", max_batch=4,
                                          opt_seq=32, max_seq=64, dims={"width": (1, 16, 64)})
    from prefixkv.engines.tensorrt import Engine

    engine = Engine(trt, torch, engine_path, trt.Logger(trt.Logger.WARNING))
    feeds = toy_inputs()
    got = engine({k: v.cuda() for k, v in feeds.items()}, torch.cuda.Stream())
    valid = feeds["attention_mask"].bool()
    out, importance = R.prefill_attention_with_scores(feeds["q"], feeds["k"], feeds["v"], valid, 0.25)
    _, _, pos, _ = R.select_and_gather(feeds["k"], feeds["v"], importance, valid, 0.4, 2, True)
    assert torch.allclose(got["attn_out"].cpu(), out, atol=1e-4)
    assert torch.allclose(got["importance"].cpu(), importance, atol=1e-4)
    assert torch.equal(got["positions"].cpu()[:, -pos.shape[1]:].long(), pos)


def test_plugin_definitions_carry_the_annotations_tensorrt_reads():
    """``tensorrt.plugin`` validates each decorated function at registration with
    ``inspect.signature``: tensor arguments must be annotated with real classes (a module
    with ``from __future__ import annotations`` turns them into strings and TensorRT fails
    with ``issubclass() arg 1 must be a class``), and ``aot_impl`` needs a return annotation.
    The decorators here check exactly that, with stand-in classes for TensorRT's types."""
    import inspect
    import types
    import typing

    seen: dict[str, set] = {}

    def decorator(kind):
        def with_id(plugin_id):
            def check(fn):
                sig = inspect.signature(fn)
                for name, param in sig.parameters.items():
                    ann = param.annotation
                    assert not isinstance(ann, str), f"{fn.__name__}: {name} is annotated with the string {ann!r}"
                    if kind != "autotune":
                        assert ann is not inspect.Parameter.empty, f"{fn.__name__}: {name} has no annotation"
                        assert inspect.isclass(ann) or typing.get_origin(ann) is not None, (fn.__name__, name, ann)
                if kind in ("aot_impl", "register"):
                    assert sig.return_annotation is not inspect.Signature.empty, f"{fn.__name__} has no return annotation"
                    assert not isinstance(sig.return_annotation, str)
                seen.setdefault(plugin_id, set()).add(kind)
                return fn
            return check
        return with_id

    stand_ins = {name: type(name, (), {}) for name in ("TensorDesc", "Tensor", "KernelLaunchParams", "SymIntExprs",
                                                        "SymInt32", "AutoTuneCombination")}
    trtp = types.SimpleNamespace(register=decorator("register"), aot_impl=decorator("aot_impl"),
                                 impl=decorator("impl"), autotune=decorator("autotune"), **stand_ins)
    from prefixkv.plugins import trt as P

    P._define(types.SimpleNamespace(float32="float32"), trtp)
    assert seen == {P.PLUGIN_IDS[name]: {"register", "autotune", "aot_impl", "impl"} for name in (PREFILL, SELECT, DECODE)}
