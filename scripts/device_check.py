#!/usr/bin/env python3
"""One prepared GPU check: the Triton kernels and PrefixKVCache on CUDA, and the paper's speed claim.

    python3 scripts/device_check.py --output DIR            # a CUDA machine (one H200: at most 8 min)
    python3 scripts/device_check.py --dry-run --output DIR  # the same code on the CPU, tiny shapes (< 1 min)

Writes DIR/device_check.json and DIR/device_check.png (docs/gpu.md explains both):

1. correctness on the device
   kernels/...   the fused Triton kernels (prefixkv.plugins.kernels: prefill scores, select/gather,
                 decode attention) against the PyTorch specification (prefixkv.plugins.reference),
                 random inputs at several shapes: max abs error against a stated tolerance
   cache/...     PrefixKVCache greedy generation of a seeded tiny random Llama on the device against
                 the same model on the CPU (kept positions per layer and tokens identical), and the
                 kernel path (PrefixKVCache with the three kernels, see ``KernelCache``) against the
                 PyTorch path on the device
2. speed/...      Llama-2-7B's shape (random weights, bf16, built on the GPU): keep 1.0 / 0.5 / 0.2 on
                 the PyTorch reference path and the kernel path (``PATHS``), contexts 1024 / 4096 /
                 16384 (32768 if time allows) at batch 1 and 16: prefill time, decode tokens/s, peak
                 GPU memory for the weights and above them (KV cache + activations), KV bytes held;
                 and the paper's setting (batch 16, 1024 prompt tokens, 512 generated, keep 1.0 vs
                 0.2; also with a profile allocation) next to its 1.8x (30.7 s vs 16.8 s, LLaVA-1.5-7B)
3. a summary line per check (passed / failed / skipped with the reason), printed and stored

Needs only torch, transformers, numpy, triton (for the kernels) and matplotlib (for the PNG;
without it the JSON says so), plus this repository: the repo root is put on sys.path, prefixkv
need not be installed.  Every section has a time budget; points that no longer fit are skipped
with the reason, and the JSON is rewritten after every check, so a run cut short keeps its
results.  --dry-run uses the CPU: a tiny random Llama instead of the 7B shape, short contexts,
a few decode steps, and the kernels in Triton's interpreter (TRITON_INTERPRET=1, set here
before triton is imported).  Its timings mean nothing; it proves the code runs.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import functools
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JSON_NAME, PNG_NAME = "device_check.json", "device_check.png"
PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"
GiB = 2**30
KEEP_COLORS = {1.0: "tab:blue", 0.5: "tab:green", 0.2: "tab:red"}


# ----------------------------------------------------------------------------------------
# run settings
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tolerance:
    """|got - want| <= atol + rtol x |want|, elementwise."""

    atol: float
    rtol: float


@dataclass(frozen=True)
class PrefillCase:
    batch: int
    heads: int
    kv_heads: int
    seq: int
    q_len: int
    head_dim: int
    pads: tuple[int, ...]  # left padding per row
    heads_per_program: int | None = None


@dataclass(frozen=True)
class SelectCase:
    batch: int
    kv_heads: int
    seq: int
    head_dim: int
    pads: tuple[int, ...]
    fraction: float
    sink: int
    protect_last: bool = True
    ties: bool = False  # integer-valued scores: many exact ties


@dataclass(frozen=True)
class DecodeCase:
    batch: int
    heads: int
    kv_heads: int
    width: int
    q_len: int
    head_dim: int


@dataclass(frozen=True)
class TimeLimits:
    """Seconds.  A section stops starting new points when its budget or the total is used up."""

    total_s: float
    kernels_s: float
    cache_s: float
    speed_s: float
    reserve_s: float  # kept back at the end for the plot and the last write


@dataclass(frozen=True)
class PaperSetting:
    """The paper's speed claim (PrefixKV, arXiv 2412.03409): LLaVA-1.5-7B, one GPU."""

    model: str = "LLaVA-1.5-7B"
    batch: int = 16
    prompt_tokens: int = 1024
    generated_tokens: int = 512
    keep: float = 0.2
    full_s: float = 30.7
    prefixkv_s: float = 16.8

    @property
    def speedup(self) -> float:
        return self.full_s / self.prefixkv_s


@dataclass(frozen=True)
class RunConfig:
    dry_run: bool
    device: str
    half_dtype: str  # the 16-bit dtype of the kernel checks
    kernel_block: int  # BLOCK_M = BLOCK_N of the prefill kernel and BLOCK_N of the decode kernel (16-bit)
    kernel_block_fp32: int  # the same for the float32 checks (fp32 tiles take twice the registers)
    select_block: int  # BLOCK_S of the select kernel
    prefill_cases: tuple[PrefillCase, ...]
    select_cases: tuple[SelectCase, ...]
    decode_cases: tuple[DecodeCase, ...]
    tol_fp32: Tolerance
    tol_half: Tolerance
    tiny_model: dict  # LlamaConfig fields of the correctness model (fp32, seeded)
    cache_prompt: int  # prompt tokens of the cache checks
    cache_new_tokens: int
    speed_model: dict  # LlamaConfig fields of the speed model (random weights)
    speed_model_name: str
    speed_dtype: str
    keeps: tuple[float, ...]
    contexts: tuple[int, ...]
    extra_contexts: tuple[int, ...]  # "if time allows": measured last
    batches: tuple[int, ...]
    decode_steps: int  # timed decode steps per sweep point
    warmup_steps: int  # untimed decode steps before them
    paper: PaperSetting
    memory_limit_bytes: int  # points estimated above this are skipped
    sink: int
    time_limits: TimeLimits
    seed: int = 0


LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=65536,
                 rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def gpu_config() -> RunConfig:
    """One H200 (about 139 GiB), at most 8 minutes in all."""
    return RunConfig(
        dry_run=False, device="cuda", half_dtype="bfloat16", kernel_block=64, kernel_block_fp32=32, select_block=256,
        prefill_cases=(
            PrefillCase(1, 4, 2, 128, 128, 64, (0,)),
            PrefillCase(2, 8, 2, 333, 333, 128, (0, 50)),  # S not a multiple of the block, left padding
            PrefillCase(2, 32, 8, 1000, 17, 128, (0, 100), 4),  # queries are the last 17 positions
            PrefillCase(1, 32, 32, 2048, 2048, 128, (0,)),  # Llama-2-7B's head layout
        ),
        select_cases=(
            SelectCase(2, 8, 1000, 128, (0, 37), 0.2, 4),
            SelectCase(1, 32, 4096, 128, (0,), 0.5, 4),
            SelectCase(3, 2, 77, 64, (0, 77, 5), 0.3, 2),  # a row with no real token
            SelectCase(2, 4, 600, 128, (0, 9), 0.35, 4, True, True),  # exact ties
        ),
        decode_cases=(
            DecodeCase(2, 32, 8, 1000, 1, 128),
            DecodeCase(16, 32, 32, 4096, 1, 128),
            DecodeCase(2, 8, 2, 300, 3, 64),
        ),
        tol_fp32=Tolerance(1e-4, 1e-4), tol_half=Tolerance(2e-2, 2e-2),
        tiny_model=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
        cache_prompt=64, cache_new_tokens=12,
        speed_model=LLAMA2_7B, speed_model_name="Llama-2-7B shape, random weights", speed_dtype="bfloat16",
        keeps=(1.0, 0.5, 0.2), contexts=(1024, 4096, 16384), extra_contexts=(32768,), batches=(1, 16),
        decode_steps=16, warmup_steps=3, paper=PaperSetting(),
        memory_limit_bytes=int(139 * GiB * 0.97), sink=4,
        time_limits=TimeLimits(total_s=470, kernels_s=80, cache_s=40, speed_s=330, reserve_s=15),
    )


def dry_config() -> RunConfig:
    """The same code paths on the CPU with tiny shapes, in well under a minute."""
    return RunConfig(
        dry_run=True, device="cpu", half_dtype="float16", kernel_block=16, kernel_block_fp32=16, select_block=64,
        prefill_cases=(
            PrefillCase(2, 3, 1, 21, 21, 8, (0, 6)),
            PrefillCase(2, 6, 2, 19, 5, 12, (0, 16), 3),
        ),
        select_cases=(
            SelectCase(2, 1, 21, 8, (5, 0), 0.25, 4),
            SelectCase(2, 1, 24, 8, (0, 3), 0.35, 2, True, True),
        ),
        decode_cases=(DecodeCase(2, 6, 2, 13, 1, 16), DecodeCase(1, 8, 1, 20, 3, 16)),
        tol_fp32=Tolerance(1e-5, 1e-5), tol_half=Tolerance(2e-2, 2e-2),
        tiny_model=dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256),
        cache_prompt=24, cache_new_tokens=4,
        speed_model=dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2),
        speed_model_name="tiny random Llama (dry run)", speed_dtype="float32",
        keeps=(1.0, 0.5, 0.2), contexts=(16,), extra_contexts=(24,), batches=(1, 2),
        decode_steps=2, warmup_steps=1, paper=PaperSetting(batch=2, prompt_tokens=32, generated_tokens=4),
        memory_limit_bytes=int(8 * GiB), sink=4,
        # generous for a run that normally takes ~30 s: the suite runs on a shared 2-core machine
        time_limits=TimeLimits(total_s=150, kernels_s=40, cache_s=30, speed_s=70, reserve_s=5),
    )


# ----------------------------------------------------------------------------------------
# budgets and the report
# ----------------------------------------------------------------------------------------
class Clock:
    """The total budget, from the start of the script."""

    def __init__(self, budgets: TimeLimits):
        self.limits = budgets
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def section(self, name: str, budget_s: float) -> Section:
        end_total = self.start + self.limits.total_s - self.limits.reserve_s
        return Section(name, min(time.perf_counter() + budget_s, end_total), budget_s)


@dataclass
class Section:
    name: str
    deadline: float  # time.perf_counter() value
    budget_s: float

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def over(self, need_s: float = 0.0) -> str | None:
        """The skip reason when ``need_s`` more seconds do not fit, else None."""
        left = self.left()
        if left <= need_s:
            what = f"needs about {need_s:.0f} s, " if need_s > 0 else ""
            return (f"time budget: {what}{max(left, 0):.0f} s left of the {self.name} section's "
                    f"{self.budget_s:.0f} s (or of the run's total)")
        return None


class Report:
    """Checks with status, rewritten to DIR/device_check.json after every check."""

    def __init__(self, output: Path, header: dict):
        self.path = output / JSON_NAME
        self.data = {**header, "checks": [], "speed": {}, "summary": {}, "outputs": {"json": str(self.path)}}

    @property
    def checks(self) -> list[dict]:
        return self.data["checks"]

    def add(self, name: str, status: str, reason: str | None = None, seconds: float | None = None, **details) -> dict:
        assert status in (PASSED, FAILED, SKIPPED)
        if status != PASSED and not reason:
            raise ValueError(f"{name}: a {status} check needs its reason")
        check = {"name": name, "section": name.split("/", 1)[0], "status": status, "reason": reason,
                 "seconds": None if seconds is None else round(seconds, 3), "details": _jsonable(details)}
        self.checks.append(check)
        print(summary_line(check), flush=True)
        self.save()
        return check

    def save(self) -> None:
        counts = {s: sum(c["status"] == s for c in self.checks) for s in (PASSED, FAILED, SKIPPED)}
        self.data["summary"] = {**counts, "lines": [summary_line(c) for c in self.checks]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        with os.fdopen(fd, "w") as handle:
            json.dump(self.data, handle, indent=2)
            handle.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.path)


def summary_line(check: dict) -> str:
    line = f"{check['status'].upper():7} {check['name']}"
    note = check["details"].get("summary") if check["details"] else None
    if note:
        line += f": {note}"
    if check["reason"]:
        line += f" ({check['reason']})"
    return line


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def human_bytes(n: int | float | None) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def error_text(err: BaseException) -> str:
    first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def run_check(report: Report, name: str, fn, *args, **kwargs) -> dict:
    """Run ``fn`` -> (status, reason, details); an exception is a failed check with its traceback tail."""
    start = time.perf_counter()
    try:
        status, reason, details = fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - every failure is reported, none stops the run
        status, reason = FAILED, error_text(err)
        details = {"traceback": traceback.format_exc()[-3000:]}
    return report.add(name, status, reason, time.perf_counter() - start, **details)


# ----------------------------------------------------------------------------------------
# environment
# ----------------------------------------------------------------------------------------
def environment(cfg: RunConfig) -> dict:
    import numpy
    import torch
    import transformers

    env = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "transformers": transformers.__version__, "numpy": numpy.__version__,
           "triton": None, "triton_interpreter": os.environ.get("TRITON_INTERPRET") == "1",
           "matplotlib": None, "device": cfg.device, "device_name": platform.processor() or "CPU",
           "device_memory_bytes": None, "cpu_threads": torch.get_num_threads(), "git_commit": git_commit(),
           "prefixkv_file": None}
    try:
        import prefixkv

        env["prefixkv_file"] = prefixkv.__file__  # the repository's copy: the script put its root on sys.path
    except ImportError as err:
        env["prefixkv_error"] = error_text(err)
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError as err:
        env["triton_error"] = error_text(err)
    try:
        import matplotlib

        env["matplotlib"] = matplotlib.__version__
    except ImportError:
        pass
    if cfg.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(device_name=props.name, device_memory_bytes=props.total_memory,
                   device_capability=f"{props.major}.{props.minor}", device_count=torch.cuda.device_count())
    return env


def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return done.stdout.strip() or None if done.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def load_kernels(device: str):
    """(prefixkv.plugins.kernels, None), or (None, the reason they cannot run on ``device``)."""
    try:
        from prefixkv.plugins import kernels
    except ImportError as err:
        return None, f"the Triton kernels cannot be imported ({error_text(err)}); pip install triton"
    if device == "cpu" and not kernels.interpreter_ready():
        return None, "triton was imported before TRITON_INTERPRET=1 was set: the kernels cannot run on the CPU"
    return kernels, None


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------
# 1. the kernels against the PyTorch specification
# ----------------------------------------------------------------------------------------
def compare(got, want, tol: Tolerance) -> dict:
    """Max abs error and whether every element is within the tolerance."""
    diff = (got.double() - want.double()).abs()
    bound = tol.atol + tol.rtol * want.double().abs()
    return {"max_abs_error": float(diff.max()) if diff.numel() else 0.0,
            "max_abs_reference": float(want.double().abs().max()) if want.numel() else 0.0,
            "within": bool((diff <= bound).all())}


def left_padded(batch: int, seq: int, pads, device):
    import torch

    valid = torch.ones(batch, seq, dtype=torch.bool, device=device)
    for row, pad in enumerate(pads):
        valid[row, :pad] = False
    return valid


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def kernel_block(cfg: RunConfig, dtype_name: str) -> int:
    return cfg.kernel_block_fp32 if dtype_name == "float32" else cfg.kernel_block


def _verdict(parts: dict[str, dict], tol: Tolerance | None, extra: dict) -> tuple[str, str | None, dict]:
    failed = [k for k, v in parts.items() if not v["within"]]
    worst = max(v["max_abs_error"] for v in parts.values())
    bound = "exact" if tol is None else f"atol {tol.atol:g} + rtol {tol.rtol:g} x |ref|"
    details = {"summary": f"max abs error {worst:.3g} (tolerance {bound})", "max_abs_error": worst,
               "tolerance": None if tol is None else dataclasses.asdict(tol), "parts": parts, **extra}
    if failed:
        return FAILED, f"outside the tolerance: {', '.join(failed)}", details
    return PASSED, None, details


def check_prefill(K, R, cfg: RunConfig, case: PrefillCase, dtype_name: str):
    import torch

    dev, dtype = cfg.device, _dtype(dtype_name)
    tol = cfg.tol_fp32 if dtype_name == "float32" else cfg.tol_half
    gen = torch.Generator().manual_seed(cfg.seed + case.seq + case.heads)
    q = torch.randn(case.batch, case.heads, case.q_len, case.head_dim, generator=gen)
    k = torch.randn(case.batch, case.kv_heads, case.seq, case.head_dim, generator=gen)
    v = torch.randn(case.batch, case.kv_heads, case.seq, case.head_dim, generator=gen)
    q, k, v = (t.to(dev, dtype) for t in (q, k, v))
    valid = left_padded(case.batch, case.seq, case.pads, dev)
    scale = case.head_dim ** -0.5
    block = kernel_block(cfg, dtype_name)
    out, importance = K.prefill_attention_with_scores(q, k, v, valid, scale, block_m=block, block_n=block,
                                                      heads_per_program=case.heads_per_program)
    want_out, want_imp = R.prefill_attention_with_scores(q.float(), k.float(), v.float(), valid, scale)
    sync(dev)
    if out.shape != want_out.shape or importance.shape != want_imp.shape:
        return FAILED, f"shapes {tuple(out.shape)}, {tuple(importance.shape)} vs {tuple(want_out.shape)}, {tuple(want_imp.shape)}", {}
    padding_mass = float(importance[~valid].abs().max()) if bool((~valid).any()) else 0.0
    parts = {"out": compare(out.float(), want_out, tol), "importance": compare(importance, want_imp, tol),
             "padding_importance": {"max_abs_error": padding_mass, "within": padding_mass == 0.0}}
    return _verdict(parts, tol, {"case": dataclasses.asdict(case), "dtype": dtype_name, "block": block})


def check_select(K, R, cfg: RunConfig, case: SelectCase):
    import torch

    dev, dtype = cfg.device, _dtype(cfg.half_dtype)
    gen = torch.Generator().manual_seed(cfg.seed + case.seq)
    k = torch.randn(case.batch, case.kv_heads, case.seq, case.head_dim, generator=gen).to(dev, dtype)
    v = torch.randn(case.batch, case.kv_heads, case.seq, case.head_dim, generator=gen).to(dev, dtype)
    if case.ties:
        scores = torch.randint(0, 3, (case.batch, case.seq), generator=gen).float()
        scores[-1, ::3] = -0.0  # -0.0 ties with +0.0, as in torch.sort
    else:
        scores = torch.rand(case.batch, case.seq, generator=gen)
    scores = scores.to(dev)
    valid = left_padded(case.batch, case.seq, case.pads, dev)
    got = K.select_and_gather(k, v, scores, valid, case.fraction, case.sink, case.protect_last, block_s=cfg.select_block)
    want = R.select_and_gather(k, v, scores, valid, case.fraction, case.sink, case.protect_last)
    sync(dev)
    if got[2].shape != want[2].shape:
        return FAILED, f"slots {tuple(got[2].shape)} vs {tuple(want[2].shape)}", {}
    mask = want[3][:, None, :, None]
    positions_off = int((got[2] != want[2]).sum())
    kept_off = int((got[3] != want[3]).sum())
    parts = {
        "positions": {"max_abs_error": float((got[2] - want[2]).abs().max()) if got[2].numel() else 0.0,
                      "mismatches": positions_off, "within": positions_off == 0},
        "kept": {"max_abs_error": float(kept_off), "mismatches": kept_off, "within": kept_off == 0},
        "keys": {"max_abs_error": float(((got[0] - want[0]) * mask).abs().max()) if got[0].numel() else 0.0},
        "values": {"max_abs_error": float(((got[1] - want[1]) * mask).abs().max()) if got[1].numel() else 0.0},
    }
    for name in ("keys", "values"):
        parts[name]["within"] = parts[name]["max_abs_error"] == 0.0
    return _verdict(parts, None, {"case": dataclasses.asdict(case), "dtype": cfg.half_dtype, "block_s": cfg.select_block,
                                  "slots": int(got[2].shape[1])})


def check_decode(K, R, cfg: RunConfig, case: DecodeCase, dtype_name: str):
    import torch

    dev, dtype = cfg.device, _dtype(dtype_name)
    tol = cfg.tol_fp32 if dtype_name == "float32" else cfg.tol_half
    gen = torch.Generator().manual_seed(cfg.seed + case.width)
    q = torch.randn(case.batch, case.heads, case.q_len, case.head_dim, generator=gen).to(dev, dtype)
    k = torch.randn(case.batch, case.kv_heads, case.width, case.head_dim, generator=gen).to(dev, dtype)
    v = torch.randn(case.batch, case.kv_heads, case.width, case.head_dim, generator=gen).to(dev, dtype)
    valid = torch.rand(case.batch, case.width, generator=gen) > 0.3  # empty slots anywhere in the old part
    valid[:, :2] = False  # and at the front
    valid[:, -case.q_len:] = True  # the new tokens
    valid = valid.to(dev)
    scale = case.head_dim ** -0.5
    block = kernel_block(cfg, dtype_name)
    out = K.decode_attention(q, k, v, valid, scale, block_m=16, block_n=block)
    want = R.decode_attention(q.float(), k.float(), v.float(), valid, scale)
    sync(dev)
    parts = {"out": compare(out.float(), want, tol)}
    return _verdict(parts, tol, {"case": dataclasses.asdict(case), "dtype": dtype_name, "block_n": block})


def check_chain(K, R, cfg: RunConfig):
    """prefill -> select -> decode on one layer, against the reference pipeline (fp32)."""
    import torch

    dev, tol = cfg.device, cfg.tol_fp32
    gen = torch.Generator().manual_seed(cfg.seed + 9)
    b, h, hkv, s, d = 2, 6, 2, (18 if cfg.dry_run else 700), 16
    q, k, v = (torch.randn(b, n, s, d, generator=gen).to(dev) for n in (h, hkv, hkv))
    valid = left_padded(b, s, (0, 5), dev)
    block = kernel_block(cfg, "float32")
    _, imp = K.prefill_attention_with_scores(q, k, v, valid, 0.3, block_m=block, block_n=block)
    _, want_imp = R.prefill_attention_with_scores(q, k, v, valid, 0.3)
    kk, vv, pos, kept = K.select_and_gather(k, v, imp, valid, 0.4, 2, True, block_s=cfg.select_block)
    wk, wv, wpos, wkept = R.select_and_gather(k, v, want_imp, valid, 0.4, 2, True)
    same = pos.shape == wpos.shape and bool(torch.equal(pos, wpos))
    parts = {"positions": {"max_abs_error": 0.0 if same else float("inf"), "within": same}}
    if same:
        q_new = torch.randn(b, h, 1, d, generator=gen).to(dev)
        k_new, v_new = (torch.randn(b, hkv, 1, d, generator=gen).to(dev) for _ in range(2))
        cache_valid = torch.cat([kept, torch.ones(b, 1, dtype=torch.bool, device=dev)], 1)
        out = K.decode_attention(q_new, torch.cat([kk, k_new], 2), torch.cat([vv, v_new], 2), cache_valid, 0.3,
                                 block_m=16, block_n=block)
        want = R.decode_attention(q_new, torch.cat([wk, k_new], 2), torch.cat([wv, v_new], 2), cache_valid, 0.3)
        parts["decode_out"] = compare(out, want, tol)
    sync(dev)
    return _verdict(parts, tol, {"shape": dict(batch=b, heads=h, kv_heads=hkv, seq=s, head_dim=d)})


def kernel_checks(report: Report, cfg: RunConfig, clock: Clock) -> None:
    from prefixkv.plugins import reference as R

    K, why_not = load_kernels(cfg.device)
    jobs = []
    for i, case in enumerate(cfg.prefill_cases):
        for dtype in ("float32", cfg.half_dtype):
            jobs.append((f"kernels/prefill_scores[{i}:{dtype}]", check_prefill, (case, dtype)))
    for i, case in enumerate(cfg.select_cases):
        jobs.append((f"kernels/select_gather[{i}:{cfg.half_dtype}]", check_select, (case,)))
    for i, case in enumerate(cfg.decode_cases):
        for dtype in ("float32", cfg.half_dtype):
            jobs.append((f"kernels/decode_attention[{i}:{dtype}]", check_decode, (case, dtype)))
    jobs.append(("kernels/prefill_select_decode_chain[float32]", check_chain, ()))
    section = clock.section("kernels", cfg.time_limits.kernels_s)
    for name, fn, args in jobs:
        if not skipped(report, name, section, why_not if K is None else None):
            run_check(report, name, fn, K, R, cfg, *args)


def skipped(report: Report, name: str, section: Section, why_not: str | None = None) -> bool:
    """Record ``name`` as skipped (``why_not``, or the section's time is up) and say so; else False."""
    reason = why_not or section.over()
    if reason:
        report.add(name, SKIPPED, reason)
    return bool(reason)


# ----------------------------------------------------------------------------------------
# the kernel path of PrefixKVCache
# ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def kernel_cache_class():
    """``KernelCache``: PrefixKVCache with the three Triton kernels in place of its PyTorch ops.

    prefill  ``kernels.prefill_attention_with_scores`` (attention + the accumulated score; at
             keep 1.0 the score is computed and unused)
    compact  ``kernels.select_and_gather`` per layer (uniform allocation: one keep fraction)
    decode   ``kernels.decode_attention``; the decode-phase eviction stays PyTorch (``compaction.evict``)
    So it applies to the accumulated score with a uniform allocation (methods ``h2o`` and ``full``).
    """
    from prefixkv.attention import key_validity
    from prefixkv.cache import PrefixKVCache

    K, why_not = load_kernels("any")
    if K is None:
        raise ImportError(why_not)

    class KernelCache(PrefixKVCache):
        def __init__(self, *args, block: int = 64, select_block: int = 256, **kwargs):
            super().__init__(*args, **kwargs)
            method = self.method
            if method.compresses and (method.scorer.name != "accumulated" or method.allocation.name != "uniform"):
                raise ValueError(f"the kernel path covers the accumulated score with a uniform allocation, "
                                 f"not {method.scorer.name} / {method.allocation.name}")
            if self.record:
                raise ValueError("the kernel path records no extra scorers")
            self.block, self.select_block = block, select_block

        def attend(self, layer_idx, query, key, value, attention_mask, scaling):
            layer = self.layers[layer_idx]
            if self._prefilled:
                out = K.decode_attention(query, key, value, layer.valid, scaling, block_m=16, block_n=self.block)
                self._keep_budget(layer_idx)
                return out
            valid = key_validity(attention_mask, key.shape[0], key.shape[2], key.device)
            layer.valid, self.prompt_valid = valid, valid
            layer.positions = valid.long().cumsum(-1) - 1
            layer.positions.masked_fill_(~valid, -1)
            out, importance = K.prefill_attention_with_scores(query, key, value, valid, scaling,
                                                              block_m=self.block, block_n=self.block)
            layer.scores = importance if self.method.compresses else None
            self._pending = True
            return out

        def compact_layer(self, layer, fraction) -> None:
            """The select/gather kernel instead of ``compaction.compact`` (the rest of ``compress`` is the cache's)."""
            layer.keys, layer.values, layer.positions, layer.valid = K.select_and_gather(
                layer.keys, layer.values, layer.scores, layer.valid, float(fraction), self.sink,
                self.protect_last, block_s=self.select_block)

    return KernelCache


PATHS = {
    "reference": "PrefixKVCache (PyTorch): method full at keep 1.0, h2o below (the paper's accumulated score, "
                 "uniform allocation)",
    "profile": "PrefixKVCache (PyTorch), method prefixkv: a profile allocation with made-up per-layer fractions "
               "(1.5x the mean in the first layer to 0.5x in the last; random weights have nothing to calibrate)",
    "kernels": "KernelCache: PrefixKVCache with the Triton prefill, select/gather and decode kernels (decode-phase "
               "eviction in PyTorch; uniform allocation); at keep 1.0 the prefill kernel also computes the unused scores",
}


def make_cache(path: str, keep: float, cfg: RunConfig, profile=None):
    """A fresh cache for one of ``PATHS`` (keep 1.0: method ``full``; "profile" needs ``profile``)."""
    from prefixkv.cache import PrefixKVCache

    method = "full" if keep >= 1 else "h2o"
    if path == "reference":
        return PrefixKVCache(keep_fraction=keep, method=method, sink=cfg.sink)
    if path == "profile":
        if keep >= 1:
            return PrefixKVCache(keep_fraction=keep, method="full", sink=cfg.sink)
        return PrefixKVCache(profile, keep_fraction=keep, method="prefixkv", sink=cfg.sink)
    return kernel_cache_class()(keep_fraction=keep, method=method, sink=cfg.sink,
                                block=cfg.kernel_block, select_block=cfg.select_block)


# ----------------------------------------------------------------------------------------
# 1b. PrefixKVCache on the device against the CPU, and the kernel path against the reference
# ----------------------------------------------------------------------------------------
def tiny_llama(cfg: RunConfig):
    """The seeded random fp32 Llama of the correctness checks, on the CPU, prefixkv attention."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import prefixkv

    torch.manual_seed(cfg.seed)
    config = LlamaConfig(**cfg.tiny_model, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    prefixkv.enable(model)
    return model


def synthetic_profile(model, keep: float, sink: int):
    """A RetentionProfile with made-up, unequal per-layer fractions averaging ``keep`` (the
    profile allocation's code path; no calibration)."""
    from prefixkv.profile import LayerKeep, Fingerprint, RetentionProfile

    layers = model.config.num_hidden_layers
    spread = [1.5 - i / max(layers - 1, 1) for i in range(layers)]  # 1.5x ... 0.5x the mean
    fractions = [min(1.0, keep * s) for s in spread]
    return RetentionProfile(Fingerprint.of(model.config), sink, {keep: LayerKeep(fractions, [0.0] * layers)})


def generation_inputs(cfg: RunConfig, batch: int, padded: bool):
    import torch

    gen = torch.Generator().manual_seed(cfg.seed + 11)
    n = cfg.cache_prompt
    ids = torch.randint(3, cfg.tiny_model["vocab_size"], (batch, n), generator=gen)
    mask = torch.ones(batch, n, dtype=torch.long)
    if padded:
        for row in range(1, batch):
            pad = n // (2 * row + 1)
            ids[row, :pad], mask[row, :pad] = 0, 0
    return ids, mask


def greedy(model, cache, ids, mask, new_tokens: int):
    import torch

    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             past_key_values=cache, pad_token_id=0)
    return out[:, ids.shape[1]:].cpu(), [p.cpu() for p in cache.kept_positions()]


def compare_generations(a, b, label_a: str, label_b: str) -> tuple[str, str | None, dict]:
    (tokens_a, kept_a), (tokens_b, kept_b) = a, b
    same_tokens = bool(tokens_a.shape == tokens_b.shape and (tokens_a == tokens_b).all())
    layers_off = [i for i, (x, y) in enumerate(zip(kept_a, kept_b)) if x.shape != y.shape or not bool((x == y).all())]
    if len(kept_a) != len(kept_b):
        layers_off.append(f"layer count {len(kept_a)} vs {len(kept_b)}")
    details = {"tokens": tokens_a.tolist(), "layers": len(kept_a),
               "kept_per_layer_row0": [int((p[0] >= 0).sum()) for p in kept_a],
               "summary": f"tokens {'identical' if same_tokens else 'DIFFER'}, kept positions "
                          f"{'identical in all ' + str(len(kept_a)) + ' layers' if not layers_off else 'DIFFER'}"}
    if not same_tokens:
        first = next((i for i in range(min(tokens_a.shape[1], tokens_b.shape[1]))
                      if not bool((tokens_a[:, i] == tokens_b[:, i]).all())), None)
        details[f"tokens_{label_b}"] = tokens_b.tolist()
        details["first_different_step"] = first
    if layers_off:
        details["layers_with_different_positions"] = layers_off
    if same_tokens and not layers_off:
        return PASSED, None, details
    return FAILED, f"{label_a} and {label_b} differ", details


def check_cache_on_device(cfg: RunConfig, model_cpu, method: str, keep: float, batch: int, padded: bool):
    profile = synthetic_profile(model_cpu, keep, 2) if method == "prefixkv" else None
    ids, mask = generation_inputs(cfg, batch, padded)

    def run(model, device):
        from prefixkv.cache import PrefixKVCache

        cache = PrefixKVCache(profile, keep_fraction=keep, method=method, sink=2)
        return greedy(model, cache, ids.to(device), mask.to(device), cfg.cache_new_tokens)

    on_cpu = run(model_cpu, "cpu")
    model_dev = model_cpu if cfg.device == "cpu" else copy.deepcopy(model_cpu).to(cfg.device)
    on_device = run(model_dev, cfg.device)
    status, reason, details = compare_generations(on_device, on_cpu, cfg.device, "cpu")
    details.update(method=method, keep=keep, batch=batch, left_padded=padded, prompt=cfg.cache_prompt,
                   new_tokens=cfg.cache_new_tokens, dtype="float32")
    if cfg.device == "cpu":
        details["note"] = "dry run: the device is the CPU, so this compares the CPU with itself; it shows only that the code runs"
    return status, reason, details


def check_kernel_path(cfg: RunConfig, model_cpu, keep: float, batch: int, padded: bool):
    ids, mask = generation_inputs(cfg, batch, padded)
    model = model_cpu if cfg.device == "cpu" else copy.deepcopy(model_cpu).to(cfg.device)
    ids, mask = ids.to(cfg.device), mask.to(cfg.device)
    reference = greedy(model, make_cache("reference", keep, cfg), ids, mask, cfg.cache_new_tokens)
    kernels = greedy(model, make_cache("kernels", keep, cfg), ids, mask, cfg.cache_new_tokens)
    status, reason, details = compare_generations(kernels, reference, "kernels", "reference")
    details.update(keep=keep, method="full" if keep >= 1 else "h2o", batch=batch, left_padded=padded, dtype="float32",
                   device=cfg.device)
    return status, reason, details


def cache_checks(report: Report, cfg: RunConfig, clock: Clock) -> None:
    section = clock.section("cache", cfg.time_limits.cache_s)
    model_cpu = None
    jobs = [(f"cache/generation_{cfg.device}_vs_cpu[{m}:keep={k:g}:batch={b}{':padded' if p else ''}]",
             check_cache_on_device, (m, k, b, p))
            for m, k, b, p in (("h2o", 0.3, 1, False), ("prefixkv", 0.25, 2, True), ("full", 1.0, 2, True))]
    K, why_not = load_kernels(cfg.device)
    kernel_jobs = [(f"cache/kernel_path_vs_reference[keep={k:g}:batch={b}{':padded' if p else ''}]", check_kernel_path, (k, b, p))
                   for k, b, p in ((0.3, 2, True), (1.0, 1, False))]
    for name, fn, args in jobs + kernel_jobs:
        if skipped(report, name, section, why_not if fn is check_kernel_path and K is None else None):
            continue
        if model_cpu is None:
            model_cpu = tiny_llama(cfg)
        run_check(report, name, fn, cfg, model_cpu, *args)


# ----------------------------------------------------------------------------------------
# 2. speed on the 7B shape
# ----------------------------------------------------------------------------------------
@dataclass
class SpeedModel:
    model: object
    config: object
    dtype_bytes: int
    weights_bytes: int | None  # measured (torch.cuda.memory_allocated after the build)
    weights_peak_bytes: int | None
    parameter_bytes: int  # parameters x bytes

    def kv_bytes(self, batch: int, tokens: int) -> int:
        """Bytes of a full cache: K and V, every layer."""
        c = self.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return 2 * c.num_hidden_layers * batch * c.num_key_value_heads * tokens * head_dim * self.dtype_bytes


def build_speed_model(cfg: RunConfig) -> SpeedModel:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    import prefixkv

    dtype = _dtype(cfg.speed_dtype)
    config = LlamaConfig(**cfg.speed_model)
    torch.manual_seed(cfg.seed)
    if cfg.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cfg.device == "cuda" else 0
    with torch.device(cfg.device):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except TypeError:  # older transformers name it torch_dtype
            model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    model = model.to(cfg.device, dtype).eval()
    prefixkv.enable(model)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    weights = peak = None
    if cfg.device == "cuda":
        sync(cfg.device)
        weights = torch.cuda.memory_allocated() - before
        peak = torch.cuda.max_memory_allocated() - before
    return SpeedModel(model, config, torch.tensor([], dtype=dtype).element_size(), weights, peak, params)


@dataclass(frozen=True)
class Point:
    path: str  # one of PATHS
    keep: float
    batch: int
    context: int
    steps: int  # timed decode steps
    warmup: int

    @property
    def label(self) -> str:
        return f"{self.path}:keep={self.keep:g}:batch={self.batch}:context={self.context}"


def estimate_bytes(sm: SpeedModel, point: Point, block: int) -> dict:
    """A rough upper estimate of the point's peak GPU memory, to skip what cannot fit."""
    c = sm.config
    b, s = point.batch, point.context
    heads, kv_heads = c.num_attention_heads, c.num_key_value_heads
    kv = sm.kv_bytes(b, s + point.warmup + point.steps)
    if point.path != "kernels" and point.keep >= 1:
        # PrefixKVCache's full-cache prefill: SDPA with a boolean mask on 5D tensors, PyTorch's
        # math path: the (S x S) weights of every head, in float32, twice (scores, softmax)
        attention = 2 * b * heads * s * s * 4
        how = "S x S attention weights of SDPA's math path (fp32, x2)"
    elif point.path != "kernels":
        attention = 3 * b * heads * min(s, 256) * s * 4  # 256 query rows at a time, fp32
        how = "256-row blocks of fp32 attention probabilities (x3)"
    else:
        attention = b * (-(-s // block)) * kv_heads * s * 4  # the prefill kernel's partial buffer
        how = "the prefill kernel's partial importance buffer"
    activations = 4 * b * s * c.intermediate_size * sm.dtype_bytes + 2 * b * s * c.hidden_size * 4
    weights = sm.weights_bytes or sm.parameter_bytes
    total = weights + kv + attention + activations
    return {"total": total, "weights": weights, "kv_full": kv, "attention": attention, "attention_how": how,
            "activations": activations}


class CostModel:
    """Predicts a point's seconds from the points measured so far (prefill ~ S^2, a step ~ S)."""

    def __init__(self):
        self.seen: dict[tuple, tuple[int, float, float]] = {}

    def add(self, point: Point, prefill_s: float, step_s: float) -> None:
        self.seen[(point.path, point.keep, point.batch)] = (point.context, prefill_s, step_s)

    def predict(self, point: Point) -> float | None:
        for key, scale in (((point.path, point.keep, point.batch), 1.0),
                           *(((point.path, point.keep, b), point.batch / b) for b in (1, 2, 16) if b != point.batch)):
            if key in self.seen:
                context, prefill_s, step_s = self.seen[key]
                ratio = max(point.context / context, 1.0)
                return scale * (prefill_s * ratio**2 + (point.steps + point.warmup) * step_s * ratio)
        return None


def random_prompt(batch: int, context: int, vocab: int, device: str, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, context), generator=gen).to(device)


def time_generation(sm: SpeedModel, cache, point: Point, cfg: RunConfig, section: Section) -> dict:
    """Prefill (with compaction) once, then ``warmup`` + ``steps`` greedy decode steps, each timed
    with torch.cuda.synchronize + time.perf_counter.  Stops early when the section runs out."""
    import torch

    from prefixkv.cache import cache_argument

    model, dev = sm.model, cfg.device
    ids = random_prompt(point.batch, point.context, sm.config.vocab_size, dev, cfg.seed + point.context)
    arg = cache_argument(model, cache)
    if dev == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    sync(dev)
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **arg)
    cache.compress()
    token = out.logits[:, -1:].argmax(-1)
    sync(dev)
    prefill_s = time.perf_counter() - start
    prefill_peak = torch.cuda.max_memory_allocated() - base if dev == "cuda" else None
    kv_after_prefill = cache.kv_bytes()
    del out
    times, stopped = [], None
    for step in range(point.warmup + point.steps):
        if section.left() <= 0:
            stopped = f"time budget: stopped after {step} of {point.warmup + point.steps} decode steps"
            break
        t0 = time.perf_counter()
        out = model(input_ids=token, use_cache=True, logits_to_keep=1, **arg)
        token = out.logits[:, -1:].argmax(-1)
        sync(dev)
        times.append(time.perf_counter() - t0)
    timed = times[point.warmup:]
    lengths = cache.layer_lengths()[:, 0]
    result = {
        "prefill_s": prefill_s, "decode_steps_timed": len(timed), "decode_warmup_steps": min(len(times), point.warmup),
        "decode_s_total": sum(timed), "decode_ms_median": 1e3 * statistics.median(timed) if timed else None,
        "decode_ms_mean": 1e3 * statistics.fmean(timed) if timed else None,
        "decode_tokens_per_s": point.batch * len(timed) / sum(timed) if timed else None,
        "generation_s": prefill_s + sum(times), "all_step_s": times,
        "kv_bytes_full_prompt": sm.kv_bytes(point.batch, point.context),
        "kv_bytes_after_prefill": kv_after_prefill, "kv_bytes_end": cache.kv_bytes(),
        "entries_per_layer_row0": {"min": int(lengths.min()), "max": int(lengths.max()), "sum": int(lengths.sum())},
        "stopped": stopped,
    }
    if dev == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
        result.update(peak_bytes_total=torch.cuda.max_memory_allocated(), peak_bytes_above_weights=peak,
                      prefill_peak_bytes_above_weights=prefill_peak, memory_before_point_bytes=base)
    else:
        result["memory"] = "peak GPU memory is not measured on the CPU"
    return result


def cleanup(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def measure(report: Report, name: str, sm: SpeedModel, point: Point, cfg: RunConfig, section: Section,
            costs: CostModel, kernel_why_not: str | None, profile=None) -> dict:
    """One timed point as a check: passed = measured; skipped with the reason; failed = an error."""
    import torch

    base = {"point": dataclasses.asdict(point)}
    if point.path == "kernels" and kernel_why_not:
        return report.add(name, SKIPPED, kernel_why_not, **base)
    estimate = estimate_bytes(sm, point, cfg.kernel_block)
    base["memory_estimate_bytes"] = estimate
    if estimate["total"] > cfg.memory_limit_bytes:
        return report.add(name, SKIPPED, f"would not fit: about {estimate['total'] / GiB:.0f} GiB estimated "
                          f"(weights {estimate['weights'] / GiB:.1f}, full KV {estimate['kv_full'] / GiB:.1f}, "
                          f"{estimate['attention_how']} {estimate['attention'] / GiB:.1f}) > "
                          f"{cfg.memory_limit_bytes / GiB:.0f} GiB", **base)
    predicted = costs.predict(point)
    base["predicted_s"] = predicted
    late = section.over(predicted or 0.0)
    if late:
        return report.add(name, SKIPPED, late, **base)
    start = time.perf_counter()
    try:
        cache = make_cache(point.path, point.keep, cfg, profile)
        with torch.inference_mode():
            result = time_generation(sm, cache, point, cfg, section)
        del cache
    except Exception as err:  # noqa: BLE001 - out of memory is a skip, anything else a failure
        message, tail = error_text(err), traceback.format_exc()[-3000:]
        out_of_memory = isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()
        del err
        cleanup(cfg.device)
        if out_of_memory:
            return report.add(name, SKIPPED, f"did not fit at run time ({message[:200]})", time.perf_counter() - start, **base)
        return report.add(name, FAILED, message, time.perf_counter() - start, traceback=tail, **base)
    cleanup(cfg.device)
    seconds = time.perf_counter() - start
    if result["decode_steps_timed"] == 0:
        return report.add(name, SKIPPED, result["stopped"] or "no decode step was timed", seconds, **base, **result)
    if not result["stopped"]:
        costs.add(point, result["prefill_s"], statistics.fmean(result["all_step_s"]))
    result["summary"] = (f"prefill {result['prefill_s']:.3f} s, decode {result['decode_tokens_per_s']:.1f} tokens/s "
                         f"({result['decode_ms_median']:.2f} ms/step), KV {human_bytes(result['kv_bytes_after_prefill'])}"
                         + (f", peak above weights {human_bytes(result['peak_bytes_above_weights'])}"
                            if "peak_bytes_above_weights" in result else ""))
    status, reason = PASSED, None
    if result["stopped"]:
        status, reason = SKIPPED, f"incomplete: {result['stopped']}"
    return report.add(name, status, reason, seconds, **base, **result)


def speed_row(check: dict) -> dict:
    """One line of the speed table: the point, its status and its main numbers."""
    d = check["details"]
    keys = ("prefill_s", "decode_tokens_per_s", "decode_ms_median", "generation_s", "kv_bytes_after_prefill",
            "kv_bytes_end", "peak_bytes_above_weights")
    return {"name": check["name"], **d.get("point", {}), "status": check["status"], "reason": check["reason"],
            **{k: d.get(k) for k in keys}}


def speed_checks(report: Report, cfg: RunConfig, clock: Clock) -> None:
    budget = min(cfg.time_limits.speed_s, cfg.time_limits.total_s - cfg.time_limits.reserve_s - clock.elapsed())
    section = clock.section("speed", budget)
    _, kernel_why_not = load_kernels(cfg.device)
    paths = ("reference", "kernels")  # the sweep's; the paper's setting also runs "profile"
    speed = report.data["speed"]
    speed.update(model=cfg.speed_model_name, model_config=cfg.speed_model, dtype=cfg.speed_dtype, paths=PATHS,
                 paper=dataclasses.asdict(cfg.paper) | {"speedup": cfg.paper.speedup})
    if cfg.dry_run:
        speed["note"] = "dry run: a tiny model on the CPU; the timings say nothing about a GPU"

    late = section.over()
    if late:
        report.add("speed/model_build", SKIPPED, late)
        return
    holder: dict = {}

    def build():
        start = time.perf_counter()
        sm = build_speed_model(cfg)
        holder["sm"] = sm
        info = {"build_s": time.perf_counter() - start, "parameter_bytes": sm.parameter_bytes,
                "weights_bytes": sm.weights_bytes, "weights_peak_bytes": sm.weights_peak_bytes,
                "parameters": sum(p.numel() for p in sm.model.parameters())}
        speed["weights"] = info
        shown = sm.weights_bytes if sm.weights_bytes is not None else sm.parameter_bytes
        info["summary"] = f"{info['parameters'] / 1e6:.1f} M parameters, {human_bytes(shown)} of weights"
        return PASSED, None, info

    run_check(report, "speed/model_build", build)
    sm = holder.get("sm")
    if sm is None:
        for path in paths:
            report.add(f"speed/paper_setting[{path}]", SKIPPED, "the speed model could not be built (see speed/model_build)")
        return
    costs = CostModel()

    # warm-up: cuBLAS, and the Triton compiles of every keep fraction (untimed)
    def warm(path: str):
        """Untimed: cuBLAS start-up and the Triton compiles of every keep fraction."""
        import torch

        from prefixkv.cache import cache_argument

        start = time.perf_counter()
        for keep in cfg.keeps:
            with torch.inference_mode():
                cache = make_cache(path, keep, cfg)
                ids = random_prompt(cfg.paper.batch, 16 if cfg.dry_run else 64, sm.config.vocab_size, cfg.device, cfg.seed)
                arg = cache_argument(sm.model, cache)
                out = sm.model(input_ids=ids, use_cache=True, logits_to_keep=1, **arg)
                for _ in range(2 if cfg.dry_run else 20):  # decode widths of both alignments (Triton specializes on % 16)
                    out = sm.model(input_ids=out.logits[:, -1:].argmax(-1), use_cache=True, logits_to_keep=1, **arg)
                sync(cfg.device)
                del cache, out
        cleanup(cfg.device)
        seconds = time.perf_counter() - start
        return PASSED, None, {"summary": f"keep {', '.join(f'{k:g}' for k in cfg.keeps)} at batch {cfg.paper.batch}, "
                                         f"untimed, {seconds:.1f} s", "keeps": cfg.keeps}

    for path in paths:
        name = f"speed/warmup[{path}]"
        if path == "kernels" and kernel_why_not:
            report.add(name, SKIPPED, kernel_why_not)
            continue
        late = section.over()
        if late:
            report.add(name, SKIPPED, late)
        elif run_check(report, name, warm, path)["status"] == FAILED and path == "kernels":
            kernel_why_not = f"the kernel path failed its warm-up (see {name})"

    # the paper's setting: batch 16, 1024 prompt tokens, 512 generated, keep 1.0 vs 0.2
    paper = cfg.paper
    profile = synthetic_profile(sm.model, paper.keep, cfg.sink)
    totals: dict[str, dict[float, float]] = {}
    runs = [("reference", 1.0), ("reference", paper.keep), ("kernels", 1.0), ("kernels", paper.keep), ("profile", paper.keep)]
    for path, keep in runs:
        point = Point(path, keep, paper.batch, paper.prompt_tokens, paper.generated_tokens - 1, 0)
        check = measure(report, f"speed/paper_setting[{point.label}:generated={paper.generated_tokens}]", sm, point,
                        cfg, section, costs, kernel_why_not, profile)
        if check["status"] == PASSED:
            totals.setdefault(path, {})[keep] = check["details"]["generation_s"]
    if 1.0 in totals.get("reference", {}):  # keep 1.0 keeps everything: no profile involved
        totals.setdefault("profile", {})[1.0] = totals["reference"][1.0]
    speed["paper_setting"] = {}
    for path in ("reference", "kernels", "profile"):
        name = f"speed/paper_speedup[{path}]"
        got = totals.get(path, {})
        if 1.0 not in got or paper.keep not in got:
            missing = [f"keep {k:g}" for k in (1.0, paper.keep) if k not in got]
            report.add(name, SKIPPED, f"not measured: {', '.join(missing)} (see the paper_setting checks)")
            continue
        speedup = got[1.0] / got[paper.keep]
        entry = {"full_s": got[1.0], "prefixkv_s": got[paper.keep], "speedup": speedup,
                 "paper_full_s": paper.full_s, "paper_prefixkv_s": paper.prefixkv_s, "paper_speedup": paper.speedup,
                 "ratio_to_paper": speedup / paper.speedup,
                 "summary": f"keep 1.0 {got[1.0]:.3g} s vs keep {paper.keep:g} {got[paper.keep]:.3g} s: {speedup:.2f}x "
                            f"(paper: {paper.full_s} s vs {paper.prefixkv_s} s = {paper.speedup:.2f}x, {paper.model})"}
        speed["paper_setting"][path] = entry
        report.add(name, PASSED, None, **entry)

    # the sweep: contexts x batches x keeps x paths; the extra contexts only if time allows
    points = [Point(path, keep, batch, context, cfg.decode_steps, cfg.warmup_steps)
              for context in (*cfg.contexts, *cfg.extra_contexts) for batch in cfg.batches
              for keep in cfg.keeps for path in paths]
    for point in points:
        measure(report, f"speed/sweep[{point.label}]", sm, point, cfg, section, costs, kernel_why_not)
    speed["table"] = [speed_row(c) for c in report.checks if c["name"].startswith(("speed/paper_setting[", "speed/sweep["))]
    del sm, holder
    cleanup(cfg.device)


# ----------------------------------------------------------------------------------------
# 3. the plot
# ----------------------------------------------------------------------------------------
def plot(report: Report, cfg: RunConfig, png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = report.data
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    ax_err, ax_paper, ax_decode, ax_mem = axes.ravel()

    # kernels: max error / tolerance (select: exact, shown as error + 1e-12)
    names, ratios, colors = [], [], []
    for c in data["checks"]:
        if c["section"] != "kernels":
            continue
        names.append(c["name"].split("/", 1)[1])
        if c["status"] == SKIPPED:
            ratios.append(float("nan"))
            colors.append("lightgray")
            continue
        d = c["details"]
        tol = d.get("tolerance")
        err = d.get("max_abs_error")
        ratio = (err / tol["atol"]) if (tol and isinstance(err, (int, float))) else (1e-3 if err == 0 else 1e3)
        ratios.append(max(ratio, 1e-6))
        colors.append("tab:green" if c["status"] == PASSED else "tab:red")
    if names:
        y = range(len(names))
        ax_err.barh(list(y), [r if r == r else 0 for r in ratios], color=colors)
        ax_err.set_yticks(list(y), names, fontsize=7)
        ax_err.set_xscale("log")
        ax_err.axvline(1.0, color="k", lw=0.8, ls="--")
        ax_err.invert_yaxis()
    ax_err.set(title="kernels vs PyTorch spec: max abs error / atol (select: exact -> 1e-3)", xlabel="ratio (< 1 passes)")

    # the paper's setting, as generation time relative to keep 1.0 (the paper: 16.8 / 30.7)
    speed = data.get("speed", {})
    paper = cfg.paper
    groups = [("paper", paper.model, {1.0: paper.full_s, paper.keep: paper.prefixkv_s})]
    for kind in ("reference", "kernels", "profile"):
        got = {}
        for c in data["checks"]:
            if c["name"].startswith(f"speed/paper_setting[{kind}:") and c["status"] == PASSED:
                got[c["details"]["point"]["keep"]] = c["details"]["generation_s"]
        if kind == "profile" and 1.0 in groups[1][2]:
            got[1.0] = groups[1][2][1.0]  # the reference's keep 1.0
        groups.append((kind, "measured", got))
    top = max([1.0] + [g[k] / g[1.0] for _, _, g in groups if g.get(1.0) for k in g]) * 1.3
    for i, (kind, _, got) in enumerate(groups):
        full = got.get(1.0)
        for j, keep in enumerate((1.0, paper.keep)):
            x = i * 3 + j
            if keep in got and full:
                ax_paper.bar(x, got[keep] / full, color=KEEP_COLORS.get(keep, "gray"), alpha=0.6 if kind == "paper" else 1.0)
                ax_paper.text(x, got[keep] / full, f"{got[keep]:.3g} s", ha="center", va="bottom", fontsize=8)
            else:
                ax_paper.text(x, 0.02, "not\nmeasured", ha="center", va="bottom", fontsize=8, color="gray")
        speedup = f"{full / got[paper.keep]:.2f}x" if full and got.get(paper.keep) else "-"
        ax_paper.text(i * 3 + 0.5, top * 0.9, f"{kind}: {speedup}", ha="center", fontsize=9)
    ax_paper.set_xticks([i * 3 + j for i in range(len(groups)) for j in range(2)],
                        [f"keep {k:g}" for _ in groups for k in (1.0, paper.keep)], fontsize=8)
    ax_paper.set_ylim(0, top)
    ax_paper.set(ylabel="generation time / keep 1.0's",
                 title=f"the paper's setting: batch {paper.batch}, {paper.prompt_tokens} prompt + "
                       f"{paper.generated_tokens} generated tokens\n(paper, {paper.model}: {paper.full_s} s vs "
                       f"{paper.prefixkv_s} s = {paper.speedup:.2f}x)")

    # the sweep: decode tokens/s and memory against context
    sweep = [c for c in data["checks"] if c["name"].startswith("speed/sweep[") and c["status"] == PASSED]
    series: dict[tuple, list] = {}
    for c in sweep:
        p = c["details"]["point"]
        series.setdefault((p["path"], p["keep"], p["batch"]), []).append(c["details"])
    measured = "peak_bytes_above_weights" if cfg.device == "cuda" else "kv_bytes_after_prefill"
    largest = max((r.get(measured) or 0 for rows in series.values() for r in rows), default=0)
    unit, size = ("GiB", GiB) if largest >= GiB else (("MiB", 2**20) if largest >= 2**20 else ("KiB", 2**10))
    contexts = sorted({r["point"]["context"] for rows in series.values() for r in rows})
    for (kind, keep, batch), rows in sorted(series.items()):
        rows.sort(key=lambda r: r["point"]["context"])
        x = [r["point"]["context"] for r in rows]
        style = dict(color=KEEP_COLORS.get(keep, "gray"), ls="-" if kind == "reference" else "--",
                     marker="o" if batch == min(cfg.batches) else "s", label=f"{kind} keep {keep:g} batch {batch}")
        ax_decode.plot(x, [r["decode_tokens_per_s"] for r in rows], **style)
        ax_mem.plot(x, [(r.get(measured) or 0) / size for r in rows], **style)
    ax_decode.set(title="decode tokens/s (solid: PyTorch reference, dashed: kernels; o batch 1, s batch "
                        f"{max(cfg.batches)})", xlabel="context (tokens)", ylabel="tokens/s", yscale="log")
    what = (f"peak GPU memory above the weights ({unit}): KV cache + activations" if cfg.device == "cuda"
            else f"KV cache after prefill ({unit}; no GPU peak on the CPU)")
    weights = speed.get("weights", {})
    if weights.get("weights_bytes"):
        what += f"\nweights: {human_bytes(weights['weights_bytes'])}"
    ax_mem.set(title=what, xlabel="context (tokens)", ylabel=unit, yscale="log")
    for ax in (ax_decode, ax_mem):
        ax.set_xscale("log", base=2)
        if contexts:
            ax.set_xticks(contexts, [str(c) for c in contexts])
            ax.minorticks_off()
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=6, ncol=2)
    env = data["environment"]
    counts = {s: sum(c["status"] == s for c in data["checks"] if c["section"] != "output") for s in (PASSED, FAILED, SKIPPED)}
    title = (f"prefixkv device check {data['date'][:10]} on {env['device_name']} (torch {env['torch']}, "
             f"triton {env['triton']}): {counts[PASSED]} passed, {counts[FAILED]} failed, {counts[SKIPPED]} skipped")
    if cfg.dry_run:
        title = "DRY RUN (CPU, tiny model, Triton interpreter; timings mean nothing)\n" + title
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


# ----------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True, help=f"folder for {JSON_NAME} and {PNG_NAME}")
    p.add_argument("--dry-run", action="store_true", help="the same code on the CPU with tiny shapes (< 1 minute)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # the Triton interpreter must be chosen before triton is first imported (transformers imports it)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device is visible (torch.cuda.is_available() is False); "
              "run with --dry-run to exercise the same code on the CPU", file=sys.stderr)
        return 2
    cfg = dry_config() if args.dry_run else gpu_config()
    clock = Clock(cfg.time_limits)
    if cfg.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 comparisons against fp32, not TF32
        torch.backends.cudnn.allow_tf32 = False
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    header = {"schema": "prefixkv.device-check", "version": 1,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "mode": "dry-run" if cfg.dry_run else "gpu", "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
              "environment": environment(cfg), "config": _jsonable(dataclasses.asdict(cfg))}
    report = Report(output, header)
    report.save()
    env = header["environment"]
    print(f"device check ({header['mode']}) on {env['device_name']}: torch {env['torch']}, triton {env['triton']}, "
          f"transformers {env['transformers']}; budget {cfg.time_limits.total_s:.0f} s; writing {report.path}", flush=True)

    for name, section in (("kernels", kernel_checks), ("cache", cache_checks), ("speed", speed_checks)):
        try:
            section(report, cfg, clock)
        except Exception as err:  # noqa: BLE001 - a broken section is reported, the others still run
            report.add(f"{name}/section", FAILED, error_text(err), traceback=traceback.format_exc()[-3000:])

    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        report.data["outputs"]["png"] = None
        report.data["outputs"]["png_skipped"] = f"matplotlib is not installed ({error_text(err)}): no PNG"
        report.add("output/plot", SKIPPED, report.data["outputs"]["png_skipped"])
    else:
        png = output / PNG_NAME
        report.data["outputs"]["png"] = str(png)
        run_check(report, "output/plot", lambda: (PASSED, None, {"path": str(plot(report, cfg, png))}))
        if report.checks[-1]["status"] != PASSED:
            report.data["outputs"]["png"] = None
    report.data["elapsed_s"] = round(clock.elapsed(), 1)
    report.save()
    plot_ok = bool(report.data["outputs"].get("png"))
    s = report.data["summary"]
    print(f"\nsummary: {s[PASSED]} passed, {s[FAILED]} failed, {s[SKIPPED]} skipped in {clock.elapsed():.0f} s "
          f"-> {report.path}" + (f", {output / PNG_NAME}" if plot_ok else ""), flush=True)
    return 1 if s[FAILED] else 0


if __name__ == "__main__":
    sys.exit(main())
