"""Whole-model ONNX graphs in TensorRT plugin mode: the PrefixKV ops as plugin nodes.

    prefill(input_ids, attention_mask) -> logits, per layer l: key, value, positions, valid
    decode(input_ids, position_ids, prompt_lengths, per layer past key/value/positions/valid)
            -> logits, per layer present key/value/positions/valid

The same names, dtypes and semantics as the ONNX Runtime graphs (``prefixkv.exporter.onnx``),
so one runner contract serves both; what differs is inside each layer:

    prefill  PrefixKVPrefillScores(q, k, v, valid) -> attention output, partial importance
             ReduceSum over the partial rows -> importance (B, S)
             PrefixKVSelect(k, v, importance, valid) -> kept K/V, positions, kept
             (no TopK node: TensorRT's TopK takes K <= 3840)
    decode   append the new token, PrefixKVDecode(q, K, V, valid), then the decode-phase
             eviction in plain ONNX ops (as in the ONNX Runtime graph)

Each node carries the attributes TensorRT's ONNX parser needs to find the plugin
(``plugin_namespace``, ``plugin_version``, ``aot``) and that layer's own constants
(``keep_fraction``, ``sink``, ``protect_last``, ``scaling``); the layer index is in the
node's metadata.  The slot count of a layer is ``plugins.reference.width_bound`` of the
padded prompt length: a static-shape upper bound, extra slots empty at the front.

Only the ``accumulated`` score (the paper's) has a fused kernel; other scorers are refused.
The graphs are checked here with ``onnx.checker`` and run on CPU by ``onnx``'s reference
evaluator with the PyTorch specification of each op (``evaluator``); building and running
them needs TensorRT and a GPU (``prefixkv.exporter.tensorrt``).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..plugins import reference
from ..plugins.trt import DECODE, NAMESPACE, PREFILL, SELECT, VERSION, symbolic_width
from .onnx import OPSET, DecodeGraph, Decoder, ExportError, GraphSpec, export_graph

PLUGIN_SCORERS = ("accumulated",)
PREFILL_BLOCK = 64  # block_m = block_n of the prefill kernel on a GPU


def _attrs(**extra) -> dict:
    return {"plugin_namespace": NAMESPACE, "plugin_version": VERSION, "aot": 1, **extra}


def _layer(l: int) -> dict:
    return {"prefixkv_layer": str(l)}


def check_plugin_spec(spec: GraphSpec) -> None:
    if spec.scorer not in PLUGIN_SCORERS:
        raise ExportError(
            f"the TensorRT plugin path fuses the {'/'.join(PLUGIN_SCORERS)} score only, this profile uses "
            f"{spec.scorer!r}; calibrate with --scorer accumulated or build with --backend onnxruntime"
        )


class PluginPrefillGraph(nn.Module):
    """(input_ids, attention_mask) -> (logits, *per layer key, value, positions, valid), plugin nodes inside."""

    def __init__(self, model, spec: GraphSpec, block: int = PREFILL_BLOCK):
        super().__init__()
        check_plugin_spec(spec)
        self.decoder = Decoder(model)
        self.spec, self.block = spec, block
        self.heads_per_program = self.decoder.heads // self.decoder.kv_heads

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        spec, dec = self.spec, self.decoder
        b, s = input_ids.shape
        valid = attention_mask.to(torch.int32)
        position_ids = torch.clamp(torch.cumsum(attention_mask, dim=-1) - 1, min=0)
        hidden = dec.embed_tokens(input_ids)
        cos, sin = dec.rope(hidden, position_ids)
        rows = ((s + self.block - 1) // self.block) * (dec.heads // self.heads_per_program)
        outputs = []
        for l, layer in enumerate(dec.layers):
            query, key, value = dec.qkv(layer, hidden, cos, sin)
            out, partial = torch.onnx.ops.symbolic_multi_out(
                f"{NAMESPACE}::{PREFILL}", [query, key, value, valid],
                _attrs(scaling=float(dec.scaling), heads_per_program=self.heads_per_program,
                       block_m=self.block, block_n=self.block),
                dtypes=[query.dtype, torch.float32], shapes=[(b, s, dec.heads, dec.head_dim), (b, rows, s)],
                version=1, metadata_props=_layer(l),
            )
            hidden = dec.finish(layer, hidden, out)
            importance = partial.sum(1)
            width = symbolic_width(s, spec.fractions[l], spec.sink, spec.protect_last, torch.sym_min, torch.sym_max)
            k_kept, v_kept, positions, kept = torch.onnx.ops.symbolic_multi_out(
                f"{NAMESPACE}::{SELECT}", [key, value, importance, valid],
                _attrs(keep_fraction=float(spec.fractions[l]), sink=int(spec.sink), protect_last=int(spec.protect_last)),
                dtypes=[key.dtype, value.dtype, torch.int32, torch.int32],
                shapes=[(b, dec.kv_heads, width, dec.head_dim)] * 2 + [(b, width)] * 2,
                version=1, metadata_props=_layer(l),
            )
            outputs += [k_kept, v_kept, positions.to(torch.int64), kept.to(torch.bool)]
        return (dec.logits(hidden[:, -1]), *outputs)


class PluginDecodeGraph(DecodeGraph):
    """``DecodeGraph`` with the attention of each layer as a PrefixKVDecode plugin node
    (appending and the decode-phase eviction stay plain ONNX ops)."""

    def __init__(self, model, spec: GraphSpec):
        check_plugin_spec(spec)
        super().__init__(model, spec)

    def attend(self, layer: int, query, keys, values, valid):
        b, heads, q, d = query.shape
        return torch.onnx.ops.symbolic(
            f"{NAMESPACE}::{DECODE}", [query, keys, values, valid.to(torch.int32)],
            _attrs(scaling=float(self.decoder.scaling)), dtype=query.dtype, shape=(b, q, heads, d),
            version=1, metadata_props=_layer(layer),
        )


def export_plugin_graph(model, spec: GraphSpec, graph: str, path: str | Path, opset: int = OPSET, log=None) -> Path:
    """Export the plugin-mode ``graph`` ("prefill" or "decode") to ``path`` (weights in ``path``.data)."""
    import onnx

    wrapper = (PluginPrefillGraph if graph == "prefill" else PluginDecodeGraph)(model, spec)

    def finish(proto):
        _layer_doc_strings(proto)
        onnx.checker.check_model(proto)

    return export_graph(model, spec, graph, path, opset, log, wrapper=wrapper, postprocess=finish)


def _layer_doc_strings(proto) -> None:
    """Copy each plugin node's layer index from its metadata into its doc_string (where
    ``prefixkv.exporter.tensorrt.plugin_nodes`` reads it)."""
    import json

    for node in proto.graph.node:
        for prop in node.metadata_props:
            if prop.key == "prefixkv_layer":
                node.doc_string = json.dumps({"prefixkv_layer": int(prop.value)})


def export_plugin_graphs(model, spec: GraphSpec, folder: str | Path, opset: int = OPSET, log=None) -> dict[str, Path]:
    """Both plugin-mode graphs into ``folder``: prefill.onnx(+.data), decode.onnx(+.data)."""
    folder = Path(folder)
    return {g: export_plugin_graph(model, spec, g, folder / f"{g}.onnx", opset, log) for g in ("prefill", "decode")}


# ---------------------------------------------------------------------------------------------
# Running the plugin-mode graphs on CPU: onnx's reference evaluator + the ops' specification
# ---------------------------------------------------------------------------------------------
def reference_ops() -> list:
    """``onnx.reference`` implementations of the three PrefixKV nodes, from the ops' PyTorch
    specification (``prefixkv.plugins.reference``), plus a GatherElements that handles any
    index count (onnx's own gives up beyond 32 distinct indices per row).

    They follow the plugins' contract: the prefill node's partial importance has one row
    (P = 1; the graph sums it), the select node pads to the static slot bound with empty
    slots in front (position -1, zero K/V), and outputs keep the inputs' float dtype."""
    import numpy as np
    from onnx.reference.op_run import OpRun

    def t(x):
        x = torch.from_numpy(np.ascontiguousarray(x))
        return x.float() if x.is_floating_point() else x

    class PrefixKVPrefillScores(OpRun):
        op_domain = NAMESPACE

        def _run(self, q, k, v, valid, scaling=None, heads_per_program=None, block_m=None, block_n=None,
                 plugin_namespace=None, plugin_version=None, aot=None):
            out, importance = reference.prefill_attention_with_scores(t(q), t(k), t(v), t(valid) != 0, scaling)
            return out.numpy().astype(q.dtype), importance.unsqueeze(1).numpy()

    class PrefixKVSelect(OpRun):
        op_domain = NAMESPACE

        def _run(self, k, v, importance, valid, keep_fraction=None, sink=None, protect_last=None,
                 plugin_namespace=None, plugin_version=None, aot=None):
            kk, vv, positions, kept = reference.select_and_gather(t(k), t(v), t(importance), t(valid) != 0,
                                                                  keep_fraction, sink, bool(protect_last))
            pad = symbolic_width(k.shape[2], keep_fraction, sink, bool(protect_last)) - positions.shape[1]
            kk = torch.nn.functional.pad(kk * kept[:, None, :, None], (0, 0, pad, 0))
            vv = torch.nn.functional.pad(vv * kept[:, None, :, None], (0, 0, pad, 0))
            positions = torch.nn.functional.pad(positions, (pad, 0), value=-1)
            kept = torch.nn.functional.pad(kept, (pad, 0))
            return (kk.numpy().astype(k.dtype), vv.numpy().astype(v.dtype), positions.int().numpy(),
                    kept.int().numpy())

    class PrefixKVDecode(OpRun):
        op_domain = NAMESPACE

        def _run(self, q, k, v, valid, scaling=None, plugin_namespace=None, plugin_version=None, aot=None):
            out = reference.decode_attention(t(q), t(k), t(v), t(valid) != 0, scaling)
            return (out.numpy().astype(q.dtype),)

    class GatherElements(OpRun):
        op_domain = ""

        def _run(self, data, indices, axis=None):
            index = np.where(indices < 0, indices + data.shape[axis], indices)
            return (np.take_along_axis(data, index, axis=axis),)

    return [PrefixKVPrefillScores, PrefixKVSelect, PrefixKVDecode, GatherElements]


def evaluator(model):
    """An ``onnx.reference.ReferenceEvaluator`` for a plugin-mode graph (a path or a
    ModelProto) with ``reference_ops``.  Slow (numpy, one op at a time): for checking the
    graphs' wiring on small models on a CPU."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    return ReferenceEvaluator(model, new_ops=reference_ops())


__all__ = ["PluginPrefillGraph", "PluginDecodeGraph", "export_plugin_graph", "export_plugin_graphs", "evaluator",
           "reference_ops", "check_plugin_spec", "PLUGIN_SCORERS"]
