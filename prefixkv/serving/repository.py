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
from pathlib import Path

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


def model_config_text(
    name: str = MODEL_NAME,
    instances: int = 1,
    threads: int | None = None,
    default_max_tokens: int = 64,
    chat: bool = False,
    backend: str = "auto",
    engine_dir: str = "engine",
    image: bool = False,
    allow_failed_validation: bool = False,
) -> str:
    """The ``config.pbtxt`` of the prefixkv_llm model (text; checked by the caller).

    image: add the optional ``image`` input (encoded bytes; vision engines).
    allow_failed_validation: the model loads an engine whose validation failed."""
    params = {
        "engine_dir": engine_dir,
        "backend": backend,
        "threads": "" if threads is None else str(threads),
        "default_max_tokens": str(default_max_tokens),
        "chat": "true" if chat else "false",
    }
    if allow_failed_validation:
        params["allow_failed_validation"] = "true"
    parameters = "\n".join(
        f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}' for k, v in params.items()
    )
    image_entry = f",\n  {IMAGE_INPUT_PBTXT}" if image else ""
    return f"""# Written by `prefixkv deploy`.  One prefixkv engine on Triton's Python backend:
# model.py runs the whole prefill + decode loop with the PrefixKV-compressed cache.
name: "{name}"
backend: "python"
max_batch_size: 0  # one prompt per request; concurrency comes from instances

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

# each instance is one process with its own engine session
instance_group [ {{ kind: KIND_CPU count: {instances} }} ]

# engine_dir: relative to the version folder; threads: intra-op threads of the engine
# (empty: the runtime's default); default_max_tokens / chat: when a request does not say
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


def check_repository(repository: str | Path) -> None:
    """Before a server starts: every prefixkv model's engine in ``repository`` is one it will load
    (manifest complete; validation not failed unless the model was deployed with ``ALLOW_FAILED``)."""
    repository = Path(repository)
    if not repository.is_dir():
        raise FileNotFoundError(f"no model repository at {repository}; write one with `prefixkv deploy ENGINE --repository {repository}`")
    for engine_dir in sorted(repository.glob("*/[0-9]*/engine")):
        allowed = '"allow_failed_validation" value { string_value: "true" }' in (engine_dir.parents[1] / "config.pbtxt").read_text()
        check_validated(engine_dir, read_manifest(engine_dir, verify=False), allowed)


# What the Triton model imports: the runner interface and its ONNX Runtime backend, the
# tokenizer, the engine-folder format (with the profile it checks) and the image input.
# The TensorRT backend and its plugin registration come along (they need torch and
# TensorRT on the serving machine, and are imported only for a tensorrt engine).  Not the
# exporter, the calibration, the benchmarks or the CLI.
RUNTIME_MODULES = (
    "__init__.py", "defaults.py", "engine_folder.py", "profile.py", "tokenizer.py", "data.py", "optional.py",
    "engines/__init__.py", "engines/base.py", "engines/images.py", "engines/onnxruntime.py",
    "engines/compaction_graph.py", "engines/tensorrt.py",
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
    *,
    model_name: str = MODEL_NAME,
    version: int = 1,
    instances: int = 1,
    threads: int | None = None,
    default_max_tokens: int = 64,
    chat: bool = False,
    backend: str = "auto",
    link: bool = False,
    force: bool = False,
    allow_failed_validation: bool = False,
) -> Path:
    """Write (or with ``force`` replace) ``repository/model_name``; returns the model folder."""
    if instances < 1:
        raise RepositoryError(f"--instances must be at least 1, got {instances}")
    if threads is not None and threads < 1:
        raise RepositoryError(f"--threads must be at least 1, got {threads}")
    if default_max_tokens < 1:
        raise RepositoryError(f"--max-tokens must be at least 1, got {default_max_tokens}")
    if version < 1:
        raise RepositoryError(f"--version must be at least 1, got {version}")
    engine_dir = check_engine_folder(engine_dir, allow_failed_validation).resolve()
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
            model_config_text(model_name, instances, threads, default_max_tokens, chat, backend,
                              image=is_vision_engine(engine_dir), allow_failed_validation=allow_failed_validation),
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
