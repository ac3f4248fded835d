"""Model sources: folder, .gguf, built-in name, hub id; each failure names the fix."""
import pytest

from prefixkv.models import ModelError, builtin_gguf, resolve


def test_builtin_name_points_at_the_packaged_gguf():
    path = builtin_gguf("smollm2-135m")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()


def test_builtin_conversion_is_cached():
    folder = resolve("smollm2-135m")  # converted once (conftest-free: the first call may take ~30 s)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert (folder / "tokenizer.json").is_file()
    assert resolve("smollm2-135m") == folder


def test_local_folder_checks(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        resolve(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert resolve(str(tmp_path)) == tmp_path
    with pytest.raises(ModelError, match="no GGUF file"):
        resolve(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelError, match="unknown model"):
        resolve("not-a-model")


def test_a_mistyped_path_is_named_not_fetched(tmp_path, monkeypatch):
    """A path that does not exist is reported as a path (with the nearest name), not as a hub
    download failure; a hub-shaped id is read as a path when its first part is a local folder."""
    (tmp_path / "models" / "tiny-llama").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match=r"no model folder at models/tiny-lama \(did you mean models/tiny-llama\?\); "
                                         r"check the path \(read as a local path"):
        resolve("models/tiny-lama")
    with pytest.raises(ModelError, match=r"^no model folder at .*/nowhere/model; check the path$"):
        resolve(str(tmp_path / "nowhere" / "model"))


def test_a_model_folder_without_a_tokenizer_says_so(tmp_path):
    from prefixkv.models import check_tokenizer

    with pytest.raises(ModelError, match=r"has no tokenizer \(tokenizer.json or tokenizer.model\); save the model's"):
        check_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    check_tokenizer(tmp_path)


def test_hub_id_offline_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="offline"):
        resolve("some-org/some-model")


def test_attention_features_prefixkv_does_not_implement_are_refused():
    """Gemma 2 soft-caps attention logits and alternates sliding-window layers: the prefixkv
    attention and the exporter would silently compute something else, so both refuse it."""
    import pytest
    import torch
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        GemmaConfig,
        GemmaForCausalLM,
    )

    import prefixkv
    from prefixkv.exporter.onnx import Decoder, ExportError

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16)
    torch.manual_seed(0)
    gemma2 = Gemma2ForCausalLM(Gemma2Config(**small))
    with pytest.raises(ValueError, match="soft-capping.*sliding windows on some layers only"):
        prefixkv.enable(gemma2)
    with pytest.raises(ExportError, match="soft-capping"):
        Decoder(gemma2)
    gemma = GemmaForCausalLM(GemmaConfig(**small))  # Gemma 1: supported, embedding scale inside embed_tokens
    prefixkv.enable(gemma)
    Decoder(gemma)
