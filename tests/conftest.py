"""Shared fixtures: a tiny seeded random Llama for fast tests, the real SmolLM2 for slow ones."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_llama(layers: int = 3, heads: int = 4, kv_heads: int = 2, vocab: int = 256, seed: int = 0, attn: str = "prefixkv"):
    """A seeded random LlamaForCausalLM: hidden 64, head dim 16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import prefixkv

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    if attn == "prefixkv":
        prefixkv.enable(model)
    else:
        model.set_attn_implementation(attn)
    return model


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct (converted once into PREFIXKV_CACHE)."""
    from prefixkv.models import load_model

    return load_model("smollm2-135m")


# -- one export per graph and session ------------------------------------------------------------
# Many tests build an engine of the same tiny model with the same profile (a build that fails its
# validation, a forced rebuild, the CLI's build of what a fixture built).  Tracing a graph is most
# of a tiny build's time (about 10 s a graph here), and within one session the exporter's code
# cannot change, so a graph traced once from the same module (its code's classes, settings and
# weights), the same sample inputs and the same export settings is handed out again as a copy.
# Large models (SmolLM2) are not kept: their engines are cached on disk by their own fixtures.
EXPORT_MEMO_MAX_PARAMETERS = 5_000_000
EXPORTS = {"traced": 0, "reused": 0}


def _described(value, depth: int = 0):
    """A deterministic description of an export's input: plain values as they are, tensors by
    their bytes' hash, configs by their JSON, dataclasses by their fields, anything else by its type
    (modules are described through ``named_modules`` and their weights)."""
    import dataclasses
    import hashlib

    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous().reshape(-1)
        raw = data.to(torch.uint8) if data.dtype == torch.bool else data.view(torch.uint8)
        return ("tensor", str(value.dtype), tuple(value.shape), hashlib.sha256(raw.numpy().tobytes()).hexdigest())
    if depth > 6:
        return type(value).__qualname__
    if isinstance(value, (list, tuple)):
        return tuple(_described(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), _described(v, depth + 1)) for k, v in value.items()))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (type(value).__qualname__, _described(dataclasses.asdict(value), depth + 1))
    if hasattr(value, "to_json_string"):  # a transformers config
        return (type(value).__qualname__, value.to_json_string(use_diff=False), getattr(value, "_attn_implementation", None))
    return type(value).__qualname__


def _export_key(wrapper, args, names, dynamic_shapes, opset, fused) -> str | None:
    import hashlib

    if sum(p.numel() for p in wrapper.parameters()) > EXPORT_MEMO_MAX_PARAMETERS:
        return None
    modules = [(name, type(m).__module__, type(m).__qualname__, m.training,
                _described({k: v for k, v in vars(m).items() if not k.startswith("_")}))
               for name, m in wrapper.named_modules()]
    described = (modules, _described(wrapper.state_dict()), _described(list(args)), _described(names),
                 repr(dynamic_shapes), opset, fused is None)
    return hashlib.sha256(repr(described).encode()).hexdigest()


@pytest.fixture(scope="session", autouse=True)
def one_export_per_graph():
    """Memoize ``prefixkv.exporter.onnx._trace`` for the session (see above); yields the
    counts {"traced", "reused"}."""
    import copy

    from prefixkv.exporter import onnx as exporter

    trace, memo, counts = exporter._trace, {}, EXPORTS

    def memoized(wrapper, args, names, dynamic_shapes, opset, fused=None):
        key = _export_key(wrapper, args, names, dynamic_shapes, opset, fused)
        if key is not None and key in memo:
            proto, found = memo[key]
            counts["reused"] += 1
            if fused is not None:
                fused.update(found)
            return copy.deepcopy(proto)
        proto = trace(wrapper, args, names, dynamic_shapes, opset, fused)
        counts["traced"] += 1
        if key is not None:
            memo[key] = (copy.deepcopy(proto), dict(fused or {}))
        return proto

    exporter._trace = memoized
    yield counts
    exporter._trace = trace


def pytest_terminal_summary(terminalreporter):
    if EXPORTS["traced"] or EXPORTS["reused"]:
        terminalreporter.write_line(f"graph exports: {EXPORTS['traced']} traced, {EXPORTS['reused']} reused within the session")
