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
