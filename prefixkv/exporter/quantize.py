"""Weight-only quantization of an engine's graphs with ONNX Runtime's own tool.

    int8 / int4: every MatMul with a constant weight (the projections and the LM head)
    becomes ``com.microsoft::MatMulNBits`` through
    ``onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer``: symmetric,
    blocks of ``WEIGHT_BLOCK`` input channels, one scale each; activations, the KV cache and
    the attention math stay as exported.  ``accuracy_level`` 4 lets the CPU kernels compute
    in int8 (the fastest path), which the validation then measures.

The graph is loaded, quantized and saved in place, its weights in its own external-data file.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from ..defaults import WEIGHT_ACCURACY_LEVEL, WEIGHT_BLOCK, WEIGHT_PRECISIONS

BITS = {"int8": 8, "int4": 4}


def weights_record(precision: str) -> dict | None:
    """The manifest's ``weights`` entry for ``precision`` (None for fp32: nothing was changed)."""
    if precision not in WEIGHT_PRECISIONS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return None
    return {"precision": precision, "bits": BITS[precision], "block_size": WEIGHT_BLOCK, "symmetric": True,
            "accuracy_level": WEIGHT_ACCURACY_LEVEL, "tool": "onnxruntime MatMulNBitsQuantizer"}


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
        quantizer = MatMulNBitsQuantizer(model, bits=record["bits"], block_size=WEIGHT_BLOCK, is_symmetric=True,
                                         accuracy_level=WEIGHT_ACCURACY_LEVEL)
        quantizer.process()
        quantized = quantizer.model.model
        done = sum(n.op_type == "MatMulNBits" for n in quantized.graph.node)
        if done == 0:
            raise ValueError(f"{path.name}: no MatMul with a constant weight to quantize")
        data.unlink(missing_ok=True)
        onnx.save_model(quantized, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        log(f"weights {precision}: {graph} graph, {done} MatMul weights quantized in {time.perf_counter() - start:.1f} s")
    return record
