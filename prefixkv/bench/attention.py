"""One layer's attention in a prefill, ONNX Runtime's fused kernel against PyTorch SDPA, in one process.

    python -m prefixkv.bench.attention CONTEXT [--heads 9] [--kv-heads 3] [--head-dim 64]
                                               [--chunk 256] [--threads 2] [--rounds 5]

An engine's prefill runs each layer's ``com.microsoft::GroupQueryAttention`` once per chunk
of ``--chunk`` tokens against the layer's growing buffer, rotating the query and keys itself.
This times those calls for a CONTEXT-token prompt of random numbers in four variants: with
the additive bias that masks empty slots ("bias"), returning the probabilities of a scored
layer (``qk_output``, "probabilities"), both, and neither ("plain", the op as
onnxruntime-genai runs it); and, in turn with them, one causal
``scaled_dot_product_attention`` over the whole prompt (PyTorch's prefill of the same layer).
All on ``--threads`` threads, ``--rounds`` rounds, the order reversed every other round.
Prints one JSON line: each variant's and SDPA's seconds per round, and per variant the
median of its rounds' ratios to SDPA and to "plain".

It separates the attention kernel's share of ``bench speed``'s prefill ratio from the rest
of the graph (the projections, the MLPs and the engine's own ops), and what the bias and
the probabilities cost the kernel.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


VARIANTS = {"plain": (False, False), "bias": (True, False), "probabilities": (False, True),
            "bias+probabilities": (True, True)}  # name -> (bias, probabilities)


def gqa_session(ort, heads: int, kv_heads: int, head_dim: int, threads: int, bias: bool, probabilities: bool):
    """A session of one GroupQueryAttention node as an engine's decoder has it: packed q/k/v
    (B, C, (H + 2 Hkv) D), buffers bound in place, rotary tables and position ids, and
    optionally the additive bias (B, 1, C, T) and the probabilities (B, H, C, T)."""
    from onnx import TensorProto, helper

    f, i32, i64 = TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64
    width = (heads + 2 * kv_heads) * head_dim
    inputs = [helper.make_tensor_value_info("qkv", f, [1, "C", width]),
              helper.make_tensor_value_info("past_key", f, [1, kv_heads, "cap", head_dim]),
              helper.make_tensor_value_info("past_value", f, [1, kv_heads, "cap", head_dim]),
              helper.make_tensor_value_info("seqlens_k", i32, [1]), helper.make_tensor_value_info("total", i32, [1]),
              helper.make_tensor_value_info("cos", f, ["R", head_dim // 2]),
              helper.make_tensor_value_info("sin", f, ["R", head_dim // 2]),
              helper.make_tensor_value_info("position_ids", i64, [1, "C"])]
    names = ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total", "cos", "sin", "position_ids"]
    outputs = [helper.make_tensor_value_info("out", f, [1, "C", heads * head_dim]),
               helper.make_tensor_value_info("present_key", f, [1, kv_heads, "cap", head_dim]),
               helper.make_tensor_value_info("present_value", f, [1, kv_heads, "cap", head_dim])]
    attributes = {"num_heads": heads, "kv_num_heads": kv_heads, "do_rotary": 1, "scale": head_dim ** -0.5}
    if bias:
        inputs.append(helper.make_tensor_value_info("bias", f, [1, 1, "C", "T"]))
        names.append("bias")
    if probabilities:
        outputs.append(helper.make_tensor_value_info("probabilities", f, [1, heads, "C", "T"]))
        attributes["qk_output"] = 2
    node = helper.make_node("GroupQueryAttention", names, [o.name for o in outputs], domain="com.microsoft", **attributes)
    model = helper.make_model(helper.make_graph([node], "attention", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    from ..engines.onnxruntime import session_options  # the options every engine's graph runs with

    return ort.InferenceSession(model.SerializeToString(), session_options(ort, threads), providers=["CPUExecutionProvider"])


def time_gqa(ort, session, qkv: np.ndarray, kv_heads: int, head_dim: int, chunk: int, bias: bool,
             probabilities: bool) -> float:
    """Seconds of the op over every chunk of one prompt (``qkv`` (1, N, width)), buffers of N slots."""
    n = qkv.shape[1]
    key, value = (ort.OrtValue.ortvalue_from_shape_and_type((1, kv_heads, n, head_dim), np.float32) for _ in range(2))
    rng = np.random.default_rng(1)
    cos, sin = (rng.standard_normal((n, head_dim // 2), dtype=np.float32) for _ in range(2))
    binding = session.io_binding()
    for name, buffer in (("past_key", key), ("past_value", value)):
        binding.bind_ortvalue_input(name, buffer)
        binding.bind_ortvalue_output(name.replace("past", "present"), buffer)
    binding.bind_cpu_input("cos", cos)
    binding.bind_cpu_input("sin", sin)
    seconds = 0.0
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        binding.bind_cpu_input("qkv", np.ascontiguousarray(qkv[:, start:stop]))
        binding.bind_cpu_input("seqlens_k", np.array([stop - 1], np.int32))
        binding.bind_cpu_input("total", np.array([stop], np.int32))
        binding.bind_cpu_input("position_ids", np.arange(start, stop, dtype=np.int64)[None])
        binding.bind_output("out", "cpu")  # afresh: the shapes change with the chunk
        if bias:
            binding.bind_cpu_input("bias", np.zeros((1, 1, stop - start, stop), np.float32))
        if probabilities:
            binding.bind_output("probabilities", "cpu")
        begin = time.perf_counter()
        session.run_with_iobinding(binding)
        seconds += time.perf_counter() - begin
    return seconds


def time_sdpa(torch, query, key, value) -> float:
    """Seconds of one causal SDPA over the whole prompt, its K/V heads shared by the query heads."""
    with torch.no_grad():
        begin = time.perf_counter()
        torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)
        return time.perf_counter() - begin


def measure(context: int, heads: int, kv_heads: int, head_dim: int, chunk: int, threads: int, rounds: int) -> dict:
    import onnxruntime as ort
    import torch

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((1, context, (heads + 2 * kv_heads) * head_dim), dtype=np.float32)
    q, k, v = np.split(qkv[0], [heads * head_dim, (heads + kv_heads) * head_dim], axis=-1)
    query, key, value = (torch.from_numpy(np.ascontiguousarray(t.reshape(context, -1, head_dim).transpose(1, 0, 2)))[None]
                         for t in (q, k, v))
    sessions = {name: gqa_session(ort, heads, kv_heads, head_dim, threads, *flags) for name, flags in VARIANTS.items()}
    runs = {name: (lambda name=name: time_gqa(ort, sessions[name], qkv, kv_heads, head_dim, chunk, *VARIANTS[name]))
            for name in VARIANTS}
    runs["sdpa"] = lambda: time_sdpa(torch, query, key, value)
    for name, flags in VARIANTS.items():  # warm-up
        time_gqa(ort, sessions[name], qkv[:, : min(context, 2 * chunk)], kv_heads, head_dim, chunk, *flags)
    time_sdpa(torch, query[:, :, :chunk], key[:, :, :chunk], value[:, :, :chunk])
    seconds = {name: [] for name in runs}
    for r in range(rounds):
        for name in (list(runs) if r % 2 == 0 else list(reversed(runs))):
            seconds[name].append(runs[name]())
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(seconds[a], seconds[b]))
    return {"context": context, "chunk": chunk, "threads": threads, "heads": heads, "kv_heads": kv_heads,
            "head_dim": head_dim, "rounds": rounds, "seconds": seconds,
            "median_vs_sdpa": {name: ratio(name, "sdpa") for name in VARIANTS},
            "median_vs_plain": {name: ratio(name, "plain") for name in VARIANTS if name != "plain"}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("context", type=int, help="prompt tokens")
    parser.add_argument("--heads", type=int, default=9, help="query heads (default: SmolLM2-135M's 9)")
    parser.add_argument("--kv-heads", type=int, default=3, help="key/value heads (default 3)")
    parser.add_argument("--head-dim", type=int, default=64, help="head size (default 64)")
    parser.add_argument("--chunk", type=int, default=None, help="prefill chunk (default: the engines' default)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of both (default 2)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, each timing both (default 5)")
    args = parser.parse_args(argv)
    from ..defaults import PREFILL_CHUNK

    chunk = PREFILL_CHUNK if args.chunk is None else args.chunk
    for flag, value in (("context", args.context), ("--heads", args.heads), ("--kv-heads", args.kv_heads),
                        ("--head-dim", args.head_dim), ("--chunk", chunk), ("--threads", args.threads),
                        ("--rounds", args.rounds)):
        if value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    if args.heads % args.kv_heads:
        parser.error(f"--heads must be a multiple of --kv-heads, got {args.heads} and {args.kv_heads}")
    if args.head_dim % 16:
        parser.error(f"--head-dim must be a multiple of 16 (the fused op's rotary tables), got {args.head_dim}")
    print(json.dumps(measure(args.context, args.heads, args.kv_heads, args.head_dim, chunk, args.threads, args.rounds)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
