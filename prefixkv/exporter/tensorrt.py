"""TensorRT: plugin-mode ONNX graphs and the engine build.

(a) Plugin-mode ONNX.  Each layer's scoring and selection become custom nodes whose op
type is a registered plugin name (``prefixkv.plugins.trt``) with string attributes
``plugin_namespace="prefixkv"`` and ``plugin_version="1"``; TensorRT's ONNX parser maps
such a node to the plugin and passes the other attributes (per-layer ``keep_fraction``,
``sink``, ``protect_last``, ...) to it.  ``aot=1`` asks the parser for the plugin's
ahead-of-time implementation (TensorRT samples/python/quickly_deployable_plugins README,
"ONNX model with an AOT plugin").  The nodes live in the ``prefixkv`` ONNX domain so
``onnx.checker`` accepts them.  No TopK node: TensorRT's TopK takes K <= 3840 only.

    plugin_node(...)              one PrefixKV node with the attributes TensorRT needs
    build_plugin_layer_graph(...) a self-contained one-layer graph (prefill + select, and
                                  optionally a decode step) to test the wiring now
    set_layer_fractions(...)      write per-layer keep fractions into an existing graph
    plugin_nodes(...)             read the PrefixKV nodes' attributes back, per layer

(b) ``build_tensorrt_engine``: the documented builder flow (``trt.Builder``,
``create_network``, ``OnnxParser``, ``create_optimization_profile``/``set_shape``,
``build_serialized_network``).  TensorRT 10.x takes ``BuilderFlag.FP16/BF16``; TensorRT
11 removed weak typing, so there the graph must already carry its precision (export in
fp16/bf16, or convert with ModelOpt AutoCast) and the network is strongly typed.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from ..defaults import SINK, TENSORRT
from ..plugins.trt import DECODE, NAMESPACE, PREFILL, SELECT, VERSION

DOMAIN = NAMESPACE  # ONNX domain of the custom nodes
PLUGIN_OPS = (PREFILL, SELECT, DECODE)
_ONNX_DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}


# ----------------------------------------------------------------------------------------
# (a) plugin-mode ONNX
# ----------------------------------------------------------------------------------------
def plugin_node(op_type: str, inputs: Sequence[str], outputs: Sequence[str], name: str, layer: int | None = None,
                aot: bool = True, **attributes) -> onnx.NodeProto:
    """A PrefixKV plugin node: op type = plugin name, plus the plugin_namespace /
    plugin_version attributes the TensorRT ONNX parser matches on, ``aot`` and the
    plugin's own attributes.  ``layer`` goes into the node's doc_string (metadata for
    prefixkv's own tools; the parser reads only the attributes the plugin declares)."""
    if op_type not in PLUGIN_OPS:
        raise ValueError(f"unknown PrefixKV op {op_type!r}; choose one of {', '.join(PLUGIN_OPS)}")
    if op_type == SELECT:
        fraction = attributes.get("keep_fraction")
        if fraction is None or not 0.0 <= float(fraction) <= 1.0:
            raise ValueError(f"{name}: keep_fraction must be in [0, 1], got {fraction!r}")
        attributes["keep_fraction"] = float(fraction)
        attributes["protect_last"] = int(bool(attributes.get("protect_last", True)))
        attributes["sink"] = int(attributes.get("sink", SINK))
    node = helper.make_node(op_type, list(inputs), list(outputs), name=name, domain=DOMAIN,
                            plugin_namespace=NAMESPACE, plugin_version=VERSION, aot=int(bool(aot)), **attributes)
    if layer is not None:
        node.doc_string = json.dumps({"prefixkv_layer": int(layer)})
    return node


def build_plugin_layer_graph(
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    keep_fraction: float = 0.25,
    sink: int = SINK,
    protect_last: bool = True,
    scaling: float | None = None,
    dtype: str = "float16",
    decode: bool = True,
    layer: int = 0,
    block_m: int = 64,
    block_n: int = 64,
    heads_per_program: int | None = None,
) -> onnx.ModelProto:
    """A one-layer PrefixKV graph in plugin mode (no model weights: q, k, v are inputs).

    Inputs:  q (batch, heads, seq, D), k, v (batch, kv_heads, seq, D), attention_mask
             (batch, seq) int64 (left padding); with ``decode``: q_new (batch, heads, 1, D),
             k_new, v_new (batch, kv_heads, 1, D).
    Outputs: attn_out (batch, seq, heads, D), importance (batch, seq), k_kept, v_kept
             (batch, kv_heads, W, D), positions, kept (batch, W) int32; with ``decode``:
             decode_out (batch, 1, heads, D) over the compacted cache + the new token.
    """
    if dtype not in _ONNX_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_ONNX_DTYPES)}, got {dtype!r}")
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    elem = _ONNX_DTYPES[dtype]
    scaling = head_dim ** -0.5 if scaling is None else float(scaling)
    hpp = heads // kv_heads if heads_per_program is None else heads_per_program
    p = f"layers.{layer}."
    inputs = [
        helper.make_tensor_value_info("q", elem, ["batch", heads, "seq", head_dim]),
        helper.make_tensor_value_info("k", elem, ["batch", kv_heads, "seq", head_dim]),
        helper.make_tensor_value_info("v", elem, ["batch", kv_heads, "seq", head_dim]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
    ]
    nodes = [
        helper.make_node("Cast", ["attention_mask"], ["valid"], name="valid_int32", to=TensorProto.INT32),
        plugin_node(PREFILL, ["q", "k", "v", "valid"], ["attn_out", p + "partial"], p + "prefill_scores", layer,
                    scaling=scaling, heads_per_program=hpp, block_m=block_m, block_n=block_n),
        helper.make_node("Constant", [], ["sum_axes"], name="sum_axes",
                         value=helper.make_tensor("sum_axes", TensorProto.INT64, [1], [1])),
        helper.make_node("ReduceSum", [p + "partial", "sum_axes"], ["importance"], name=p + "importance", keepdims=0),
        plugin_node(SELECT, ["k", "v", "importance", "valid"], ["k_kept", "v_kept", "positions", "kept"],
                    p + "select", layer, keep_fraction=keep_fraction, sink=sink, protect_last=protect_last),
    ]
    outputs = [
        helper.make_tensor_value_info("attn_out", elem, ["batch", "seq", heads, head_dim]),
        helper.make_tensor_value_info("importance", TensorProto.FLOAT, ["batch", "seq"]),
        helper.make_tensor_value_info("k_kept", elem, ["batch", kv_heads, "width", head_dim]),
        helper.make_tensor_value_info("v_kept", elem, ["batch", kv_heads, "width", head_dim]),
        helper.make_tensor_value_info("positions", TensorProto.INT32, ["batch", "width"]),
        helper.make_tensor_value_info("kept", TensorProto.INT32, ["batch", "width"]),
    ]
    if decode:
        inputs += [
            helper.make_tensor_value_info("q_new", elem, ["batch", heads, 1, head_dim]),
            helper.make_tensor_value_info("k_new", elem, ["batch", kv_heads, 1, head_dim]),
            helper.make_tensor_value_info("v_new", elem, ["batch", kv_heads, 1, head_dim]),
        ]
        nodes += [
            helper.make_node("Concat", ["k_kept", "k_new"], ["k_cache"], name="k_cache", axis=2),
            helper.make_node("Concat", ["v_kept", "v_new"], ["v_cache"], name="v_cache", axis=2),
            helper.make_node("Constant", [], ["one_valid"], name="one_valid",
                             value=helper.make_tensor("one_valid", TensorProto.INT32, [1, 1], [1])),
            helper.make_node("Shape", ["kept"], ["kept_shape"], name="kept_shape", start=0, end=1),
            helper.make_node("Constant", [], ["one"], name="one",
                             value=helper.make_tensor("one", TensorProto.INT64, [1], [1])),
            helper.make_node("Concat", ["kept_shape", "one"], ["new_valid_shape"], name="new_valid_shape", axis=0),
            helper.make_node("Expand", ["one_valid", "new_valid_shape"], ["new_valid"], name="new_valid"),
            helper.make_node("Concat", ["kept", "new_valid"], ["cache_valid"], name="cache_valid", axis=1),
            plugin_node(DECODE, ["q_new", "k_cache", "v_cache", "cache_valid"], ["decode_out"], p + "decode", layer,
                        scaling=scaling),
        ]
        outputs.append(helper.make_tensor_value_info("decode_out", elem, ["batch", 1, heads, head_dim]))
    graph = helper.make_graph(nodes, f"prefixkv_plugin_layer{layer}", inputs, outputs)
    model = helper.make_model(graph, producer_name="prefixkv",
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _layer_of(node: onnx.NodeProto) -> int | None:
    try:
        return int(json.loads(node.doc_string)["prefixkv_layer"]) if node.doc_string else None
    except (ValueError, KeyError, TypeError):
        return None


def plugin_nodes(model: onnx.ModelProto) -> list[dict]:
    """Every PrefixKV node: {op_type, name, layer, attributes...}, in graph order.

    Raises if a node lacks what TensorRT needs or if the graph has a TopK node.
    """
    topk = [n.name or n.op_type for n in model.graph.node if n.op_type == "TopK"]
    if topk:
        raise ValueError(f"plugin-mode graphs must not use TopK (TensorRT limits K to 3840): {topk[:3]}")
    found = []
    for node in model.graph.node:
        if node.op_type not in PLUGIN_OPS:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
        if attrs.get("plugin_namespace") != NAMESPACE or attrs.get("plugin_version") != VERSION:
            raise ValueError(f"{node.name}: needs plugin_namespace={NAMESPACE!r} and plugin_version={VERSION!r}")
        found.append({"op_type": node.op_type, "name": node.name, "layer": _layer_of(node), **attrs})
    return found


def set_layer_fractions(model: onnx.ModelProto, layer_fractions: Sequence[float] | Mapping[int, float]) -> onnx.ModelProto:
    """Write each layer's keep fraction into its PrefixKVSelect node (in place; returns the model).

    Nodes are matched by their recorded layer, else by their order in the graph.
    """
    selects = [n for n in model.graph.node if n.op_type == SELECT]
    fractions = dict(layer_fractions) if isinstance(layer_fractions, Mapping) else dict(enumerate(layer_fractions))
    if len(selects) != len(fractions):
        raise ValueError(f"the graph has {len(selects)} {SELECT} nodes but {len(fractions)} layer fractions were given")
    for order, node in enumerate(selects):
        layer = _layer_of(node)
        layer = order if layer is None else layer
        if layer not in fractions:
            raise ValueError(f"no keep fraction for layer {layer} ({node.name})")
        f = float(fractions[layer])
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"layer {layer}: keep fraction must be in [0, 1], got {f}")
        for attr in node.attribute:
            if attr.name == "keep_fraction":
                attr.f = f
                break
        else:
            node.attribute.append(helper.make_attribute("keep_fraction", f))
    return model


# ----------------------------------------------------------------------------------------
# (b) engine build
# ----------------------------------------------------------------------------------------
DEFAULT_DIM_NAMES = {
    "batch": ("batch", "batch_size"),
    "seq": ("seq", "sequence", "sequence_length", "seq_len", "past_seq", "past_sequence_length", "width"),
}


def profile_shapes(model: onnx.ModelProto, batch: tuple[int, int, int], seq: tuple[int, int, int],
                   dims: Mapping[str, tuple[int, int, int]] | None = None) -> dict[str, tuple[tuple, tuple, tuple]]:
    """(min, opt, max) shapes of every graph input for one optimization profile.

    Symbolic dims named like batch (``batch``, ``batch_size``) take ``batch``, those named
    like a length (``seq``, ``sequence_length``, ``past_seq``, ``width``, ...) take ``seq``;
    ``dims`` overrides or adds names.  Static dims stay as they are.
    """
    table = {name: batch for name in DEFAULT_DIM_NAMES["batch"]}
    table.update({name: seq for name in DEFAULT_DIM_NAMES["seq"]})
    table.update(dims or {})
    initializers = {t.name for t in model.graph.initializer}
    shapes = {}
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        lo, mid, hi = [], [], []
        for i, d in enumerate(inp.type.tensor_type.shape.dim):
            if d.HasField("dim_value"):
                lo.append(d.dim_value), mid.append(d.dim_value), hi.append(d.dim_value)
            elif d.dim_param in table:
                a, b, c = table[d.dim_param]
                if not a <= b <= c:
                    raise ValueError(f"{d.dim_param}: need min <= opt <= max, got {(a, b, c)}")
                lo.append(a), mid.append(b), hi.append(c)
            else:
                raise ValueError(f"input {inp.name!r} dim {i} is {d.dim_param!r}: give its range in dims=")
        shapes[inp.name] = (tuple(lo), tuple(mid), tuple(hi))
    return shapes


def build_tensorrt_engine(
    onnx_path: str | Path,
    output_dir: str | Path,
    precision: str = TENSORRT.precision,
    min_batch: int = 1,
    opt_batch: int = 1,
    max_batch: int = TENSORRT.max_batch,
    min_seq: int = 1,
    opt_seq: int = TENSORRT.opt_seq,
    max_seq: int = TENSORRT.max_seq,
    dims: Mapping[str, tuple[int, int, int]] | None = None,
    workspace_gib: float = 8.0,
    engine_name: str = "model.engine",
    strongly_typed: bool | None = None,
) -> Path:
    """Build and save a TensorRT engine from a (plugin-mode) ONNX file.  Returns its path.

    precision: "fp16" | "bf16" | "fp32".  On TensorRT 10.x the matching builder flag is set
    (weak typing) unless ``strongly_typed``; on TensorRT 11 the network is always strongly
    typed, so the ONNX graph must already be in that precision.
    Also writes ``<engine_name>.json`` with the profile and versions next to the engine.
    """
    from ..plugins.trt import import_tensorrt, register_plugins

    if precision not in ("fp16", "bf16", "fp32"):
        raise ValueError(f"precision must be fp16, bf16 or fp32, got {precision!r}")
    onnx_path, output_dir = Path(onnx_path), Path(output_dir)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"no ONNX file at {onnx_path}")
    shapes = profile_shapes(onnx.load(str(onnx_path), load_external_data=False),
                            (min_batch, opt_batch, max_batch), (min_seq, opt_seq, max_seq), dims)
    trt, _ = import_tensorrt()
    register_plugins()  # the parser looks the PrefixKV ops up in the plugin registry

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    weak_flags = hasattr(trt.BuilderFlag, "FP16")  # removed in TensorRT 11
    strong = (not weak_flags) if strongly_typed is None else strongly_typed
    flags = 0
    if strong and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT could not parse {onnx_path}:\n" + "\n".join(errors))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if not strong and precision != "fp32":
        config.set_flag(trt.BuilderFlag.FP16 if precision == "fp16" else trt.BuilderFlag.BF16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name not in shapes:
            raise RuntimeError(f"network input {name!r} is not a graph input of {onnx_path}")
        profile.set_shape(name, *shapes[name])
    config.add_optimization_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine; rerun with a verbose trt.Logger for details")
    output_dir.mkdir(parents=True, exist_ok=True)
    engine_path = output_dir / engine_name
    engine_path.write_bytes(bytes(serialized))
    manifest = {"onnx": str(onnx_path), "precision": precision, "strongly_typed": strong,
                "tensorrt": trt.__version__, "profile": {k: list(map(list, v)) for k, v in shapes.items()}}
    (output_dir / f"{engine_name}.json").write_text(json.dumps(manifest, indent=2))
    return engine_path


__all__ = [
    "plugin_node",
    "build_plugin_layer_graph",
    "plugin_nodes",
    "set_layer_fractions",
    "profile_shapes",
    "build_tensorrt_engine",
    "DOMAIN",
    "PLUGIN_OPS",
]
