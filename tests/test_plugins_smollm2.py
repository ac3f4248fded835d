"""The Triton prefill kernel's importance equals the core's scores on real SmolLM2 activations."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("triton", reason="the kernels need OpenAI Triton: pip install triton")

SCRIPT = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from transformers import AttentionInterface
    from prefixkv import PrefixKVCache, load_model
    from prefixkv.attention import prefixkv_attention
    from prefixkv.data import builtin_samples
    from prefixkv.plugins import kernels as K

    captured = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx in (0, 7, 29) and query.shape[2] > 1:
            captured[module.layer_idx] = (query.clone(), key.clone(), value.clone())
        return prefixkv_attention(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("capture", capture)
    model, tok = load_model("smollm2-135m")
    text = builtin_samples(tok, "evaluation", n=1, tokens=96, reference_tokens=0)[0]["prompt"]
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    cache = PrefixKVCache(method="full", keep_fraction=1.0, record=["accumulated"])
    with torch.no_grad():
        model.set_attn_implementation("capture")
        model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
    core = cache.recorded_scores()["accumulated"][:, 0]
    valid = torch.ones(1, ids.shape[1], dtype=torch.bool)
    worst = 0.0
    for layer, (q, k, v) in captured.items():
        out, importance = K.prefill_attention_with_scores(q, k, v, valid, q.shape[-1] ** -0.5)
        worst = max(worst, float((importance[0] - core[layer]).abs().max()))
        assert torch.allclose(importance[0], core[layer], atol=1e-4), layer
    print("OK", sorted(captured), worst)
""")


def test_kernel_importance_equals_core_scores_on_smollm2():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "OK [0, 7, 29]" in done.stdout
