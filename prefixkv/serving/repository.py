"""``prefixkv deploy``: write a Triton model repository for one engine.

    triton_repo/
      prefixkv_llm/
        config.pbtxt           Python backend, decoupled, instance count, threads
        1/
          model.py             prefixkv.serving.templates.model, verbatim
          engine/              the engine folder, copied (or a symlink with link=True)
          prefixkv/            the prefixkv runtime (``RUNTIME_MODULES``), vendored

The vendored runtime makes the repository self-contained: a stock Triton with the Python
backend and numpy, onnxruntime, tokenizers and jinja2 importable serves it, whatever
prefixkv is or is not installed there.  The engine's manifest is checked here, before
anything is written, and again when Triton loads the model.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from ..defaults import CACHE_SLACK
from ..engine_folder import check_validated, read_manifest, verify_engine_folder
from ..vision import is_vision_engine
from ..vision.serving import IMAGE_INPUT_PBTXT
from .pbtxt import write_model_config

MODEL_NAME = "prefixkv_llm"
OUTPUTS = ("text_output", "output_ids", "finish_reason")
TEMPLATE = Path(__file__).with_name("templates") / "model.py"


class RepositoryError(ValueError):
    """A repository that cannot be written as asked, with the fix."""


class RepositoryExistsError(FileExistsError):
    """The model folder exists already."""


@dataclass
class ModelSettings:
    """What ``prefixkv deploy`` writes into the model's parameters (each a deploy flag).

    max_batch_size: sequences decoded together (in-flight batching); kv_cache_memory_mib:
    the KV memory budget sequences are admitted by (None: max_batch_size alone); max_queue:
    requests that may wait for a row before new ones are refused."""

    instances: int = 1
    threads: int | None = None
    default_max_tokens: int = 64
    chat: bool = False
    backend: str = "auto"
    max_batch_size: int = 8
    kv_cache_memory_mib: float | None = None
    max_queue: int = 256
    allow_failed_validation: bool = False

    def __post_init__(self):
        for flag, value, least in (("--instances", self.instances, 1), ("--threads", self.threads, 1),
                                   ("--max-tokens", self.default_max_tokens, 1), ("--max-batch-size", self.max_batch_size, 1),
                                   ("--max-queue", self.max_queue, 1)):
            if value is not None and value < least:
                raise RepositoryError(f"{flag} must be at least {least}, got {value}")
        if self.kv_cache_memory_mib is not None and not self.kv_cache_memory_mib > 0:
            raise RepositoryError(f"--kv-cache-memory-mib must be a positive number of MiB, got {self.kv_cache_memory_mib}")


def engine_parameters(manifest: dict) -> dict[str, str]:
    """What the model config tells about its engine: keep fraction, context, per-layer keep
    fractions and the slots each layer holds for a sequence of the whole context."""
    from ..engines.batching import CacheLayout

    layout = CacheLayout.from_manifest(manifest, CACHE_SLACK)
    context = int(manifest["max_context"])
    return {
        "keep_fraction": f"{float(manifest['keep_fraction']):g}",
        "max_context": str(context),
        "layer_keep_fractions": ",".join(f"{float(f):.6g}" for f in manifest["layer_keep_fractions"]),
        "layer_capacities": ",".join(str(int(c)) for c in layout.kept(context)),
        "kv_bytes_per_slot": str(layout.entry_bytes),
    }


def model_config_text(
    settings: ModelSettings | None = None,
    name: str = MODEL_NAME,
    engine_dir: str = "engine",
    image: bool = False,
    manifest: dict | None = None,
) -> str:
    """The ``config.pbtxt`` of the prefixkv_llm model (text; checked by the caller).

    image: add the optional ``image`` input (encoded bytes; vision engines); manifest: the
    engine's, whose keep fraction, context and per-layer capacities the config records."""
    settings = settings or ModelSettings()
    params = {
        "engine_dir": engine_dir,
        "backend": settings.backend,
        "threads": "" if settings.threads is None else str(settings.threads),
        "default_max_tokens": str(settings.default_max_tokens),
        "chat": "true" if settings.chat else "false",
        "max_batch_size": str(settings.max_batch_size),
        "kv_cache_memory_mib": "" if settings.kv_cache_memory_mib is None else f"{settings.kv_cache_memory_mib:g}",
        "max_queue": str(settings.max_queue),
    }
    if settings.allow_failed_validation:
        params["allow_failed_validation"] = "true"
    if manifest is not None:
        params.update(engine_parameters(manifest))
    parameters = "\n".join(
        f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}' for k, v in params.items()
    )
    image_entry = f",\n  {IMAGE_INPUT_PBTXT}" if image else ""
    return f"""# Written by `prefixkv deploy`.  One prefixkv engine on Triton's Python backend:
# model.py runs in-flight batching over the PrefixKV-compressed caches (prefill + decode).
name: "{name}"
backend: "python"
max_batch_size: 0  # one prompt per request; the model batches running sequences itself (parameter max_batch_size)

# decoupled: `stream: true` requests get one response per new piece of text
model_transaction_policy {{ decoupled: true }}

input [
  {{ name: "text_input"  data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "max_tokens"  data_type: TYPE_INT64  dims: [ 1 ] optional: true }},
  {{ name: "temperature" data_type: TYPE_FP32   dims: [ 1 ] optional: true }},
  {{ name: "top_p"       data_type: TYPE_FP32   dims: [ 1 ] optional: true }},
  {{ name: "top_k"       data_type: TYPE_INT64  dims: [ 1 ] optional: true }},
  {{ name: "seed"        data_type: TYPE_UINT64 dims: [ 1 ] optional: true }},
  {{ name: "stop"        data_type: TYPE_STRING dims: [ -1 ] optional: true }},
  {{ name: "stream"      data_type: TYPE_BOOL   dims: [ 1 ] optional: true }},
  {{ name: "chat"        data_type: TYPE_BOOL   dims: [ 1 ] optional: true }}{image_entry}
]
output [
  {{ name: "text_output"   data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "output_ids"    data_type: TYPE_INT64  dims: [ -1 ] }},
  {{ name: "finish_reason" data_type: TYPE_STRING dims: [ 1 ] }}
]

# each instance is one process with its own engine session and its own batch
instance_group [ {{ kind: KIND_CPU count: {settings.instances} }} ]

# engine_dir: relative to the version folder; threads: intra-op threads of the engine
# (empty: the runtime's default); default_max_tokens / chat: when a request does not say;
# max_batch_size / kv_cache_memory_mib (empty: no budget) / max_queue: the scheduler's limits;
# keep_fraction, max_context, layer_keep_fractions, layer_capacities (slots per layer for a
# sequence of the whole context), kv_bytes_per_slot: the engine's, for reading only
{parameters}
"""


def check_engine_folder(engine_dir: str | Path, allow_failed_validation: bool = False) -> Path:
    """The engine folder, its manifest verified and its validation not failed (unless allowed);
    raises a ValueError subclass naming the fix."""
    engine_dir = Path(engine_dir)
    if not engine_dir.is_dir():
        raise FileNotFoundError(f"no engine folder at {engine_dir}; build one with `prefixkv build --output {engine_dir}`")
    check_validated(engine_dir, verify_engine_folder(engine_dir), allow_failed_validation)
    return engine_dir


def check_repository(repository: str | Path, verify: bool = False) -> dict[str, Path]:
    """Before a server starts: every prefixkv model's engine in ``repository`` is one it will load
    (manifest complete, with ``verify`` every file's hash too; validation not failed unless the
    model was deployed with ``allow_failed_validation``).  Returns {model name: engine folder of
    its newest version}."""
    repository = Path(repository)
    if not repository.is_dir():
        raise FileNotFoundError(f"no model repository at {repository}; write one with `prefixkv deploy ENGINE --repository {repository}`")
    engines = {}
    for engine_dir in sorted(repository.glob("*/[0-9]*/engine"), key=lambda e: (e.parents[1].name, int(e.parent.name))):
        allowed = '"allow_failed_validation" value { string_value: "true" }' in (engine_dir.parents[1] / "config.pbtxt").read_text()
        manifest = verify_engine_folder(engine_dir) if verify else read_manifest(engine_dir, verify=False)
        check_validated(engine_dir, manifest, allowed)
        engines[engine_dir.parents[1].name] = engine_dir
    return engines


# What the Triton model imports: the runner interface and its ONNX Runtime backend, the
# tokenizer, the engine-folder format (with the profile it checks) and the image input.
# The TensorRT backend and its plugin registration come along (they need torch and
# TensorRT on the serving machine, and are imported only for a tensorrt engine).  Not the
# exporter, the calibration, the benchmarks or the CLI.
RUNTIME_MODULES = (
    "__init__.py", "defaults.py", "engine_folder.py", "profile.py", "tokenizer.py", "data.py", "optional.py",
    "engines/__init__.py", "engines/base.py", "engines/batching.py", "engines/images.py", "engines/onnxruntime.py",
    "engines/compaction_graph.py", "engines/pages.py", "engines/tensorrt.py",
    "vision/__init__.py", "vision/data.py", "vision/preprocess.py", "vision/serving.py",
    "plugins/__init__.py", "plugins/trt.py", "plugins/reference.py", "plugins/kernels.py",
    "compaction.py", "scoring.py",
)
PACKAGE = Path(__file__).resolve().parents[1]


def vendor_runtime(destination: Path) -> list[Path]:
    """Copy the runtime modules of prefixkv (``RUNTIME_MODULES``) to ``destination``."""
    written = []
    for name in RUNTIME_MODULES:
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PACKAGE / name, target)
        written.append(target)
    return written


def write_repository(
    engine_dir: str | Path,
    repository: str | Path,
    settings: ModelSettings | None = None,
    *,
    model_name: str = MODEL_NAME,
    version: int = 1,
    link: bool = False,
    force: bool = False,
) -> Path:
    """Write (or with ``force`` replace) ``repository/model_name``; returns the model folder."""
    settings = settings or ModelSettings()
    if version < 1:
        raise RepositoryError(f"--version must be at least 1, got {version}")
    engine_dir = check_engine_folder(engine_dir, settings.allow_failed_validation).resolve()
    model_dir = Path(repository) / model_name
    if model_dir.exists():
        if not force:
            raise RepositoryExistsError(f"{model_dir} exists; pass --force to replace it or choose another --repository")
        shutil.rmtree(model_dir)
    version_dir = model_dir / str(version)
    try:
        version_dir.mkdir(parents=True)
        write_model_config(
            model_dir / "config.pbtxt",
            model_config_text(settings, model_name, image=is_vision_engine(engine_dir),
                              manifest=read_manifest(engine_dir, verify=False)),
            name=model_name, backend="python", decoupled=True, required_inputs=("text_input",), outputs=OUTPUTS,
        )
        shutil.copy2(TEMPLATE, version_dir / "model.py")
        if link:
            (version_dir / "engine").symlink_to(engine_dir, target_is_directory=True)
        else:
            shutil.copytree(engine_dir, version_dir / "engine", symlinks=False)
        vendor_runtime(version_dir / "prefixkv")
    except BaseException:
        shutil.rmtree(model_dir, ignore_errors=True)
        raise
    return model_dir
