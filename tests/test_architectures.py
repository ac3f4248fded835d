"""Every model family is either right or refused before any work starts.

Tiny random models of each family: the supported ones are built and validated end to end
(the engine's prefill graph against the PyTorch reference, greedy decoding in lockstep); the
PyTorch path is checked against the model's own SDPA attention; the others are refused in
one line naming what is missing.
"""
from __future__ import annotations

import pytest
import torch
from test_export import one_torch_thread, write_tokenizer  # noqa: F401  (autouse)

from prefixkv import architectures
from prefixkv.architectures import UnsupportedModel

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              tie_word_embeddings=False)


def config_of(family: str, **extra):
    import transformers as T

    kinds = {
        "llama": (T.LlamaConfig, {}),
        "mistral": (T.MistralConfig, {"sliding_window": None}),
        "mistral-window": (T.MistralConfig, {"sliding_window": 48}),
        "qwen2": (T.Qwen2Config, {}),
        "qwen3": (T.Qwen3Config, {"head_dim": 16}),
        "gemma": (T.GemmaConfig, {"head_dim": 16}),
        "granite": (T.GraniteConfig, {"embedding_multiplier": 12.0, "residual_multiplier": 0.22, "logits_scaling": 8.0,
                                      "attention_multiplier": 0.0625}),
        "phi3": (T.Phi3Config, {"sliding_window": None}),
        "olmo2": (T.Olmo2Config, {}),
        "gemma2": (T.Gemma2Config, {"head_dim": 16, "sliding_window": 32}),
        "qwen2-partial-window": (T.Qwen2Config, {"use_sliding_window": True, "sliding_window": 32, "max_window_layers": 1}),
    }
    cls, own = kinds[family]
    return cls(**{**COMMON, **own, **extra})


def tiny(family: str, attn: str = "prefixkv", **extra):
    from transformers import AutoModelForCausalLM

    import prefixkv

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_of(family, **extra)).eval()
    with torch.no_grad():  # random norms, so that a misplaced norm shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    if attn == "prefixkv":
        prefixkv.enable(model)
    else:
        model.set_attn_implementation(attn)
    return model


SUPPORTED = ["llama", "mistral", "mistral-window", "qwen2", "qwen3", "gemma", "granite", "phi3", "olmo2"]


@pytest.mark.parametrize("family", SUPPORTED)
def test_the_pytorch_path_is_the_models_own_attention(family):
    """The prefixkv attention (full cache) gives the logits of the model's own SDPA attention,
    within the model's window where it has one."""
    from prefixkv.cache import PrefixKVCache

    ids = torch.randint(3, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    mine = tiny(family)
    with torch.no_grad():
        want = tiny(family, attn="sdpa")(input_ids=ids).logits
        plain = mine(input_ids=ids).logits
        cached = mine(input_ids=ids, past_key_values=PrefixKVCache(method="full", keep_fraction=1.0)).logits
    assert torch.allclose(plain, want, atol=1e-4, rtol=1e-4)
    assert torch.allclose(cached, want, atol=1e-4, rtol=1e-4)


def test_a_sliding_window_is_kept_not_ignored():
    """Mistral with a window shorter than the input: the PyTorch path refuses the input (it does
    not silently attend beyond the window, which SDPA would not), in one line, and the
    engine's context is the window."""
    from prefixkv.attention import WindowExceeded
    from prefixkv.cache import PrefixKVCache

    model = tiny("mistral-window")
    assert architectures.structure(model).window == 48
    ids = torch.randint(3, 256, (1, 60))
    with pytest.raises(WindowExceeded, match="sliding window of 48 tokens.*this one has 60 tokens"):
        model(input_ids=ids)
    with pytest.raises(WindowExceeded, match="sliding window of 48"):
        model(input_ids=ids, past_key_values=PrefixKVCache(method="h2o", keep_fraction=0.5))
    cache = PrefixKVCache(method="h2o", keep_fraction=0.5)
    with torch.no_grad():
        model(input_ids=ids[:, :47], past_key_values=cache)
        model(input_ids=ids[:, 47:48], past_key_values=cache)  # 48 tokens: still inside
        with pytest.raises(WindowExceeded):
            model(input_ids=ids[:, 48:49], past_key_values=cache)


@pytest.mark.parametrize("family", SUPPORTED)
def test_each_supported_family_builds_and_validates(family, tmp_path):
    from test_export import SMALL_VALIDATION

    from prefixkv.engines.validate import ValidationConfig
    from prefixkv.pipeline import BuildConfig, build_engine
    from prefixkv.profile import Fingerprint, LayerKeep, RetentionProfile

    model = tiny(family)
    folder = tmp_path / family
    model.save_pretrained(folder)
    write_tokenizer(folder)
    model.prefixkv_source = str(folder)
    profile = RetentionProfile(Fingerprint.of(model.config), sink=1, calibrated={0.5: LayerKeep([0.4, 0.6], [0.0, 0.0])})
    small = {**SMALL_VALIDATION, "prompt_tokens": 36, "quality_samples": 1}
    config = BuildConfig(str(folder), tmp_path / "engine", 0.5, profile=profile,
                         validation=ValidationConfig(**small, quality=False))
    result = build_engine(config, model=model, log=lambda m: None)
    checks = result.validation["checks"]
    assert result.passed, {k: {x: y for x, y in v.items() if x in ("passed", "status", "max_abs_diff", "first_mismatch")}
                           for k, v in checks.items()}
    assert checks["graph"]["kept_positions_identical"] and checks["generation"]["passed"]
    if family == "mistral-window":
        assert result.manifest["max_context"] == 48


@pytest.mark.parametrize("family,why", [
    ("gemma2", "soft-capping"),
    ("qwen2-partial-window", "sliding windows on some layers only"),
])
def test_what_is_not_implemented_is_refused_in_one_line(family, why, tmp_path, capsys):
    from prefixkv.cli import main

    with pytest.raises(UnsupportedModel, match=why) as err:
        tiny(family)
    assert "\n" not in str(err.value) and "prefixkv supports" in str(err.value)
    model = tiny(family, attn="eager")
    folder = tmp_path / family
    model.save_pretrained(folder)
    write_tokenizer(folder)
    capsys.readouterr()
    code = main(["build", "--model", str(folder), "--calibrate", "--output", str(tmp_path / "engine"), "--no-validate"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert code == 2 and len(errors) == 1 and errors[0].startswith(f"error: {type(model).__name__}:") and why in errors[0]
    assert not (tmp_path / "engine").exists()


def test_the_structures_read_from_the_models():
    s = {f: architectures.structure(tiny(f, attn="eager")) for f in SUPPORTED + ["gemma2"]}
    assert (s["granite"].embedding_multiplier, s["granite"].residual_multiplier, s["granite"].logits_scaling) == (12.0, 0.22, 8.0)
    assert s["phi3"].fused_qkv and not s["llama"].fused_qkv
    assert (s["olmo2"].norms, s["olmo2"].qk_norm) == ("post", "full")
    assert (s["qwen3"].norms, s["qwen3"].qk_norm) == ("pre", "head")
    assert s["mistral-window"].window == 48 and s["mistral"].window is None and s["qwen2"].window is None
    assert s["gemma2"].norms == "sandwich" and s["gemma2"].softcap and s["gemma2"].partial_window
    assert all(not s[f].export_problems() for f in SUPPORTED)
