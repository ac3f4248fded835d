"""The PyTorch specification of the fused ops, against hand-computed and naive dense results."""
import math
import subprocess
import sys

import pytest
import torch

from prefixkv.compaction import keep_counts
from prefixkv.plugins import reference as R


def left_padded(batch, seq, pads):
    valid = torch.ones(batch, seq, dtype=torch.bool)
    for row, pad in enumerate(pads):
        valid[row, :pad] = False
    return valid


def dense_attention(q, k, v, valid, scaling):
    """Naive causal GQA attention with the full (Q, S) matrix: out (B, Q, H, D), mass (B, S)."""
    b, h, qn, d = q.shape
    s = k.shape[2]
    g = h // k.shape[1]
    k, v = k.repeat_interleave(g, 1).double(), v.repeat_interleave(g, 1).double()
    logits = q.double() @ k.transpose(-1, -2) * scaling  # (B, H, Q, S)
    rows = torch.arange(s - qn, s).view(-1, 1)
    cols = torch.arange(s).view(1, -1)
    q_valid = valid[:, s - qn:]
    allowed = ((cols <= rows) & valid[:, None, :]) | ((cols == rows) & ~q_valid[:, :, None])
    probs = logits.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
    out = (probs @ v).transpose(1, 2)
    mass = (probs * q_valid[:, None, :, None]).sum((1, 2)) / h
    return out, mass


def test_uniform_attention_mass_by_hand():
    # q = 0: every row spreads its mass evenly over the keys it may see
    q = torch.zeros(1, 2, 3, 4)
    k = torch.randn(1, 1, 3, 4)
    v = torch.randn(1, 1, 3, 4)
    out, mass = R.prefill_attention_with_scores(q, k, v, torch.ones(1, 3, dtype=torch.bool), 0.5)
    assert torch.allclose(mass[0], torch.tensor([1 + 1 / 2 + 1 / 3, 1 / 2 + 1 / 3, 1 / 3]))
    assert torch.allclose(out[0, 2, 1], v[0, 0].mean(0), atol=1e-6)  # last row: mean of all values

    # one pad at the front: the padded key gets nothing and the padded query gives nothing
    out, mass = R.prefill_attention_with_scores(q, k, v, torch.tensor([[False, True, True]]), 0.5)
    assert torch.allclose(mass[0], torch.tensor([0.0, 1 + 1 / 2, 1 / 2]))


@pytest.mark.parametrize("heads,kv_heads,seq,q_len,pads", [(4, 4, 9, 9, [0, 3]), (6, 2, 11, 11, [2, 0]), (8, 1, 10, 4, [0, 5])])
def test_prefill_matches_dense_attention(heads, kv_heads, seq, q_len, pads):
    torch.manual_seed(0)
    q = torch.randn(2, heads, q_len, 8)
    k, v = torch.randn(2, kv_heads, seq, 8), torch.randn(2, kv_heads, seq, 8)
    valid = left_padded(2, seq, pads)
    out, mass = R.prefill_attention_with_scores(q, k, v, valid, 0.35, block=3)
    want_out, want_mass = dense_attention(q, k, v, valid, 0.35)
    assert torch.allclose(out.double(), want_out, atol=1e-5)
    assert torch.allclose(mass.double(), want_mass, atol=1e-5)
    # every real query row hands out exactly one unit of mass
    assert torch.allclose(mass.sum(-1), valid[:, seq - q_len:].sum(-1).float(), atol=1e-4)


def test_select_by_hand():
    k = torch.arange(5.0).view(1, 1, 5, 1).expand(1, 2, 5, 3).contiguous()
    scores = torch.tensor([[5.0, 1.0, 3.0, 2.0, 4.0]])
    valid = torch.ones(1, 5, dtype=torch.bool)
    # 0.6 x 5 = 3 entries: sink 0 and last 4 are protected, then the best of the rest (2)
    kk, vv, pos, kept = R.select_and_gather(k, -k, scores, valid, 0.6, sink=1, protect_last=True)
    assert pos.tolist() == [[0, 2, 4]] and kept.all()
    assert kk[0, 1, :, 0].tolist() == [0.0, 2.0, 4.0] and vv[0, 0, :, 0].tolist() == [-0.0, -2.0, -4.0]

    # ties go to the lower index; a second row, shorter (left padding), gets empty slots in front
    scores = torch.tensor([[7.0, 1.0, 1.0, 1.0, 0.0], [0.0, 9.0, 2.0, 2.0, 2.0]])
    valid = torch.tensor([[True] * 5, [False, False, True, True, True]])
    _, _, pos, kept = R.select_and_gather(k.expand(2, 2, 5, 3), k.expand(2, 2, 5, 3), scores, valid, 0.6, 0, False)
    assert pos.tolist() == [[0, 1, 2], [-1, 0, 1]]  # row 1 keeps 2 of its 3 tokens (positions 0, 1)
    assert kept.tolist() == [[True, True, True], [False, True, True]]


def test_decode_matches_dense_attention():
    torch.manual_seed(1)
    q = torch.randn(2, 6, 2, 8)
    k, v = torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    valid = torch.tensor([[False, True, True, False, True, True, True], [True] * 7])
    out = R.decode_attention(q, k, v, valid, 0.3)
    want, _ = dense_attention(q, k, v, valid, 0.3)
    assert torch.allclose(out.double(), want, atol=1e-5)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.125, 0.3, 1 / 3, 0.5, 0.7, 0.9999, 1.0])
def test_width_bound_covers_every_row(fraction):
    lengths = torch.arange(0, 4097)
    counts = keep_counts(lengths, fraction, 4, True)
    bounds = torch.tensor([R.width_bound(s, fraction, 4, True) for s in lengths.tolist()])
    assert (bounds >= counts).all()
    assert (bounds <= counts + 2).all()
    assert (bounds <= lengths).all()


def test_width_bound_by_hand():
    assert R.width_bound(100, 0.25, 4) == 26  # 25 kept, one spare slot
    assert R.width_bound(10, 0.0, 4) == 5  # only the protected entries: 4 sinks + last
    assert R.width_bound(3, 0.5, 4) == 3  # never more than the sequence
    assert R.width_numerator(0.5) == 1 << 15
    with pytest.raises(ValueError, match="keep fraction"):
        R.width_numerator(1.5)
    assert math.isclose(R.width_numerator(0.1) / R.WIDTH_DENOMINATOR, 0.1, abs_tol=2 ** -16)


def test_plugins_import_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import prefixkv.plugins as p; assert callable(p.select_and_gather)\n"
        "try:\n    import prefixkv.plugins.kernels\nexcept ImportError as e:\n    print('ERR', e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ERR" in done.stdout and "pip install triton" in done.stdout
