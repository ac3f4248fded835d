"""The TensorRT-LLM variant of the repository, for GPU users: the ``llmapi`` layout.

    trtllm_repo/
      tensorrt_llm/
        config.pbtxt        the llmapi model's inputs/outputs (Python backend)
        1/
          model.yaml        LLM() arguments + triton_config, with the PrefixKV budget as
                            kv_cache_config.max_attention_window: one window per layer
          PREFIXKV.md       what this reproduces of PrefixKV and what it does not

``model.py`` and ``helpers.py`` of that layout belong to TensorRT-LLM and must match the
``tensorrt_llm`` version installed in the serving container, so they are not written
here: copy them from ``TensorRT-LLM/triton_backend/all_models/llmapi/tensorrt_llm/1/`` of
the matching release (``python3 -c "import tensorrt_llm; print(tensorrt_llm.__version__)"``).

Approximation (sliding-window mode): PrefixKV keeps, in layer l, the fraction f_l of the
prompt's entries it scores most important.  TensorRT-LLM cannot select entries by score,
but it can give every layer its own attention window.  With a reference length L (the
prompt length to match; default the engine's context), layer l gets a window of the
entries the engine keeps of an L-token prompt, ``compaction.keep_counts(L, f_l)`` with the
engine's sink and protect_last (round(f_l x L), never fewer than the sinks and the last
token): the same per-layer memory as PrefixKV at length L.  The rule is the exporter's,
``exporter.trtllm.max_attention_window_from_profile``; nothing here restates it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..defaults import PROTECT_LAST, SINK
from ..engine_folder import read_manifest
from ..exporter.trtllm import max_attention_window_from_profile
from .pbtxt import write_model_config
from .repository import RepositoryError, RepositoryExistsError

TRTLLM_MODEL_NAME = "tensorrt_llm"

# (name, data type, dims) of the llmapi model's inputs, all optional but text_input
_INPUTS = [
    ("text_input", "TYPE_STRING", "-1"),
    ("streaming", "TYPE_BOOL", "1"),
    ("sampling_param_best_of", "TYPE_INT32", "1"),
    ("sampling_param_temperature", "TYPE_FP32", "1"),
    ("sampling_param_top_k", "TYPE_INT32", "1"),
    ("sampling_param_top_p", "TYPE_FP32", "1"),
    ("sampling_param_frequency_penalty", "TYPE_FP32", "1"),
    ("sampling_param_presence_penalty", "TYPE_FP32", "1"),
    ("sampling_param_max_tokens", "TYPE_INT32", "1"),
    ("sampling_param_stop", "TYPE_STRING", "-1"),
    ("sampling_param_seed", "TYPE_UINT64", "1"),
    ("sampling_param_exclude_input_from_output", "TYPE_BOOL", "1"),
    ("sampling_param_return_perf_metrics", "TYPE_BOOL", "1"),
    ("return_finish_reason", "TYPE_BOOL", "1"),
    ("return_stop_reason", "TYPE_BOOL", "1"),
    ("return_cumulative_logprob", "TYPE_BOOL", "1"),
]
_OUTPUTS = [
    ("text_output", "TYPE_STRING", "-1"),
    ("finish_reason", "TYPE_STRING", "-1"),
    ("stop_reason", "TYPE_STRING", "-1"),
    ("cumulative_logprob", "TYPE_FP32", "-1"),
    ("kv_cache_reused_block", "TYPE_INT32", "-1"),
    ("kv_cache_missed_block", "TYPE_INT32", "-1"),
    ("kv_cache_alloc_new_blocks", "TYPE_INT32", "-1"),
    ("kv_cache_alloc_total_blocks", "TYPE_INT32", "-1"),
    ("kv_cache_hit_rate", "TYPE_FP32", "-1"),
    ("arrival_time_ns", "TYPE_INT64", "1"),
    ("first_scheduled_time_ns", "TYPE_INT64", "1"),
    ("first_token_time_ns", "TYPE_INT64", "1"),
    ("last_token_time_ns", "TYPE_INT64", "1"),
]


def attention_windows(layer_keep_fractions: list[float], reference_tokens: int, sink: int = SINK,
                      protect_last: bool = PROTECT_LAST) -> list[int]:
    """Per-layer sliding windows of ``reference_tokens`` tokens: the exporter's rule,
    ``exporter.trtllm.max_attention_window_from_profile`` (the layer's keep count of a
    reference-length prompt, protected entries included).
    """
    if reference_tokens < 1:
        raise ValueError(f"the reference length must be a positive number of tokens, got {reference_tokens}")
    return max_attention_window_from_profile(layer_keep_fractions, reference_tokens, sink, protect_last)


def config_text(name: str = TRTLLM_MODEL_NAME, instances: int = 1) -> str:
    def entries(items, optional):
        return ",\n".join(
            f'  {{ name: "{n}" data_type: {t} dims: [ {d} ]{" optional: true" if optional and n != "text_input" else ""} }}'
            for n, t, d in items
        )

    return f"""# Written by `prefixkv deploy --trtllm`: TensorRT-LLM's llmapi layout.
# max_batch_size and decoupled come from 1/model.yaml (triton_config), as in that layout.
name: "{name}"
backend: "python"
instance_group [ {{ kind: KIND_CPU count: {instances} }} ]
input [
{entries(_INPUTS, True)}
]
output [
{entries(_OUTPUTS, False)}
]
"""


def model_yaml(model: str, windows: list[int], max_seq_len: int, keep_fraction: float, reference_tokens: int,
               sink: int, max_batch_size: int = 8, decoupled: bool = True) -> str:
    """model.yaml: LLM() arguments (everything but triton_config) and the Triton settings."""
    return f"""# Written by `prefixkv deploy --trtllm`.  Every key but triton_config is an argument of
# tensorrt_llm.llmapi.LLM().  PrefixKV keep fraction {keep_fraction:g}, approximated as one
# sliding attention window per layer: the entries the layer keeps of a {reference_tokens}-token
# prompt, round(layer keep fraction x {reference_tokens}), never fewer than the protected ones.
model: {json.dumps(model)}
backend: "pytorch"
tensor_parallel_size: 1
pipeline_parallel_size: 1
max_seq_len: {max_seq_len}
max_batch_size: {max_batch_size}

kv_cache_config:
  enable_block_reuse: false  # reuse assumes a full cache; windows differ per layer
  max_attention_window: {json.dumps(windows)}
  # PrefixKV also always keeps the first {sink} tokens (attention sinks).  TensorRT-LLM's
  # sink_token_length does the same where the release supports it with per-layer windows:
  # sink_token_length: {sink}

triton_config:
  max_batch_size: 0  # the llmapi model takes one prompt per request; LLM() batches in flight
  decoupled: {"true" if decoupled else "false"}
"""


def write_trtllm_repository(
    engine_dir: str | Path,
    repository: str | Path,
    *,
    model: str | None = None,
    reference_tokens: int | None = None,
    instances: int = 1,
    max_batch_size: int = 8,
    force: bool = False,
) -> Path:
    """Write ``repository/tensorrt_llm`` from an engine folder's manifest; returns the model folder.

    model: what model.yaml's ``model:`` says (a hub id or a path on the GPU machine;
    default the folder the engine was built from).  reference_tokens: the prompt length
    whose per-layer memory the windows match (default: the engine's max context).
    """
    manifest = read_manifest(engine_dir, verify=False)
    fractions = [float(f) for f in manifest["layer_keep_fractions"]]
    max_seq_len = int(manifest.get("max_context", 2048))
    reference = int(reference_tokens or max_seq_len)
    if reference > max_seq_len:
        raise RepositoryError(f"--trtllm-reference-tokens {reference} is longer than the engine's context of {max_seq_len}")
    sink = int(manifest.get("sink", SINK))
    protect_last = bool(manifest.get("protect_last", PROTECT_LAST))
    windows = attention_windows(fractions, reference, sink, protect_last)
    source = model or manifest["model"].get("folder") or manifest["model"]["source"]

    model_dir = Path(repository) / TRTLLM_MODEL_NAME
    if model_dir.exists():
        if not force:
            raise RepositoryExistsError(f"{model_dir} exists; pass --force to replace it or choose another --trtllm repository")
        shutil.rmtree(model_dir)
    version_dir = model_dir / "1"
    try:
        version_dir.mkdir(parents=True)
        write_model_config(model_dir / "config.pbtxt", config_text(TRTLLM_MODEL_NAME, instances),
                           name=TRTLLM_MODEL_NAME, backend="python", required_inputs=("text_input",), outputs=("text_output",))
        text = model_yaml(str(source), windows, max_seq_len, float(manifest["keep_fraction"]), reference,
                          sink, max_batch_size)
        _check_yaml(text, windows)
        (version_dir / "model.yaml").write_text(text)
        (version_dir / "PREFIXKV.md").write_text(_notes(manifest, windows, reference))
    except BaseException:
        shutil.rmtree(model_dir, ignore_errors=True)
        raise
    return model_dir


def _check_yaml(text: str, windows: list[int]) -> None:
    """Parse model.yaml back (when PyYAML is installed) and check the windows survived."""
    try:
        import yaml
    except ImportError:
        return
    data = yaml.safe_load(text)
    if data["kv_cache_config"]["max_attention_window"] != windows or "triton_config" not in data:
        raise AssertionError("model.yaml does not round-trip")


def _notes(manifest: dict, windows: list[int], reference: int) -> str:
    rows = "\n".join(
        f"| {i} | {f:.3f} | {w} |" for i, (f, w) in enumerate(zip(manifest["layer_keep_fractions"], windows))
    )
    return f"""# PrefixKV on TensorRT-LLM (approximate sliding-window mode)

Written by `prefixkv deploy --trtllm` from an engine with keep fraction {manifest['keep_fraction']:g}.

Before serving, copy `model.py` and `helpers.py` from
`TensorRT-LLM/triton_backend/all_models/llmapi/tensorrt_llm/1/` of the TensorRT-LLM release
installed in your Triton container into this folder, then

    tritonserver --model-repository <this repository>

Each layer attends to its most recent `round(layer keep fraction x {reference})` tokens, never
fewer than the entries PrefixKV always keeps (the sinks, and the last token where protected)
(`kv_cache_config.max_attention_window`).  This reproduces PrefixKV's per-layer memory
budget at a {reference}-token prompt, not its choice of which entries to keep (importance
scores), not its sink tokens unless `sink_token_length` is enabled, and not its
decode-time eviction rule.  Outputs therefore differ from the prefixkv engine's.

| layer | keep fraction | window (tokens) |
| --- | --- | --- |
{rows}
"""
