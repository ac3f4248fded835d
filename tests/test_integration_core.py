"""The core on the real SmolLM2-135M-Instruct: calibrate, then generate through model.generate."""
import json
import subprocess
import sys

import pytest
import torch

from prefixkv import PrefixKVCache
from prefixkv.calibration import calibrate
from prefixkv.data import builtin_samples

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def calibrated(smollm2):
    model, tokenizer = smollm2
    rows = builtin_samples(tokenizer, "calibration", n=3, tokens=256, reference_tokens=0)
    ids = [tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
    return calibrate(model, ids, [0.2, 0.5], ["accumulated", "window"], progress=False)


def test_profile_shape_and_layer_spread(calibrated):
    profile = calibrated.profiles["accumulated"]
    fractions = profile.layer_fractions(0.2)
    assert len(fractions) == 30
    assert sum(fractions) / 30 == pytest.approx(0.2, abs=1e-4)
    assert max(fractions) > 2 * min(fractions)  # layers differ: the reason PrefixKV exists
    assert profile.fingerprint.kv_heads == 3 and profile.fingerprint.head_dim == 64


@torch.no_grad()
def test_generate_with_the_profile(smollm2, calibrated):
    model, tokenizer = smollm2
    profile = calibrated.profiles["accumulated"]
    text = builtin_samples(tokenizer, "evaluation", n=1, tokens=300)[0]["prompt"]
    messages = [{"role": "user", "content": text + "\n\nSummarise the text above in one sentence."}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    n = inputs["input_ids"].shape[1]
    full = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    cache = PrefixKVCache(profile, keep_fraction=0.2)
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False, past_key_values=cache)
    assert out.shape[1] > n
    # after 15 cached new tokens each layer holds about its fraction of everything seen
    seen = n + out.shape[1] - n - 1
    lengths = cache.layer_lengths()[:, 0]
    fractions = torch.tensor(profile.layer_fractions(0.2))
    expected = torch.maximum(torch.floor(fractions * n + 0.5), torch.floor(fractions * seen + 0.5)).clamp_min(5)
    assert lengths.tolist() == expected.long().tolist()
    # generate() drives the cache exactly like a hand-written greedy loop over model forwards
    manual = PrefixKVCache(profile, keep_fraction=0.2)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    logits = model(input_ids=ids, attention_mask=mask, past_key_values=manual).logits[:, -1]
    tokens = []
    for _ in range(out.shape[1] - n):
        token = logits.argmax(-1, keepdim=True)
        tokens.append(token)
        mask = torch.cat([mask, torch.ones_like(token)], dim=-1)
        logits = model(input_ids=token, attention_mask=mask, past_key_values=manual).logits[:, -1]
    assert torch.equal(torch.cat(tokens, dim=-1), out[:, n:])
    assert full.shape[1] > n  # the full cache generates too (its text differs: keep 0.2 of a short prompt)


def test_cli_calibrate_writes_profile_and_refuses_overwrite(tmp_path):
    out = tmp_path / "profile.json"
    cmd = [sys.executable, "-m", "prefixkv.cli", "calibrate", "--keep", "0.3", "--samples", "2", "--tokens", "128",
           "--output", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert list(data["budgets"]) == ["0.3"] and data["calibration"]["samples"] == 2
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "pass --force" in again.stderr
