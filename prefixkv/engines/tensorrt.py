"""TensorRT backend: runs an engine folder's prefill and decode graphs as TensorRT engines.

    build:  build_tensorrt_engine(folder / "prefill.onnx", folder / "tensorrt", engine_name="prefill.engine", ...)
            build_tensorrt_engine(folder / "decode.onnx",  folder / "tensorrt", engine_name="decode.engine", ...)
    run:    runner = TensorRTRunner(folder)
            runner.generate("Hello", GenerationConfig(max_new_tokens=32))

The I/O contract is the ONNX exporter's (``prefixkv.exporter.onnx.io_names``):
    prefill: input_ids, attention_mask (B, S) int64 -> logits (B, V), present.{l}.{key,value,positions,valid}
    decode:  input_ids (B, 1), position_ids (B, 1), prompt_lengths (B,), past.{l}.* -> logits, present.{l}.*
Buffers are torch CUDA tensors; each step's ``present.*`` become the next step's
``past.*`` without leaving the GPU; only the logits are copied to the host.  Outputs whose
shape depends on the data (the decode graph's cache width after an eviction) are
allocated through a ``trt.IOutputAllocator``.

Engines built with the AOT PrefixKV plugins need no Python plugin code; those built with
the JIT path need ``prefixkv.plugins.trt.register_plugins()`` (called here when triton is
importable).  Unverified here: no TensorRT or GPU on the development machine.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..engine_folder import ENGINE_SUBDIR, read_manifest
from ..optional import StackMissing
from ..tokenizer import Tokenizer
from .base import Runner


def _import_stack():
    """(tensorrt, torch) with a CUDA device, or a RuntimeError naming the fix."""
    from ..plugins.trt import (
        import_tensorrt,  # imports torch (the plugins' specification)
    )

    trt, _ = import_tensorrt()
    try:
        import torch
    except ImportError as err:  # pragma: no cover
        raise StackMissing("the TensorRT backend keeps its buffers in torch CUDA tensors: pip install torch") from err
    if not torch.cuda.is_available():
        raise StackMissing("the TensorRT backend needs an NVIDIA GPU with CUDA (torch.cuda.is_available() is False)")
    return trt, torch


def torch_dtype(trt, torch, dtype):
    """torch dtype of a TensorRT tensor dtype."""
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
             trt.int32: torch.int32, trt.int64: torch.int64, trt.bool: torch.bool, trt.int8: torch.int8,
             trt.uint8: torch.uint8}
    if dtype not in table:
        raise TypeError(f"unsupported TensorRT tensor type {dtype}")
    return table[dtype]


def _output_allocator(trt, torch):
    """An ``IOutputAllocator`` that hands TensorRT torch CUDA memory for data-dependent outputs."""

    class TorchOutputAllocator(trt.IOutputAllocator):
        def __init__(self):
            trt.IOutputAllocator.__init__(self)
            self.buffer = None
            self.shape = None

        def reallocate_output(self, tensor_name, memory, size, alignment):
            if self.buffer is None or self.buffer.numel() < size:
                self.buffer = torch.empty(max(int(size), 1), dtype=torch.uint8, device="cuda")
            return self.buffer.data_ptr()

        def reallocate_output_async(self, tensor_name, memory, size, alignment, stream):
            return self.reallocate_output(tensor_name, memory, size, alignment)

        def notify_shape(self, tensor_name, shape):
            self.shape = tuple(shape)

        def tensor(self, dtype):
            n = int(np.prod(self.shape)) if self.shape else 0
            item = torch.empty((), dtype=dtype).element_size()
            return self.buffer[: n * item].view(dtype).view(self.shape)

    return TorchOutputAllocator


@dataclass
class TensorRTState:
    """past: per layer (key, value, positions, valid) torch CUDA tensors, flat, layer-major;
    positions: (B,) next original position per row; prompt_lengths: (B,) real prompt lengths."""

    past: list
    positions: np.ndarray
    prompt_lengths: np.ndarray

    def layers(self) -> list[tuple]:
        """Per layer (key, value, positions, valid), as ``OnnxRuntimeState.layers``."""
        return [tuple(self.past[i : i + 4]) for i in range(0, len(self.past), 4)]


class Engine:
    """One deserialised engine + execution context, run on torch CUDA tensors."""

    def __init__(self, trt, torch, path: Path, logger):
        if not path.is_file():
            raise FileNotFoundError(f"no TensorRT engine at {path}; build it with prefixkv.exporter.tensorrt.build_tensorrt_engine")
        self.trt, self.torch = trt, torch
        runtime = trt.Runtime(logger)
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialise {path} (built with another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        self._allocator = _output_allocator(trt, torch)

    def __call__(self, feeds: dict, stream) -> dict:
        trt, torch, ctx = self.trt, self.torch, self.context
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise KeyError(f"engine inputs without a value: {missing[:5]}")
        keep = []  # inputs must outlive the launch
        for name in self.inputs:
            t = feeds[name].contiguous()
            want = torch_dtype(trt, torch, self.engine.get_tensor_dtype(name))
            t = t.to(device="cuda", dtype=want)
            keep.append(t)
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
        results, allocators = {}, {}
        for name in self.outputs:
            dtype = torch_dtype(trt, torch, self.engine.get_tensor_dtype(name))
            shape = tuple(ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):  # data-dependent: TensorRT asks for memory when it knows
                allocators[name] = (self._allocator(), dtype)
                ctx.set_output_allocator(name, allocators[name][0])
            else:
                results[name] = torch.empty(shape, dtype=dtype, device="cuda")
                ctx.set_tensor_address(name, results[name].data_ptr())
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed (see the TensorRT log above)")
        stream.synchronize()
        for name, (alloc, dtype) in allocators.items():
            results[name] = alloc.tensor(dtype).clone()
        return results


class TensorRTRunner(Runner):
    """engine_dir: an engine folder (manifest, tokenizer, profile) with ``tensorrt/prefill.engine``
    and ``tensorrt/decode.engine``; verify: hash the folder's files on load."""

    name = "tensorrt"

    def __init__(self, engine_dir: str | Path, engines: str = ENGINE_SUBDIR, verify: bool = True):
        trt, torch = _import_stack()

        self.engine_dir = Path(engine_dir)
        self.manifest = read_manifest(self.engine_dir, verify=verify)
        try:  # JIT plugin engines call back into Python; AOT ones do not need this
            from ..plugins.trt import register_plugins

            register_plugins()
        except ImportError:
            pass
        self._torch = torch
        logger = trt.Logger(trt.Logger.WARNING)
        self.engines = {g: Engine(trt, torch, self.engine_dir / engines / f"{g}.engine", logger) for g in ("prefill", "decode")}
        self.stream = torch.cuda.Stream()
        self.layers = int(self.manifest["layers"])
        self.tokenizer = Tokenizer(self.engine_dir)
        self.max_context = int(self.manifest["max_context"])
        self.present_names = [n for n in self.engines["prefill"].outputs if n != "logits"]
        self.past_names = past_names(self.present_names)
        if sorted(self.past_names) != sorted(n for n in self.engines["decode"].inputs if n.startswith("past.")):
            raise RuntimeError("the prefill engine's present.* outputs do not match the decode engine's past.* inputs")

    def prefill(self, input_ids, attention_mask):
        """input_ids, attention_mask (B, S) int64, left padding -> (logits (B, V) float32, state)."""
        torch = self._torch
        ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.asarray(attention_mask, dtype=np.int64)
        if ids.ndim != 2 or ids.shape != mask.shape or ids.shape[1] < 1:
            raise ValueError(f"input_ids and attention_mask must be (batch, S) arrays of one shape, got {ids.shape} and {mask.shape}")
        out = self.engines["prefill"]({"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)},
                                      self.stream)
        lengths = mask.sum(-1).astype(np.int64)
        state = TensorRTState([out[n] for n in self.present_names], lengths.copy(), lengths)
        return out["logits"].float().cpu().numpy(), state

    def decode(self, state: TensorRTState, token_ids):
        """token_ids (B,) int64 -> (logits (B, V) float32, state)."""
        torch = self._torch
        feeds = {
            "input_ids": torch.from_numpy(np.asarray(token_ids, dtype=np.int64).reshape(-1, 1)),
            "position_ids": torch.from_numpy(state.positions.reshape(-1, 1).astype(np.int64)),
            "prompt_lengths": torch.from_numpy(state.prompt_lengths.astype(np.int64)),
        }
        feeds.update(zip(self.past_names, state.past))
        out = self.engines["decode"](feeds, self.stream)
        new_state = TensorRTState([out[n] for n in self.present_names], state.positions + 1, state.prompt_lengths)
        return out["logits"].float().cpu().numpy(), new_state

    def kept_positions(self, state: TensorRTState) -> list[np.ndarray]:
        """Per layer, (B, W_l) int64 original positions of the kept entries (-1: empty slot).

        Columns empty in every row are dropped: after a prefill the plugin gives each layer
        its static slot bound (``plugins.reference.width_bound``), empty at the front."""
        out = []
        for l in range(self.layers):
            valid = state.past[4 * l + 3].bool().cpu().numpy()
            used = valid.any(0)
            first = int(np.argmax(used)) if used.any() else valid.shape[1]
            out.append(state.past[4 * l + 2].long().cpu().numpy()[:, first:])
        return out


def past_names(present: list[str]) -> list[str]:
    """The decode inputs fed by prefill/decode outputs: present.{l}.{part} -> past.{l}.{part}."""
    bad = [n for n in present if not n.startswith("present.")]
    if bad:
        raise ValueError(f"cache outputs must be named present.<layer>.<part>, got {bad[:3]}")
    return ["past." + n[len("present."):] for n in present]


__all__ = ["TensorRTRunner", "TensorRTState", "Engine", "past_names", "torch_dtype", "ENGINE_SUBDIR"]
