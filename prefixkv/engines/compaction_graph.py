"""The small graph the ONNX Runtime runner compacts a full cache buffer with.

    key, value (B, Hkv, C, D), rows (B * Hkv * C',) int64 flat indices into the buffers
    viewed as (B * Hkv * C, D), shape = (B, Hkv, C', D), flat = (-1, D)
        -> key_out, value_out (B, Hkv, C', D)

One ``Gather`` of whole head_dim rows (contiguous copies) per buffer.  The runner ships it
serialized (``serialized``) so that the runtime needs no ``onnx`` package (it runs inside
Triton's Python backend); ``build`` makes it with ``onnx`` and the tests check that the
stored bytes hold the same model.
"""
from __future__ import annotations

import base64

DTYPES = ("float32", "float16")


def build(dtype: str) -> bytes:
    """The graph for ``dtype`` buffers, serialized, made with ``onnx.helper``."""
    from onnx import TensorProto, helper

    elem = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}[dtype]
    cache = ["batch", "heads", "slots", "dim"]
    nodes = []
    for part in ("key", "value"):
        nodes += [helper.make_node("Reshape", [part, "flat"], [f"{part}_rows"]),
                  helper.make_node("Gather", [f"{part}_rows", "rows"], [f"{part}_kept"], axis=0),
                  helper.make_node("Reshape", [f"{part}_kept", "shape"], [f"{part}_out"])]
    graph = helper.make_graph(
        nodes, "prefixkv_compact",
        [helper.make_tensor_value_info("key", elem, cache), helper.make_tensor_value_info("value", elem, cache),
         helper.make_tensor_value_info("rows", TensorProto.INT64, ["rows"]),
         helper.make_tensor_value_info("shape", TensorProto.INT64, [4]),
         helper.make_tensor_value_info("flat", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info(f"{p}_out", elem, ["batch", "heads", "capacity", "dim"]) for p in ("key", "value")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9).SerializeToString()


def serialized(dtype: str) -> bytes:
    """The stored graph for ``dtype`` buffers ("float32" or "float16")."""
    if dtype not in STORED:
        raise ValueError(f"no compaction graph for {dtype} caches; the ONNX Runtime engines are {' or '.join(DTYPES)}")
    return base64.b64decode(STORED[dtype])


# base64 of build(dtype), written by: python -c "from prefixkv.engines.compaction_graph import *; print(stored_source())"
STORED = {
    "float32": "CAk6oQQKHgoDa2V5CgRmbGF0EghrZXlfcm93cyIHUmVzaGFwZQovCghrZXlfcm93cwoEcm93cxIIa2V5X2tlcHQiBkdhdGhlcioLCgRheGlzGACgAQIKIwoIa2V5X2tlcHQKBXNoYXBlEgdrZXlfb3V0IgdSZXNoYXBlCiIKBXZhbHVlCgRmbGF0Egp2YWx1ZV9yb3dzIgdSZXNoYXBlCjMKCnZhbHVlX3Jvd3MKBHJvd3MSCnZhbHVlX2tlcHQiBkdhdGhlcioLCgRheGlzGACgAQIKJwoKdmFsdWVfa2VwdAoFc2hhcGUSCXZhbHVlX291dCIHUmVzaGFwZRIQcHJlZml4a3ZfY29tcGFjdFovCgNrZXkSKAomCAESIgoHEgViYXRjaAoHEgVoZWFkcwoHEgVzbG90cwoFEgNkaW1aMQoFdmFsdWUSKAomCAESIgoHEgViYXRjaAoHEgVoZWFkcwoHEgVzbG90cwoFEgNkaW1aFgoEcm93cxIOCgwIBxIICgYSBHJvd3NaEwoFc2hhcGUSCgoICAcSBAoCCARaEgoEZmxhdBIKCggIBxIECgIIAmI2CgdrZXlfb3V0EisKKQgBEiUKBxIFYmF0Y2gKBxIFaGVhZHMKChIIY2FwYWNpdHkKBRIDZGltYjgKCXZhbHVlX291dBIrCikIARIlCgcSBWJhdGNoCgcSBWhlYWRzCgoSCGNhcGFjaXR5CgUSA2RpbUIECgAQEg==",
    "float16": "CAk6oQQKHgoDa2V5CgRmbGF0EghrZXlfcm93cyIHUmVzaGFwZQovCghrZXlfcm93cwoEcm93cxIIa2V5X2tlcHQiBkdhdGhlcioLCgRheGlzGACgAQIKIwoIa2V5X2tlcHQKBXNoYXBlEgdrZXlfb3V0IgdSZXNoYXBlCiIKBXZhbHVlCgRmbGF0Egp2YWx1ZV9yb3dzIgdSZXNoYXBlCjMKCnZhbHVlX3Jvd3MKBHJvd3MSCnZhbHVlX2tlcHQiBkdhdGhlcioLCgRheGlzGACgAQIKJwoKdmFsdWVfa2VwdAoFc2hhcGUSCXZhbHVlX291dCIHUmVzaGFwZRIQcHJlZml4a3ZfY29tcGFjdFovCgNrZXkSKAomCAoSIgoHEgViYXRjaAoHEgVoZWFkcwoHEgVzbG90cwoFEgNkaW1aMQoFdmFsdWUSKAomCAoSIgoHEgViYXRjaAoHEgVoZWFkcwoHEgVzbG90cwoFEgNkaW1aFgoEcm93cxIOCgwIBxIICgYSBHJvd3NaEwoFc2hhcGUSCgoICAcSBAoCCARaEgoEZmxhdBIKCggIBxIECgIIAmI2CgdrZXlfb3V0EisKKQgKEiUKBxIFYmF0Y2gKBxIFaGVhZHMKChIIY2FwYWNpdHkKBRIDZGltYjgKCXZhbHVlX291dBIrCikIChIlCgcSBWJhdGNoCgcSBWhlYWRzCgoSCGNhcGFjaXR5CgUSA2RpbUIECgAQEg==",
}


def stored_source() -> str:
    """The ``STORED`` literal for this file (after a change to ``build``)."""
    lines = "".join(f'    "{d}": "{base64.b64encode(build(d)).decode()}",\n' for d in DTYPES)
    return "STORED = {\n" + lines + "}"
