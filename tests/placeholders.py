"""Complete manifest fields for placeholder engine folders (tests that need a folder, not graphs)."""
from __future__ import annotations


def engine_fields(fingerprint, fractions, keep_fraction: float = 0.2, **overrides) -> dict:
    """What ``build`` writes into a text engine's manifest besides the files, for placeholder
    decoder.onnx / compact.onnx (no external data) and ``fingerprint``'s shape."""
    fields = {
        "model": {"source": "tiny", "folder": "/models/tiny", "fingerprint": dict(fingerprint.__dict__)},
        "keep_fraction": keep_fraction, "layer_keep_fractions": list(fractions), "layers": len(fractions),
        "heads": fingerprint.heads, "kv_heads": fingerprint.kv_heads, "head_dim": fingerprint.head_dim, "vocab": 49152,
        "dtype": "float32", "sink": 4, "protect_last": True, "scorer": {"name": "accumulated", "params": {}},
        "evict_distance": 25, "opset": 18, "exporter": "test", "max_context": 1000,
        "graphs": {"decoder": {"file": "decoder.onnx"}, "compact": {"file": "compact.onnx"}},
        "backend": "onnxruntime", "tensorrt": None,
    }
    fields.update(overrides)
    return fields
