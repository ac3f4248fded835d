"""The three PrefixKV ops as OpenAI Triton kernels, with launch wrappers and PTX compilation.

    prefill_scores_kernel   two-pass flash attention: pass 1 streams key blocks for each
                            query row's log-sum-exp; pass 2 recomputes the probabilities
                            block by block, accumulating the output and the column sums
                            (attention mass per key).  The S x S matrix never exists.
    select_gather_kernel    one layer's compaction: per row, the keep count from the fp32
                            rule, a 32-step radix select of the count-th largest key,
                            then a scan that scatters kept K/V rows right-aligned.
    decode_kernel           attention of new tokens over a compacted cache with a
                            validity mask; GQA by grouping query heads, K/V never repeated.

The specification is ``prefixkv.plugins.reference``; tests compare the two.

Kernel arguments follow the TensorRT AOT plugin convention (tensorrt.plugin.aot_impl):
input pointers, then int32 scalars, then output pointers, then constexprs.  Tensors are
contiguous; strides follow from the shapes.  Per-layer values (keep fraction, sink,
protect_last, scaling) are constexprs, so they are baked into the compiled PTX.

Importance is written without atomics: each prefill program owns one row of a partial
buffer (B, P, S), P = cdiv(Q, BLOCK_M) * (H / HEADS_PER_PROGRAM), and the caller sums over
P (here ``partial.sum(1)``; in a TensorRT graph a ReduceSum node).  Deterministic, and
the output needs no zero-initialisation (TensorRT does not clear plugin outputs).

Costs: the prefill partial buffer is B x P x S float32 (P = S / BLOCK_M x Hkv with the
default heads_per_program = H / Hkv); the select kernel reads a row's scores 34 times
(count, 32 radix steps, scan) in each of its Hkv programs, O(S) memory and no sort.

CPU: kernels run in Triton's interpreter when TRITON_INTERPRET=1 is set before triton is
first imported (note: importing transformers' model classes, hence ``prefixkv``, imports
triton).  GPU: tensors on CUDA launch the compiled kernels.
"""
from __future__ import annotations

import dataclasses
import re

import torch

from ..optional import optional_import

_TRITON = "pip install triton (on a CPU-only machine set TRITON_INTERPRET=1 to run the kernels in the interpreter)"
triton = optional_import("triton", _TRITON, "OpenAI Triton")
tl = optional_import("triton.language", _TRITON, "OpenAI Triton")

NEG_INF = tl.constexpr(float("-inf"))


# ----------------------------------------------------------------------------------------
# prefill: attention + attention mass per key
# ----------------------------------------------------------------------------------------
@triton.jit
def prefill_scores_kernel(
    Q, K, V, VALID,  # inputs: (B, H, q_len, D), (B, Hkv, S, D) x2, (B, S) int32
    q_len, seq_len,  # int32
    OUT, PARTIAL,  # outputs: (B, q_len, H, D), (B, P, S) float32
    SCALE: tl.constexpr,
    HEADS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_PER_PROGRAM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid (cdiv(q_len, BLOCK_M), B * HEADS // HEADS_PER_PROGRAM)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    n_chunks: tl.constexpr = HEADS // HEADS_PER_PROGRAM
    group: tl.constexpr = HEADS // KV_HEADS
    b = pid_bh // n_chunks
    chunk = pid_bh % n_chunks
    n_m = tl.cdiv(q_len, BLOCK_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < q_len
    pos_m = seq_len - q_len + offs_m  # position of each query row among the S keys
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    valid_row = VALID + b.to(tl.int64) * seq_len
    q_valid = tl.load(valid_row + pos_m, mask=row_ok, other=0) != 0
    weight = tl.where(q_valid & row_ok, 1.0 / HEADS, 0.0)  # padded queries give no mass

    part_row = PARTIAL + ((b * n_m + pid_m) * n_chunks + chunk).to(tl.int64) * seq_len
    for start in range(0, seq_len, BLOCK_N):  # this program owns its partial row
        offs_n = start + tl.arange(0, BLOCK_N)
        tl.store(part_row + offs_n, tl.zeros([BLOCK_N], tl.float32), mask=offs_n < seq_len)
    tl.debug_barrier()  # the row is read back below, possibly by other threads of the program

    hi = tl.minimum(seq_len, seq_len - q_len + (pid_m + 1) * BLOCK_M)  # causal end
    for hh in range(HEADS_PER_PROGRAM):
        h = chunk * HEADS_PER_PROGRAM + hh
        kvh = h // group
        q_ptrs = Q + ((b * HEADS + h).to(tl.int64) * q_len + offs_m[:, None]) * HEAD_DIM + offs_d[None, :]
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        kv_base = (b * KV_HEADS + kvh).to(tl.int64) * seq_len * HEAD_DIM

        # pass 1: running max and sum of exponentials -> log-sum-exp per row
        m_i = tl.full([BLOCK_M], NEG_INF, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_ok = offs_n < seq_len
            k = tl.load(K + kv_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :],
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            k_valid = tl.load(valid_row + offs_n, mask=n_ok, other=0) != 0
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * SCALE
            allowed = ((offs_n[None, :] <= pos_m[:, None]) & k_valid[None, :]) | (
                (offs_n[None, :] == pos_m[:, None]) & ~q_valid[:, None])
            allowed = allowed & row_ok[:, None] & n_ok[None, :]
            s = tl.where(allowed, s, NEG_INF)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
            m_i = m_new
        lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), 0.0)

        # pass 2: exact probabilities -> output and column sums
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start in range(0, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_ok = offs_n < seq_len
            k = tl.load(K + kv_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :],
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            v = tl.load(V + kv_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :],
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            k_valid = tl.load(valid_row + offs_n, mask=n_ok, other=0) != 0
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * SCALE
            allowed = ((offs_n[None, :] <= pos_m[:, None]) & k_valid[None, :]) | (
                (offs_n[None, :] == pos_m[:, None]) & ~q_valid[:, None])
            allowed = allowed & row_ok[:, None] & n_ok[None, :]
            p = tl.where(allowed, tl.exp(s - lse[:, None]), 0.0)
            acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            col = tl.sum(p * weight[:, None], 0)
            old = tl.load(part_row + offs_n, mask=n_ok, other=0.0)
            tl.store(part_row + offs_n, old + col, mask=n_ok)
        out_ptrs = OUT + ((b.to(tl.int64) * q_len + offs_m[:, None]) * HEADS + h) * HEAD_DIM + offs_d[None, :]
        tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        tl.debug_barrier()  # the next head adds to the same partial row


# ----------------------------------------------------------------------------------------
# compaction: keep count, radix select, right-aligned scatter of K/V
# ----------------------------------------------------------------------------------------
@triton.jit
def _order_keys(SCORES, VALID, row, offs, seq_len, n_before, SINK: tl.constexpr, PROTECT_LAST: tl.constexpr):
    """Protected scores of one block as order-preserving int64 keys in [0, 2**32).

    Returns (keys, valid, n_valid_before_each): padding -> key of -inf, the first SINK
    real tokens and (PROTECT_LAST) column S-1 -> key of +inf, like ``compaction.protect``.
    """
    ok = offs < seq_len
    valid = (tl.load(VALID + row * seq_len + offs, mask=ok, other=0) != 0) & ok
    s = tl.load(SCORES + row * seq_len + offs, mask=ok, other=0.0).to(tl.float32)
    s = tl.where(s == 0.0, 0.0, s)  # -0.0 ties with +0.0, as in torch.sort
    vi = valid.to(tl.int32)
    rank = n_before + tl.cumsum(vi, 0) - vi  # real tokens before this column
    protected = valid & (rank < SINK)
    if PROTECT_LAST:
        protected = protected | (valid & (offs == seq_len - 1))
    s = tl.where(protected, float("inf"), s)
    s = tl.where(valid, s, float("-inf"))
    bits = s.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # float order == signed int order
    return key.to(tl.int64) + 2147483648, valid, rank


@triton.jit
def select_gather_kernel(
    K, V, SCORES, VALID,  # inputs: (B, Hkv, S, D) x2, (B, S) float32, (B, S) int32
    seq_len, width,  # int32: S, slots W (>= every row's count)
    K_OUT, V_OUT, POSITIONS, KEPT,  # outputs: (B, Hkv, W, D) x2, (B, W) int, (B, W) int
    FRACTION: tl.constexpr,
    SINK: tl.constexpr,
    PROTECT_LAST: tl.constexpr,
    KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (B, KV_HEADS).  Every program selects its row; program h gathers KV head h."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    row = b.to(tl.int64)
    lead = (tl.zeros([BLOCK_S], tl.int32) + h) == 0  # head 0 writes positions and kept

    # the row's keep count, exactly ``compaction.keep_counts`` (fp32 multiply, then + 0.5)
    n = 0
    for start in range(0, seq_len, BLOCK_S):
        offs = start + tl.arange(0, BLOCK_S)
        n += tl.sum((tl.load(VALID + row * seq_len + offs, mask=offs < seq_len, other=0) != 0).to(tl.int32), 0)
    frac = tl.full([], FRACTION, tl.float32)
    k = tl.floor(frac * n.to(tl.float32) + 0.5).to(tl.int32)
    protected = tl.minimum(n, SINK)
    if PROTECT_LAST:
        protected += (n > protected).to(tl.int32)
    count = tl.maximum(tl.minimum(k, n), protected)

    # radix select: the largest t with #{key >= t} >= count (the count-th largest key)
    one = tl.full([], 1, tl.int64)
    thr = tl.zeros([], tl.int64)
    for i in range(32):
        cand = thr | (one << (tl.full([], 31, tl.int32) - i).to(tl.int64))
        c = 0
        n_before = 0
        for start in range(0, seq_len, BLOCK_S):
            offs = start + tl.arange(0, BLOCK_S)
            key, valid, rank = _order_keys(SCORES, VALID, row, offs, seq_len, n_before, SINK, PROTECT_LAST)
            c += tl.sum(((key >= cand) & (offs < seq_len)).to(tl.int32), 0)
            n_before += tl.sum(valid.to(tl.int32), 0)
        thr = tl.where(c >= count, cand, thr)
    greater = 0
    n_before = 0
    for start in range(0, seq_len, BLOCK_S):
        offs = start + tl.arange(0, BLOCK_S)
        key, valid, rank = _order_keys(SCORES, VALID, row, offs, seq_len, n_before, SINK, PROTECT_LAST)
        greater += tl.sum(((key > thr) & (offs < seq_len)).to(tl.int32), 0)
        n_before += tl.sum(valid.to(tl.int32), 0)
    need_equal = count - greater  # ties at the threshold, taken lowest index first

    # empty slots at the front
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    out_base = (b * KV_HEADS + h).to(tl.int64) * width * HEAD_DIM
    in_base = (b * KV_HEADS + h).to(tl.int64) * seq_len * HEAD_DIM
    first = width - count
    for start in range(0, width, BLOCK_S):
        slots = start + tl.arange(0, BLOCK_S)
        empty = slots < first
        zeros = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
        tile = out_base + slots[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(K_OUT + tile, zeros.to(K_OUT.dtype.element_ty), mask=empty[:, None] & d_ok[None, :])
        tl.store(V_OUT + tile, zeros.to(V_OUT.dtype.element_ty), mask=empty[:, None] & d_ok[None, :])
        tl.store(POSITIONS + row * width + slots, tl.full([BLOCK_S], -1, tl.int32), mask=empty & lead)
        tl.store(KEPT + row * width + slots, tl.zeros([BLOCK_S], tl.int32), mask=empty & lead)

    # scan: kept entries in original order, right-aligned
    n_kept = 0
    n_equal = 0
    n_before = 0
    for start in range(0, seq_len, BLOCK_S):
        offs = start + tl.arange(0, BLOCK_S)
        key, valid, rank = _order_keys(SCORES, VALID, row, offs, seq_len, n_before, SINK, PROTECT_LAST)
        ok = offs < seq_len
        equal = ((key == thr) & ok).to(tl.int32)
        equal_rank = n_equal + tl.cumsum(equal, 0) - equal
        # count == 0 leaves thr at 2**32 - 1 and need_equal at 0: nothing is kept
        kept = ok & ((key > thr) | ((equal != 0) & (equal_rank < need_equal)))
        ki = kept.to(tl.int32)
        slot = first + n_kept + tl.cumsum(ki, 0) - ki
        tl.store(POSITIONS + row * width + slot, rank, mask=kept & lead)
        tl.store(KEPT + row * width + slot, tl.full([BLOCK_S], 1, tl.int32), mask=kept & lead)
        src = in_base + offs[:, None] * HEAD_DIM + offs_d[None, :]
        dst = out_base + slot[:, None] * HEAD_DIM + offs_d[None, :]
        m2 = kept[:, None] & d_ok[None, :]
        tl.store(K_OUT + dst, tl.load(K + src, mask=m2, other=0.0), mask=m2)
        tl.store(V_OUT + dst, tl.load(V + src, mask=m2, other=0.0), mask=m2)
        n_kept += tl.sum(ki, 0)
        n_equal += tl.sum(equal, 0)
        n_before += tl.sum(valid.to(tl.int32), 0)


# ----------------------------------------------------------------------------------------
# decode: attention over a compacted cache
# ----------------------------------------------------------------------------------------
@triton.jit
def decode_kernel(
    Q, K, V, VALID,  # inputs: (B, H, q_len, D), (B, Hkv, W, D) x2, (B, W) int32
    q_len, width,  # int32
    OUT,  # output: (B, q_len, H, D)
    SCALE: tl.constexpr,
    HEADS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid (cdiv(group * q_len, BLOCK_M), B * KV_HEADS): the query heads of one KV head
    share each K/V tile (rows = group x q_len), so K/V are read once per group."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    group: tl.constexpr = HEADS // KV_HEADS
    b = pid_bh // KV_HEADS
    kvh = pid_bh % KV_HEADS

    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < group * q_len
    g = r // q_len
    i = r % q_len
    h = kvh * group + g
    pos = width - q_len + i  # slot of each query token
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    valid_row = VALID + b.to(tl.int64) * width
    q_valid = tl.load(valid_row + pos, mask=row_ok, other=0) != 0
    q_ptrs = Q + ((b * HEADS + h).to(tl.int64) * q_len + i)[:, None] * HEAD_DIM + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    kv_base = (b * KV_HEADS + kvh).to(tl.int64) * width * HEAD_DIM

    m_i = tl.full([BLOCK_M], NEG_INF, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, width, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < width
        k = tl.load(K + kv_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(V + kv_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        k_valid = tl.load(valid_row + offs_n, mask=n_ok, other=0) != 0
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * SCALE
        allowed = ((offs_n[None, :] <= pos[:, None]) & k_valid[None, :]) | (
            (offs_n[None, :] == pos[:, None]) & ~q_valid[:, None])
        allowed = allowed & row_ok[:, None] & n_ok[None, :]
        s = tl.where(allowed, s, NEG_INF)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out_ptrs = OUT + ((b.to(tl.int64) * q_len + i) * HEADS + h)[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(out_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------
# launch wrappers (torch tensors in, torch tensors out)
# ----------------------------------------------------------------------------------------
def interpreter_ready() -> bool:
    """True when these kernels (and triton.language itself) run in Triton's CPU interpreter:
    TRITON_INTERPRET=1 was set before triton was first imported."""
    interpreted = type(tl.sum).__name__ == "InterpretedFunction"
    return interpreted and type(prefill_scores_kernel).__name__ == "InterpretedFunction"


def _check_device(*tensors: torch.Tensor) -> None:
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        raise ValueError(f"all tensors must be on one device, got {sorted({str(t.device) for t in tensors})}")
    if device.type == "cpu" and not interpreter_ready():
        raise RuntimeError(
            "CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before triton is first imported "
            "(or move the tensors to a CUDA device)"
        )


def head_block(head_dim: int) -> int:
    """BLOCK_D for a head dim: the next power of two, at least 16 (tl.dot needs >= 16)."""
    return max(16, triton.next_power_of_2(head_dim))


def _dot_precision(dtype: torch.dtype) -> str | None:
    return "ieee" if dtype == torch.float32 else None  # fp32: no TF32 shortcut


def _check_gqa(heads: int, kv_heads: int) -> None:
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of KV heads ({kv_heads})")


def partial_rows(q_len: int, heads: int, heads_per_program: int, block_m: int) -> int:
    """P, the rows of the prefill kernel's partial importance buffer (B, P, S)."""
    return triton.cdiv(q_len, block_m) * (heads // heads_per_program)


def launch_prefill(q, k, v, valid, out, partial, scaling, heads_per_program, block_m=16, block_n=16) -> None:
    """Launch ``prefill_scores_kernel`` into given buffers (contiguous; valid int32;
    out (B, Q, H, D); partial (B, P, S) float32, see ``partial_rows``)."""
    b, heads, q_len, d = q.shape
    kv_heads, seq_len = k.shape[1], k.shape[2]
    prefill_scores_kernel[(triton.cdiv(q_len, block_m), b * (heads // heads_per_program))](
        q, k, v, valid, q_len, seq_len, out, partial,
        SCALE=float(scaling), HEADS=heads, KV_HEADS=kv_heads, HEAD_DIM=d, HEADS_PER_PROGRAM=heads_per_program,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=head_block(d), DOT_PRECISION=_dot_precision(q.dtype),
    )


def prefill_attention_with_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_valid: torch.Tensor,
    scaling: float,
    block_m: int = 16,
    block_n: int = 16,
    heads_per_program: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``reference.prefill_attention_with_scores``.

    q (B, H, Q, D); k, v (B, Hkv, S, D); key_valid (B, S) bool.
    Returns out (B, Q, H, D) in q's dtype and importance (B, S) float32.
    heads_per_program: query heads one program handles, a divisor of H (default the GQA
    group, H / Hkv); more heads per program, a smaller partial buffer but fewer programs.
    On a GPU use block_m = block_n = 64 or 128.
    """
    _check_device(q, k, v, key_valid)
    b, heads, q_len, d = q.shape
    kv_heads, seq_len = k.shape[1], k.shape[2]
    _check_gqa(heads, kv_heads)
    hpp = heads // kv_heads if heads_per_program is None else heads_per_program
    if hpp < 1 or heads % hpp:
        raise ValueError(f"heads_per_program ({hpp}) must divide the query heads ({heads})")
    out = torch.empty(b, q_len, heads, d, dtype=q.dtype, device=q.device)
    partial = torch.empty(b, partial_rows(q_len, heads, hpp, block_m), seq_len, dtype=torch.float32, device=q.device)
    launch_prefill(q.contiguous(), k.contiguous(), v.contiguous(), key_valid.to(torch.int32).contiguous(),
                   out, partial, scaling, hpp, block_m, block_n)
    return out, partial.sum(1)


def fraction_f32(fraction: float | torch.Tensor) -> float:
    """The keep fraction as the fp32 value the spec multiplies with (a Python float)."""
    return float(torch.as_tensor(fraction, dtype=torch.float32))


def launch_select(k, v, scores, valid, k_out, v_out, positions, kept, fraction, sink, protect_last, block_s=16) -> None:
    """Launch ``select_gather_kernel`` into given buffers (contiguous; scores float32;
    valid, positions, kept int32; W = k_out.shape[2] must cover every row's count)."""
    b, kv_heads, seq_len, d = k.shape
    select_gather_kernel[(b, kv_heads)](
        k, v, scores, valid, seq_len, k_out.shape[2], k_out, v_out, positions, kept,
        FRACTION=fraction_f32(fraction), SINK=int(sink), PROTECT_LAST=bool(protect_last),
        KV_HEADS=kv_heads, HEAD_DIM=d, BLOCK_S=block_s, BLOCK_D=head_block(d),
        **_no_fp_fusion(k.device),
    )


def select_and_gather(
    k: torch.Tensor,
    v: torch.Tensor,
    importance: torch.Tensor,
    key_valid: torch.Tensor,
    fraction: float | torch.Tensor,
    sink: int,
    protect_last: bool = True,
    width: int | None = None,
    block_s: int = 16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton ``reference.select_and_gather``.

    k, v (B, Hkv, S, D); importance (B, S); key_valid (B, S) bool.
    width: slots W; default the largest row count (what ``compaction.compact`` returns).
    A larger W (e.g. ``reference.width_bound``) adds empty slots at the front.
    Returns k_kept, v_kept (B, Hkv, W, D), positions (B, W) int64 (-1: empty), kept (B, W) bool.
    Empty slots hold zeros.
    """
    from ..compaction import keep_counts

    _check_device(k, v, importance, key_valid)
    b, kv_heads, seq_len, d = k.shape
    counts = keep_counts(key_valid.sum(-1), fraction_f32(fraction), sink, protect_last)
    needed = int(counts.max()) if b else 0
    width = needed if width is None else int(width)
    if width < needed:
        raise ValueError(f"width {width} is smaller than the largest row's keep count {needed}")
    k_out = torch.empty(b, kv_heads, width, d, dtype=k.dtype, device=k.device)
    v_out = torch.empty(b, kv_heads, width, d, dtype=v.dtype, device=v.device)
    positions = torch.empty(b, width, dtype=torch.int32, device=k.device)
    kept = torch.empty(b, width, dtype=torch.int32, device=k.device)
    launch_select(k.contiguous(), v.contiguous(), importance.to(torch.float32).contiguous(),
                  key_valid.to(torch.int32).contiguous(), k_out, v_out, positions, kept,
                  fraction, sink, protect_last, block_s)
    return k_out, v_out, positions.to(torch.int64), kept.bool()


def _no_fp_fusion(device: torch.device) -> dict:
    # floor(f * n + 0.5) must round twice like torch; an FMA would round once
    return {} if device.type == "cpu" else {"enable_fp_fusion": False}


def launch_decode(q, k, v, valid, out, scaling, block_m=16, block_n=16) -> None:
    """Launch ``decode_kernel`` into ``out`` (B, Q, H, D) (contiguous; valid int32)."""
    b, heads, q_len, d = q.shape
    kv_heads, width = k.shape[1], k.shape[2]
    rows = (heads // kv_heads) * q_len
    decode_kernel[(triton.cdiv(rows, block_m), b * kv_heads)](
        q, k, v, valid, q_len, width, out,
        SCALE=float(scaling), HEADS=heads, KV_HEADS=kv_heads, HEAD_DIM=d,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=head_block(d), DOT_PRECISION=_dot_precision(q.dtype),
    )


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor,
    scaling: float,
    block_m: int = 16,
    block_n: int = 16,
) -> torch.Tensor:
    """Triton ``reference.decode_attention``.

    q (B, H, Q, D); k, v (B, Hkv, W, D); valid (B, W) bool.  Returns (B, Q, H, D).
    """
    _check_device(q, k, v, valid)
    b, heads, q_len, d = q.shape
    _check_gqa(heads, k.shape[1])
    out = torch.empty(b, q_len, heads, d, dtype=q.dtype, device=q.device)
    launch_decode(q.contiguous(), k.contiguous(), v.contiguous(), valid.to(torch.int32).contiguous(),
                  out, scaling, block_m, block_n)
    return out


# ----------------------------------------------------------------------------------------
# ahead-of-time compilation to PTX (no GPU needed)
# ----------------------------------------------------------------------------------------
KERNELS = {
    "prefill_scores": prefill_scores_kernel,
    "select_gather": select_gather_kernel,
    "decode": decode_kernel,
}

# pointer arguments of each kernel: "data" follows the model dtype, others are fixed
_POINTERS = {
    "prefill_scores": {"Q": "data", "K": "data", "V": "data", "VALID": "i32", "OUT": "data", "PARTIAL": "fp32"},
    "select_gather": {"K": "data", "V": "data", "SCORES": "fp32", "VALID": "i32",
                      "K_OUT": "data", "V_OUT": "data", "POSITIONS": "i32", "KEPT": "i32"},
    "decode": {"Q": "data", "K": "data", "V": "data", "VALID": "i32", "OUT": "data"},
}
_SCALARS = {"prefill_scores": ("q_len", "seq_len"), "select_gather": ("seq_len", "width"), "decode": ("q_len", "width")}
_DTYPES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


@dataclasses.dataclass(frozen=True)
class CompiledKernel:
    """A kernel compiled ahead of time.  ``ptx`` takes exactly the kernel's own arguments
    (input pointers, int32 scalars, output pointers): Triton's unused hidden scratch
    pointers are removed, so a launcher such as a TensorRT AOT plugin can call it."""

    name: str
    ptx: str
    num_warps: int
    shared: int
    num_params: int


def compile_ptx(kernel: str, dtype: str = "fp16", arch: int = 90, num_warps: int = 4, **constexprs) -> CompiledKernel:
    """Compile one kernel to PTX for ``sm_<arch>`` without a GPU (triton.compile + GPUTarget).

    kernel: "prefill_scores" | "select_gather" | "decode"; dtype: the K/V/Q dtype;
    constexprs: every ``tl.constexpr`` argument of that kernel (e.g. FRACTION=0.25, SINK=4).
    Needs TRITON_INTERPRET unset (the interpreter replaces the jitted functions).
    """
    from triton.backends.compiler import GPUTarget

    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    fn = KERNELS[kernel]
    if not isinstance(fn, triton.runtime.JITFunction):
        raise RuntimeError("compile_ptx needs TRITON_INTERPRET unset before triton is imported (run it in a fresh process)")
    data = _DTYPES.get(str(dtype).replace("torch.", ""))
    if data is None:
        raise ValueError(f"unsupported dtype {dtype!r}; choose fp32, fp16 or bf16")
    signature = {}
    for name in fn.arg_names:
        if name in _POINTERS[kernel]:
            kind = _POINTERS[kernel][name]
            signature[name] = f"*{data if kind == 'data' else kind}"
        elif name in _SCALARS[kernel]:
            signature[name] = "i32"
        else:
            signature[name] = "constexpr"
    missing = [n for n, t in signature.items() if t == "constexpr" and n not in constexprs]
    if missing:
        raise ValueError(f"{kernel} needs constexprs {missing}")
    options = {"num_warps": num_warps}
    if kernel == "select_gather":
        options["enable_fp_fusion"] = False
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=dict(constexprs))
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    user_params = len(_POINTERS[kernel]) + len(_SCALARS[kernel])
    md = compiled.metadata
    ptx = strip_hidden_params(compiled.asm["ptx"], md.name, user_params,
                              md.global_scratch_size, getattr(md, "profile_scratch_size", 0))
    return CompiledKernel(md.name, ptx, md.num_warps, md.shared, user_params)


def strip_hidden_params(ptx: str, name: str, keep: int, global_scratch: int = 0, profile_scratch: int = 0) -> str:
    """Drop the trailing parameters Triton appends (global / profile scratch pointers).

    Only when they are unused (scratch sizes 0 and never loaded), which is checked.
    """
    params = re.findall(rf"\b{re.escape(name)}_param_(\d+)", ptx)
    declared = sorted({int(p) for p in params})
    extra = [p for p in declared if p >= keep]
    if not extra:
        return ptx
    if global_scratch or profile_scratch:
        raise RuntimeError(f"{name} uses Triton scratch memory ({global_scratch} + {profile_scratch} bytes); "
                           "it cannot be launched with only its own arguments")
    for p in extra:
        if re.search(rf"\[{re.escape(name)}_param_{p}\]", ptx):
            raise RuntimeError(f"{name} reads hidden parameter {p}; cannot strip it")
    header = re.search(rf"\.entry {re.escape(name)}\((.*?)\)", ptx, re.S)
    if header is None:
        raise RuntimeError(f"no .entry {name} in the PTX")
    lines = [ln for ln in header.group(1).split(",") if not any(re.search(rf"_param_{p}\s*$", ln) for p in extra)]
    return ptx[: header.start(1)] + ",".join(lines).rstrip() + "\n" + ptx[header.end(1):]


__all__ = [
    "prefill_scores_kernel",
    "select_gather_kernel",
    "decode_kernel",
    "prefill_attention_with_scores",
    "select_and_gather",
    "decode_attention",
    "launch_prefill",
    "launch_select",
    "launch_decode",
    "partial_rows",
    "compile_ptx",
    "strip_hidden_params",
    "interpreter_ready",
    "CompiledKernel",
    "KERNELS",
]
