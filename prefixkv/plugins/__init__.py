"""PrefixKV's fused ops: the PyTorch specification, Triton kernels, and TensorRT plugins.

    reference   the three ops in PyTorch (the spec; always importable)
    kernels     the same ops as OpenAI Triton kernels + launch wrappers + PTX compilation
                (needs ``triton``; on CPU set TRITON_INTERPRET=1 before importing triton)
    trt         the kernels registered as TensorRT Python plugins (needs ``tensorrt``)

Only ``reference`` is imported here, so ``import prefixkv.plugins`` needs neither triton
nor tensorrt.
"""
from .reference import (
    decode_attention,
    prefill_attention_with_scores,
    select_and_gather,
    width_bound,
)

__all__ = ["prefill_attention_with_scores", "select_and_gather", "decode_attention", "width_bound"]
