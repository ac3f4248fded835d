"""build --weights int8 / int4: onnxruntime's weight-only quantization, recorded and validated."""
from __future__ import annotations

import json

import onnx
import pytest
from test_export import (  # noqa: F401  (autouse; the fp32 tiny engine)
    KEEP,
    SMALL_VALIDATION,
    one_torch_thread,
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
    for graph in ("decoder",):
        nodes = onnx.load(str(result.path / f"{graph}.onnx"), load_external_data=False).graph.node
        packed = [n for n in nodes if n.op_type == "MatMulNBits"]
        assert packed and all(next(a.i for a in n.attribute if a.name == "bits") == bits for n in packed)
        # the projections' weights are packed: the data file shrinks (the embedding table stays fp32)
        assert (result.path / f"{graph}.onnx.data").stat().st_size < (fp32_dir / f"{graph}.onnx.data").stat().st_size
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
