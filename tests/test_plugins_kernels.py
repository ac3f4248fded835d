"""The Triton kernels against the PyTorch specification, in Triton's CPU interpreter,
and their ahead-of-time compilation to PTX for sm_90 (no GPU needed)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton", reason="the kernels need OpenAI Triton: pip install triton")

from prefixkv.plugins import kernels as K  # noqa: E402
from prefixkv.plugins import reference as R  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INTERPRETED = K.interpreter_ready()
needs_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="triton was imported before TRITON_INTERPRET=1; covered by test_kernels_in_fresh_process"
)


def left_padded(batch, seq, pads):
    valid = torch.ones(batch, seq, dtype=torch.bool)
    for row, pad in enumerate(pads):
        valid[row, :pad] = False
    return valid


@pytest.mark.skipif(INTERPRETED, reason="the kernels already run in this process's interpreter")
def test_kernels_in_fresh_process():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    only = "not fresh_process and not sm90 and not strip"  # those two run here already
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", only, __file__],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]


# ---------------------------------------------------------------------------- prefill
PREFILL_CASES = [
    # batch, heads, kv_heads, seq, q_len, head_dim, pads, heads_per_program
    (1, 2, 2, 16, 16, 8, [0], 1),  # GQA ratio 1, S a multiple of the block
    (2, 3, 1, 21, 21, 8, [0, 6], None),  # ratio 3, S not a multiple, left padding
    (2, 8, 1, 19, 19, 16, [3, 0], 8),  # ratio 8, all heads in one program
    (2, 6, 2, 19, 5, 12, [0, 16], 3),  # queries are the last 5 positions; head_dim not a power of 2
]


@needs_interpreter
@pytest.mark.parametrize("batch,heads,kv_heads,seq,q_len,dim,pads,hpp", PREFILL_CASES)
def test_prefill_matches_reference(batch, heads, kv_heads, seq, q_len, dim, pads, hpp):
    torch.manual_seed(seq + heads)
    q = torch.randn(batch, heads, q_len, dim)
    k, v = torch.randn(batch, kv_heads, seq, dim), torch.randn(batch, kv_heads, seq, dim)
    valid = left_padded(batch, seq, pads)
    out, importance = K.prefill_attention_with_scores(q, k, v, valid, dim ** -0.5, heads_per_program=hpp)
    want_out, want_importance = R.prefill_attention_with_scores(q, k, v, valid, dim ** -0.5)
    assert out.shape == want_out.shape and importance.shape == want_importance.shape
    assert torch.allclose(out, want_out, atol=1e-5, rtol=1e-5)
    assert torch.allclose(importance, want_importance, atol=1e-5, rtol=1e-5)
    assert (importance[~valid] == 0).all()


@needs_interpreter
def test_prefill_fp16():
    torch.manual_seed(3)
    q = torch.randn(1, 4, 17, 16).half()
    k, v = torch.randn(1, 2, 17, 16).half(), torch.randn(1, 2, 17, 16).half()
    valid = left_padded(1, 17, [2])
    out, importance = K.prefill_attention_with_scores(q, k, v, valid, 0.25)
    want_out, want_importance = R.prefill_attention_with_scores(q.float(), k.float(), v.float(), valid, 0.25)
    assert out.dtype == torch.float16
    assert torch.allclose(out.float(), want_out, atol=2e-2)
    assert torch.allclose(importance, want_importance, atol=2e-2)


# ---------------------------------------------------------------------------- selection
def _check_select(k, v, scores, valid, fraction, sink, protect_last, width=None, block_s=32):
    got = K.select_and_gather(k, v, scores, valid, fraction, sink, protect_last, width=width, block_s=block_s)
    want = R.select_and_gather(k, v, scores, valid, fraction, sink, protect_last)
    extra = got[2].shape[1] - want[2].shape[1]
    assert extra >= 0
    assert (got[2][:, :extra] == -1).all() and not got[3][:, :extra].any()  # spare slots: empty, in front
    k_got, v_got, pos_got, kept_got = (t[..., extra:, :] if t.dim() == 4 else t[:, extra:] for t in got)
    assert torch.equal(pos_got, want[2]), (pos_got, want[2])
    assert torch.equal(kept_got, want[3])
    mask = want[3][:, None, :, None]
    assert torch.equal(k_got * mask, want[0] * mask) and torch.equal(v_got * mask, want[1] * mask)
    assert ((k_got * ~mask) == 0).all() and ((v_got * ~mask) == 0).all()  # empty slots are zeroed


SELECT_CASES = [
    # batch, kv_heads, seq, pads, fraction, sink, protect_last, block_s
    (2, 1, 13, [0, 4], 0.4, 2, True, 32),
    (2, 3, 21, [5, 0], 0.25, 4, True, 8),  # several blocks per row
    (1, 2, 9, [0], 0.0, 2, True, 16),  # only the protected entries
    (2, 1, 11, [0, 3], 1.0, 0, False, 16),  # everything
    (3, 2, 7, [0, 7, 2], 0.5, 1, True, 8),  # a row with no real token
]


@needs_interpreter
@pytest.mark.parametrize("batch,kv_heads,seq,pads,fraction,sink,protect_last,block_s", SELECT_CASES)
def test_select_matches_compaction(batch, kv_heads, seq, pads, fraction, sink, protect_last, block_s):
    torch.manual_seed(seq)
    k, v = torch.randn(batch, kv_heads, seq, 8), torch.randn(batch, kv_heads, seq, 8)
    scores = torch.rand(batch, seq)
    _check_select(k, v, scores, left_padded(batch, seq, pads), fraction, sink, protect_last, block_s=block_s)


@needs_interpreter
def test_select_ties_and_signed_zeros():
    torch.manual_seed(5)
    k, v = torch.randn(2, 2, 24, 8), torch.randn(2, 2, 24, 8)
    scores = torch.randint(0, 3, (2, 24)).float()  # many exact ties
    scores[1, ::3] = -0.0  # -0.0 ties with +0.0, as in torch.sort
    scores[1, 1::3] = 0.0
    scores[0, :5] = -torch.rand(5)  # negative scores (key-norm style)
    valid = left_padded(2, 24, [0, 3])
    _check_select(k, v, scores, valid, 0.35, 2, True, block_s=8)


@needs_interpreter
def test_select_with_static_width():
    torch.manual_seed(6)
    k, v = torch.randn(2, 1, 15, 8), torch.randn(2, 1, 15, 8)
    width = R.width_bound(15, 0.3, 2, True)
    _check_select(k, v, torch.rand(2, 15), left_padded(2, 15, [0, 6]), 0.3, 2, True, width=width)
    with pytest.raises(ValueError, match="smaller than"):
        K.select_and_gather(k, v, torch.rand(2, 15), left_padded(2, 15, [0, 0]), 0.9, 2, True, width=3)


# ---------------------------------------------------------------------------- decode
DECODE_CASES = [(4, 4, 9, 1), (6, 2, 13, 1), (8, 1, 20, 3), (3, 1, 33, 2)]


@needs_interpreter
@pytest.mark.parametrize("heads,kv_heads,width,q_len", DECODE_CASES)
def test_decode_matches_reference(heads, kv_heads, width, q_len):
    torch.manual_seed(width)
    q = torch.randn(2, heads, q_len, 16)
    k, v = torch.randn(2, kv_heads, width, 16), torch.randn(2, kv_heads, width, 16)
    valid = torch.rand(2, width) > 0.3  # empty slots anywhere in the old part
    valid[:, :2] = False  # and at the front
    valid[:, -q_len:] = True  # the new tokens
    out = K.decode_attention(q, k, v, valid, 0.25)
    want = R.decode_attention(q, k, v, valid, 0.25)
    assert torch.allclose(out, want, atol=1e-5, rtol=1e-5)


@needs_interpreter
def test_prefill_select_decode_chain():
    """The three kernels in sequence reproduce the reference pipeline for one layer."""
    torch.manual_seed(9)
    b, h, hkv, s, d = 2, 6, 2, 18, 8
    q, k, v = torch.randn(b, h, s, d), torch.randn(b, hkv, s, d), torch.randn(b, hkv, s, d)
    valid = left_padded(b, s, [0, 5])
    _, imp = K.prefill_attention_with_scores(q, k, v, valid, 0.3)
    _, want_imp = R.prefill_attention_with_scores(q, k, v, valid, 0.3)
    kk, vv, pos, kept = K.select_and_gather(k, v, imp, valid, 0.4, 2, True)
    wk, wv, wpos, wkept = R.select_and_gather(k, v, want_imp, valid, 0.4, 2, True)
    assert torch.equal(pos, wpos)
    q_new = torch.randn(b, h, 1, d)
    k_new, v_new = torch.randn(b, hkv, 1, d), torch.randn(b, hkv, 1, d)
    cache_valid = torch.cat([kept, torch.ones(b, 1, dtype=torch.bool)], 1)
    out = K.decode_attention(q_new, torch.cat([kk, k_new], 2), torch.cat([vv, v_new], 2), cache_valid, 0.3)
    want = R.decode_attention(q_new, torch.cat([wk, k_new], 2), torch.cat([wv, v_new], 2), cache_valid, 0.3)
    assert torch.allclose(out, want, atol=1e-5)


def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(K, "interpreter_ready", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        K.decode_attention(torch.zeros(1, 1, 1, 8), torch.zeros(1, 1, 1, 8), torch.zeros(1, 1, 1, 8),
                           torch.ones(1, 1, dtype=torch.bool), 1.0)


# ---------------------------------------------------------------------------- PTX
COMPILE_SCRIPT = textwrap.dedent("""
    import json, re
    from prefixkv.plugins import kernels as K
    cases = [
        ("prefill_scores", "fp16", dict(SCALE=0.125, HEADS=32, KV_HEADS=8, HEAD_DIM=128, HEADS_PER_PROGRAM=4,
                                        BLOCK_M=64, BLOCK_N=64, BLOCK_D=128, DOT_PRECISION=None)),
        ("select_gather", "bf16", dict(FRACTION=0.3, SINK=4, PROTECT_LAST=True, KV_HEADS=8, HEAD_DIM=128,
                                       BLOCK_S=256, BLOCK_D=128)),
        ("decode", "fp16", dict(SCALE=0.125, HEADS=24, KV_HEADS=8, HEAD_DIM=64, BLOCK_M=16, BLOCK_N=64,
                                BLOCK_D=64, DOT_PRECISION=None)),
    ]
    out = {}
    for name, dtype, constexprs in cases:
        ck = K.compile_ptx(name, dtype, 90, **constexprs)
        entry = re.search(r"\\.entry (\\w+)\\((.*?)\\)", ck.ptx, re.S)
        out[name] = dict(name=ck.name, entry=entry.group(1), params=entry.group(2).count(".param"),
                         num_params=ck.num_params, has_entry=".entry" in ck.ptx,
                         sm90=".target sm_90" in ck.ptx, num_warps=ck.num_warps)
    print("RESULT" + json.dumps(out))
""")


def test_kernels_compile_to_ptx_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.split("RESULT", 1)[1])
    expected_params = {"prefill_scores": 8, "select_gather": 10, "decode": 7}  # inputs + int32 + outputs
    for name, info in result.items():
        assert info["has_entry"] and info["sm90"], info
        assert info["entry"] == info["name"] == f"{name}_kernel"
        assert info["params"] == info["num_params"] == expected_params[name], info


def test_strip_hidden_params():
    ptx = (".visible .entry k(\n\t.param .u64 .ptr .global .align 1 k_param_0,\n\t.param .u32 k_param_1,\n"
           "\t.param .u64 .ptr .global .align 1 k_param_2,\n\t.param .u64 .ptr .global .align 1 k_param_3\n)\n"
           "{\n\tld.param.b64 %rd1, [k_param_0];\n\tld.param.b32 %r1, [k_param_1];\n}\n")
    stripped = K.strip_hidden_params(ptx, "k", keep=2)
    assert "k_param_2" not in stripped and "k_param_3" not in stripped and "[k_param_1]" in stripped
    assert K.strip_hidden_params(ptx, "k", keep=4) == ptx
    with pytest.raises(RuntimeError, match="scratch"):
        K.strip_hidden_params(ptx, "k", keep=2, global_scratch=128)
    with pytest.raises(RuntimeError, match="reads hidden parameter"):
        K.strip_hidden_params(ptx, "k", keep=1)
