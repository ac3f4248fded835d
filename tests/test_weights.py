"""build --weights int8 / int4: onnxruntime's weight-only quantization, recorded and validated."""
from __future__ import annotations

import json

import onnx
import pytest
from test_export import (  # noqa: F401  (autouse; the fp32 tiny engine)
    KEEP,
    SMALL_VALIDATION,
    one_torch_thread,
    phase,
    tiny,
    tiny_model_folder,
)


@pytest.mark.parametrize("precision,bits", [("int8", 8), ("int4", 4)])
def test_quantized_engine_is_recorded_and_validated_by_agreement(precision, bits, tiny, tmp_path):  # noqa: F811
    from prefixkv.engine_folder import read_manifest
    from prefixkv.engines.validate import ValidationConfig
    from prefixkv.pipeline import BuildConfig, build_engine

    fp32_dir, model, profile = tiny
    _, folder = tiny_model_folder(tmp_path)
    validation = ValidationConfig(**{**SMALL_VALIDATION, "quality_samples": 1}, min_token_agreement=0.5)
    result = build_engine(BuildConfig(str(folder), tmp_path / "engine", KEEP, profile=profile, weights=precision,
                                      validation=validation), model=model, log=lambda m: None)
    manifest = read_manifest(result.path)
    assert manifest["weights"] == {"precision": precision, "bits": bits, "block_size": 32, "symmetric": True,
                                   "accuracy_level": 4, "tool": "onnxruntime MatMulNBitsQuantizer"}
    path = result.path / "decoder.onnx"
    packed = {name: [n for n in phase(path, name).node if n.op_type == "MatMulNBits"] for name in ("prefill", "decode")}
    assert packed["prefill"] and all(next(a.i for a in n.attribute if a.name == "bits") == bits for n in packed["prefill"])
    # both phases read the same quantized weights, held once in the main graph
    assert [n.input[1:] for n in packed["prefill"]] == [n.input[1:] for n in packed["decode"]]
    names = [i.name for i in onnx.load(str(path), load_external_data=False).graph.initializer]
    assert len(names) == len(set(names)) and {n.input[1] for n in packed["decode"]} <= set(names)
    # the projections' weights are packed: the data file shrinks (the embedding table stays fp32)
    assert (result.path / "decoder.onnx.data").stat().st_size < (fp32_dir / "decoder.onnx.data").stat().st_size
    report = json.loads((result.path / "validation.json").read_text())
    assert report["weights"] == precision
    assert report["checks"]["graph"]["status"] == "reported"  # fp32 tolerances cannot hold: differences reported
    generation = report["checks"]["generation"]
    assert generation["min_token_agreement"] == 0.5 and 0 <= generation["token_agreement"] <= 1
    assert generation["passed"] == (generation["token_agreement"] >= 0.5) and result.passed == report["passed"]
    if precision == "int8":  # 8-bit blocks of 32 keep the tiny model's greedy choices
        assert generation["token_agreement"] >= 0.9


def test_weights_are_checked_up_front(tmp_path):
    from prefixkv.pipeline import BuildConfig

    with pytest.raises(ValueError, match="weights must be one of fp32, int8, int4"):
        BuildConfig("m", tmp_path / "e", weights="int3")
    with pytest.raises(ValueError, match="applies to the ONNX Runtime engine"):
        BuildConfig("m", tmp_path / "e", weights="int4", backend="tensorrt")


def _tied_graph(folder, vocab=64, hidden=64, seed=0):
    """An embedding Gather and a tied LM head (Gemm, transB over the same table), as torch exports them."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    table = np.random.default_rng(seed).normal(size=(vocab, hidden)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["h"]),
             helper.make_node("Reshape", ["h", "shape"], ["h2"]),
             helper.make_node("Gemm", ["h2", "table"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, [5])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [5, vocab])],
                              [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.array([-1, hidden]), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, str(folder / "decoder.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="decoder.onnx.data", size_threshold=0)
    return table


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_a_tied_lm_head_is_quantized_and_the_table_kept_once(precision, tmp_path):
    import numpy as np
    import onnxruntime as ort

    from prefixkv.exporter.quantize import quantize_graphs

    table = _tied_graph(tmp_path)
    ids = np.array([3, 0, 63, 17, 3], np.int64)
    want = table[ids] @ table.T
    quantize_graphs(tmp_path, ["decoder"], precision, log=lambda m: None)
    model = onnx.load(str(tmp_path / "decoder.onnx"), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    assert "Gemm" not in ops and "MatMulNBits" in ops
    fp32_tables = [i.name for i in model.graph.initializer if list(i.dims) in ([64, 64],) and i.data_type == 1]
    if precision == "int4":  # the embedding quantized too: no fp32 table left
        assert "GatherBlockQuantized" in ops and fp32_tables == []
    else:  # int8: the quantizer has no int8 Gather; the table stays fp32, once
        assert ops[0] == "Gather" and fp32_tables == ["table"]
    got = ort.InferenceSession(str(tmp_path / "decoder.onnx"), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    scale = np.abs(want).max()
    assert np.abs(got - want).max() / scale < (0.02 if precision == "int8" else 0.2)
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.8
