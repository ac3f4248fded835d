"""Weight-only quantization of an engine's graphs with ONNX Runtime's own tool.

    int8 / int4: every MatMul with a constant weight (the projections and the LM head)
    becomes ``com.microsoft::MatMulNBits`` through
    ``onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer``: symmetric,
    blocks of ``WEIGHT_BLOCK`` input channels, one scale each; activations, the KV cache and
    the attention math stay as exported.  ``accuracy_level`` 4 lets the CPU kernels compute
    in int8 (the fastest path), which the validation then measures.

    A tied LM head is exported as a ``Gemm`` (transB) over the embedding table, which the
    quantizer does not take; ``untie_lm_head`` makes it a MatMul over the transposed table
    first.  With int4 the embedding ``Gather`` is quantized too (``GatherBlockQuantized``;
    the quantizer has no int8 Gather), so no fp32 copy of the table is left; with int8 the
    embedding table stays fp32 beside the int8 head.

The graph is loaded, quantized and saved in place, its weights in its own external-data file.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from ..defaults import WEIGHT_ACCURACY_LEVEL, WEIGHT_BLOCK, WEIGHT_PRECISIONS
from ..engine_folder import onnx_graphs

BITS = {"int8": 8, "int4": 4}


def weights_record(precision: str) -> dict | None:
    """The manifest's ``weights`` entry for ``precision`` (None for fp32: nothing was changed)."""
    if precision not in WEIGHT_PRECISIONS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return None
    return {"precision": precision, "bits": BITS[precision], "block_size": WEIGHT_BLOCK, "symmetric": True,
            "accuracy_level": WEIGHT_ACCURACY_LEVEL, "tool": "onnxruntime MatMulNBitsQuantizer"}


def untie_lm_head(graph) -> int:
    """Each ``Gemm`` over a constant weight (no bias, alpha = beta = 1), in ``graph`` or its
    subgraphs (the decoder's phases), becomes a ``MatMul`` over that weight, transposed if
    ``transB``, as a new initializer of ``graph`` (one per weight, whichever phases read it);
    returns how many Gemms."""
    import numpy as np
    from onnx import helper, numpy_helper

    inits = {i.name: i for g in onnx_graphs(graph) for i in g.initializer}
    made, done = {}, 0
    for owner in list(onnx_graphs(graph)):
        for index, node in enumerate(list(owner.node)):
            if node.op_type != "Gemm" or len(node.input) != 2 or node.input[1] not in inits:
                continue
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                continue
            key = (node.input[1], bool(attrs.get("transB", 0)))
            if key not in made:
                weight = numpy_helper.to_array(inits[node.input[1]])
                if attrs.get("transB", 0):
                    weight = np.ascontiguousarray(weight.T)
                made[key] = f"{node.input[1]}.matmul" + ("" if key[1] else ".plain")
                graph.initializer.append(numpy_helper.from_array(weight, made[key]))
            owner.node.remove(node)
            owner.node.insert(index, helper.make_node("MatMul", [node.input[0], made[key]], list(node.output), name=node.name))
            done += 1
    return done


def _nodes(graph):
    """The graph's nodes and, recursively, those of its subgraphs."""
    for g in onnx_graphs(graph):
        yield from g.node


def _once(graph) -> int:
    """Drop the repeats of each initializer name in ``graph`` (the quantizer adds a weight's
    quantized tensors once per node that reads it: once per decoder phase); returns how many.
    A repeat whose bytes differ is an error."""
    seen, repeats = {}, []
    for init in graph.initializer:
        if init.name not in seen:
            seen[init.name] = init
        elif init.SerializeToString() == seen[init.name].SerializeToString():
            repeats.append(init)
        else:
            raise ValueError(f"two different initializers named {init.name!r} after quantization")
    for init in repeats:
        graph.initializer.remove(init)
    return len(repeats)


def quantize_graphs(folder: str | Path, graphs: list[str], precision: str, log=print) -> dict | None:
    """Quantize the weights of ``folder/<graph>.onnx`` for each graph; returns ``weights_record``."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    record = weights_record(precision)
    if record is None:
        return None
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # a line per node
    folder = Path(folder)
    for graph in graphs:
        start = time.perf_counter()
        path, data = folder / f"{graph}.onnx", folder / f"{graph}.onnx.data"
        model = onnx.load(str(path))
        untie_lm_head(model.graph)
        ops = ("MatMul", "Gather") if record["bits"] == 4 else ("MatMul",)
        quantizer = MatMulNBitsQuantizer(model, bits=record["bits"], block_size=WEIGHT_BLOCK, is_symmetric=True,
                                         accuracy_level=WEIGHT_ACCURACY_LEVEL, op_types_to_quantize=ops)
        quantizer.process()
        quantized = quantizer.model.model
        done = len({n.input[1] if n.op_type == "MatMulNBits" else n.input[0] for n in _nodes(quantized.graph)
                    if n.op_type in ("MatMulNBits", "GatherBlockQuantized")})  # weights, each read in both phases
        _once(quantized.graph)
        used = {name for n in _nodes(quantized.graph) for name in n.input}  # the phases' too
        unused = [i for i in quantized.graph.initializer if i.name not in used]
        for init in unused:  # the fp32 tables the quantized nodes replaced
            quantized.graph.initializer.remove(init)
        if done == 0:
            raise ValueError(f"{path.name}: no MatMul with a constant weight to quantize")
        data.unlink(missing_ok=True)
        onnx.save_model(quantized, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        log(f"weights {precision}: {graph} graph, {done} weights quantized in {time.perf_counter() - start:.1f} s")
    return record
