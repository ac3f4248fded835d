"""The PrefixKV kernels as TensorRT Python plugins ("quickly deployable plugins", QDP).

Written against the documented ``tensorrt.plugin`` API (TensorRT 10.x and 11.x):
``trtp.register`` (shapes and dtypes), ``trtp.autotune`` (supported types),
``trtp.aot_impl`` (returns a Triton kernel compiled to PTX + ``trtp.KernelLaunchParams``
+ ``trtp.SymIntExprs`` for the int32 scalar arguments), ``trtp.impl`` (JIT fallback, a
Python callback).  References: the tensorrt.plugin.aot_impl API page, NVIDIA/TensorRT
samples/python/quickly_deployable_plugins (qdp_defs.py, README "ONNX model with an AOT
plugin"), pytorch/TensorRT examples/dynamo/aot_plugin.py.

No ``from __future__ import annotations`` here: ``tensorrt.plugin`` reads the argument and
return annotations at registration time and needs them as real classes.

Plugins, namespace ``prefixkv`` (the ONNX op type is the plugin name):

    PrefixKVPrefillScores  q (B,H,Q,D), k, v (B,Hkv,S,D), valid (B,S) int32
                           -> out (B,Q,H,D), partial (B,P,S) float32
                           attributes: scaling, heads_per_program, block_m, block_n
                           importance = ReduceSum(partial, axis 1) in the graph
    PrefixKVSelect         k, v (B,Hkv,S,D), importance (B,S) float32, valid (B,S) int32
                           -> k_kept, v_kept (B,Hkv,W,D), positions (B,W) int32, kept (B,W) int32
                           attributes: keep_fraction, sink, protect_last
                           W = reference.width_bound(S, keep_fraction, ...) (symbolic)
    PrefixKVDecode         q (B,H,Q,D), k, v (B,Hkv,W,D), valid (B,W) int32 -> out (B,Q,H,D)
                           attributes: scaling

One plugin instance per layer, each with its own attributes.  AOT plugins do not
serialise their attributes into the engine (tensorrt.plugin.aot_impl docs); that is fine
here because every per-layer value (keep fraction, sink, protect_last, scaling) is a
kernel constexpr, baked into that layer's PTX when the engine is built.  An AOT engine
therefore runs without Python (trtexec, C++).  The JIT path needs ``register_plugins()``
in the process that deserialises the engine.

No TopK anywhere: TensorRT's TopK is limited to K <= 3840, the select kernel does a radix
select instead.  Everything here is unverified on a GPU in this repository's CI.
"""
import os
from typing import Tuple, Union

from ..optional import optional_import
from . import reference

NAMESPACE = "prefixkv"
VERSION = "1"
PREFILL, SELECT, DECODE = "PrefixKVPrefillScores", "PrefixKVSelect", "PrefixKVDecode"
PLUGIN_IDS = {name: f"{NAMESPACE}::{name}" for name in (PREFILL, SELECT, DECODE)}

# GPU launch defaults (BLOCK_S: key positions per step of the select scan)
PREFILL_BLOCK = 64
DECODE_BLOCK_M, DECODE_BLOCK_N = 16, 64
SELECT_BLOCK_S = 256

_registered = False


def import_tensorrt():
    """(tensorrt, tensorrt.plugin), or a ``StackMissing`` error that says how to get them."""
    install = "pip install tensorrt (needs a GPU machine with CUDA; TensorRT >= 10.8 for tensorrt.plugin AOT plugins)"
    return optional_import("tensorrt", install, "TensorRT"), optional_import("tensorrt.plugin", install, "TensorRT")


def cuda_arch() -> int:
    """Compute capability to compile PTX for: PREFIXKV_CUDA_ARCH (e.g. 90), else the
    current GPU's, else 90 (Hopper)."""
    if os.environ.get("PREFIXKV_CUDA_ARCH"):
        return int(os.environ["PREFIXKV_CUDA_ARCH"])
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return major * 10 + minor
    except Exception:  # pragma: no cover - best effort
        pass
    return 90


def symbolic_width(seq_len, fraction: float, sink: int, protect_last: bool, minimum=min, maximum=max):
    """``reference.width_bound`` with integer ops only, so it also runs on TensorRT shape
    expressions (pass ``minimum=trtp.min, maximum=trtp.max`` and a ShapeExpr ``seq_len``)."""
    p = reference.width_numerator(fraction)
    k = minimum(seq_len, (seq_len * p) // reference.WIDTH_DENOMINATOR + 1)
    sinks = minimum(seq_len, int(sink))
    protected = sinks + (sinks < seq_len) * int(bool(protect_last))
    return maximum(k, protected)


def _const(expr, what: str) -> int:
    """A build-time constant dimension (heads, head dim) from a TensorRT shape expression."""
    if expr.is_fake or not expr.is_constant:
        raise ValueError(f"{what} must be a static dimension of the ONNX graph to compile the PrefixKV kernels")
    return int(expr.constant_value())


def _dtype_name(trt, dtype) -> str:
    names = {trt.float32: "fp32", trt.float16: "fp16", trt.bfloat16: "bf16"}
    if dtype not in names:
        raise ValueError(f"PrefixKV plugins take float32, float16 or bfloat16 tensors, got {dtype}")
    return names[dtype]


def register_plugins() -> None:
    """Register the three plugins with TensorRT (idempotent).  Call before parsing an ONNX
    graph with PrefixKV nodes, and before deserialising an engine built with the JIT path."""
    global _registered
    if _registered:
        return
    trt, trtp = import_tensorrt()
    _define(trt, trtp)
    _registered = True


def _define(trt, trtp) -> None:  # noqa: C901 - the plugin definitions, read top to bottom
    from . import kernels  # needs triton (for the AOT compile and the JIT launch)

    float_types = "FP16|BF16|FP32"

    # ------------------------------------------------------------------ prefill
    @trtp.register(PLUGIN_IDS[PREFILL])
    def _prefill_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, valid: trtp.TensorDesc,
                      scaling: float, heads_per_program: int, block_m: int, block_n: int
                      ) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        b, heads, q_len, d = q.shape_expr
        out = trtp.from_shape_expr((b, q_len, heads, d), dtype=q.dtype)
        rows = trtp.cdiv(q_len, block_m) * (heads // heads_per_program)
        partial = trtp.from_shape_expr((b, rows, k.shape_expr[2]), dtype=trt.float32)
        return out, partial

    @trtp.autotune(PLUGIN_IDS[PREFILL])
    def _prefill_autotune(q, k, v, valid, outputs):
        return [trtp.AutoTuneCombination(f"{float_types}, {float_types}, {float_types}, INT32, {float_types}, FP32")]

    @trtp.aot_impl(PLUGIN_IDS[PREFILL])
    def _prefill_aot(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, valid: trtp.TensorDesc,
                     scaling: float, heads_per_program: int, block_m: int, block_n: int,
                     outputs: Tuple[trtp.TensorDesc], tactic: int
                    ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]:
        heads, d = _const(q.shape_expr[1], "query heads"), _const(q.shape_expr[3], "head dim")
        kv_heads = _const(k.shape_expr[1], "KV heads")
        dtype = _dtype_name(trt, q.dtype)
        ck = kernels.compile_ptx(
            "prefill_scores", dtype, cuda_arch(), SCALE=float(scaling), HEADS=heads, KV_HEADS=kv_heads, HEAD_DIM=d,
            HEADS_PER_PROGRAM=int(heads_per_program), BLOCK_M=int(block_m), BLOCK_N=int(block_n),
            BLOCK_D=kernels.head_block(d), DOT_PRECISION="ieee" if dtype == "fp32" else None,
        )
        q_len, seq_len = q.shape_expr[2], k.shape_expr[2]
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(q_len, int(block_m))
        launch.grid_y = q.shape_expr[0] * (heads // int(heads_per_program))
        launch.block_x = ck.num_warps * 32
        launch.shared_mem = ck.shared
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(q_len), trtp.SymInt32(seq_len)])
        return ck.name, ck.ptx, launch, extra

    @trtp.impl(PLUGIN_IDS[PREFILL])
    def _prefill_jit(q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, valid: trtp.Tensor, scaling: float,
                     heads_per_program: int, block_m: int, block_n: int, outputs: Tuple[trtp.Tensor], stream: int) -> None:
        import torch

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            t = [torch.as_tensor(x, device="cuda") for x in (q, k, v, valid, outputs[0], outputs[1])]
            kernels.launch_prefill(*t, scaling, int(heads_per_program), int(block_m), int(block_n))

    # ------------------------------------------------------------------ select
    @trtp.register(PLUGIN_IDS[SELECT])
    def _select_desc(k: trtp.TensorDesc, v: trtp.TensorDesc, importance: trtp.TensorDesc, valid: trtp.TensorDesc,
                     keep_fraction: float, sink: int, protect_last: int
                     ) -> Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
        b, kv_heads, seq_len, d = k.shape_expr
        width = symbolic_width(seq_len, keep_fraction, sink, bool(protect_last), trtp.min, trtp.max)
        k_out = trtp.from_shape_expr((b, kv_heads, width, d), dtype=k.dtype)
        v_out = trtp.from_shape_expr((b, kv_heads, width, d), dtype=v.dtype)
        positions = trtp.from_shape_expr((b, width), dtype=trt.int32)
        kept = trtp.from_shape_expr((b, width), dtype=trt.int32)
        return k_out, v_out, positions, kept

    @trtp.autotune(PLUGIN_IDS[SELECT])
    def _select_autotune(k, v, importance, valid, outputs):
        return [trtp.AutoTuneCombination(f"{float_types}, {float_types}, FP32, INT32, {float_types}, {float_types}, INT32, INT32")]

    @trtp.aot_impl(PLUGIN_IDS[SELECT])
    def _select_aot(k: trtp.TensorDesc, v: trtp.TensorDesc, importance: trtp.TensorDesc, valid: trtp.TensorDesc,
                    keep_fraction: float, sink: int, protect_last: int, outputs: Tuple[trtp.TensorDesc], tactic: int
                    ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]:
        kv_heads, d = _const(k.shape_expr[1], "KV heads"), _const(k.shape_expr[3], "head dim")
        ck = kernels.compile_ptx(
            "select_gather", _dtype_name(trt, k.dtype), cuda_arch(),
            FRACTION=kernels.fraction_f32(keep_fraction), SINK=int(sink), PROTECT_LAST=bool(protect_last),
            KV_HEADS=kv_heads, HEAD_DIM=d, BLOCK_S=SELECT_BLOCK_S, BLOCK_D=kernels.head_block(d),
        )
        launch = trtp.KernelLaunchParams()
        launch.grid_x = k.shape_expr[0]
        launch.grid_y = kv_heads
        launch.block_x = ck.num_warps * 32
        launch.shared_mem = ck.shared
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(k.shape_expr[2]), trtp.SymInt32(outputs[0].shape_expr[2])])
        return ck.name, ck.ptx, launch, extra

    @trtp.impl(PLUGIN_IDS[SELECT])
    def _select_jit(k: trtp.Tensor, v: trtp.Tensor, importance: trtp.Tensor, valid: trtp.Tensor, keep_fraction: float,
                    sink: int, protect_last: int, outputs: Tuple[trtp.Tensor], stream: int) -> None:
        import torch

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            ins = [torch.as_tensor(x, device="cuda") for x in (k, v, importance, valid)]
            outs = [torch.as_tensor(x, device="cuda") for x in outputs]
            kernels.launch_select(*ins, *outs, keep_fraction, int(sink), bool(protect_last), SELECT_BLOCK_S)

    # ------------------------------------------------------------------ decode
    @trtp.register(PLUGIN_IDS[DECODE])
    def _decode_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, valid: trtp.TensorDesc,
                     scaling: float) -> trtp.TensorDesc:
        b, heads, q_len, d = q.shape_expr
        return trtp.from_shape_expr((b, q_len, heads, d), dtype=q.dtype)

    @trtp.autotune(PLUGIN_IDS[DECODE])
    def _decode_autotune(q, k, v, valid, outputs):
        return [trtp.AutoTuneCombination(f"{float_types}, {float_types}, {float_types}, INT32, {float_types}")]

    @trtp.aot_impl(PLUGIN_IDS[DECODE])
    def _decode_aot(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, valid: trtp.TensorDesc,
                    scaling: float, outputs: Tuple[trtp.TensorDesc], tactic: int
                    ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]:
        heads, d = _const(q.shape_expr[1], "query heads"), _const(q.shape_expr[3], "head dim")
        kv_heads = _const(k.shape_expr[1], "KV heads")
        dtype = _dtype_name(trt, q.dtype)
        ck = kernels.compile_ptx(
            "decode", dtype, cuda_arch(), SCALE=float(scaling), HEADS=heads, KV_HEADS=kv_heads, HEAD_DIM=d,
            BLOCK_M=DECODE_BLOCK_M, BLOCK_N=DECODE_BLOCK_N, BLOCK_D=kernels.head_block(d),
            DOT_PRECISION="ieee" if dtype == "fp32" else None,
        )
        q_len = q.shape_expr[2]
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(q_len * (heads // kv_heads), DECODE_BLOCK_M)
        launch.grid_y = q.shape_expr[0] * kv_heads
        launch.block_x = ck.num_warps * 32
        launch.shared_mem = ck.shared
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(q_len), trtp.SymInt32(k.shape_expr[2])])
        return ck.name, ck.ptx, launch, extra

    @trtp.impl(PLUGIN_IDS[DECODE])
    def _decode_jit(q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, valid: trtp.Tensor, scaling: float,
                    outputs: Tuple[trtp.Tensor], stream: int) -> None:
        import torch

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            t = [torch.as_tensor(x, device="cuda") for x in (q, k, v, valid, outputs[0])]
            kernels.launch_decode(*t, scaling, DECODE_BLOCK_M, DECODE_BLOCK_N)


__all__ = [
    "NAMESPACE",
    "VERSION",
    "PREFILL",
    "SELECT",
    "DECODE",
    "PLUGIN_IDS",
    "register_plugins",
    "import_tensorrt",
    "symbolic_width",
    "cuda_arch",
]
