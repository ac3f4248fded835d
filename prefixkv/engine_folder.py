"""The engine folder: what ``build`` writes and every runner loads.

    ENGINE/
      prefill.onnx, prefill.onnx.data     prompt -> logits + compacted cache (per-layer lengths baked in)
      decode.onnx, decode.onnx.data       one token per row, cache kept within budget
      profile.json                        the retention profile the lengths come from
      tokenizer.json, tokenizer_config.json, chat_template.jinja
      manifest.json                       written last: versions, settings, I/O, sha256 of every file
      validation.json                     (optional) the last validation report, not covered by the manifest

Writing is atomic: everything goes to a hidden temporary folder next to the target, which
is renamed at the end, so an interrupted build leaves nothing that looks like an engine.
Loading verifies the manifest (schema, every file's size and sha256, the profile's model)
and refuses anything else with one line naming the fix.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from . import __version__
from .profile import Fingerprint, ProfileError, RetentionProfile, atomic_write_text

SCHEMA = "prefixkv.engine"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
VALIDATION = "validation.json"
ENGINE_SUBDIR = "tensorrt"  # the TensorRT engines of a tensorrt-backend folder
CACHE_LAYOUT_KEY = "prefixkv.cache_layout"  # decode graph metadata: "buffer" (ONNX Runtime) or "compact"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
REQUIRED_TOKENIZER_FILES = ("tokenizer.json",)


class EngineError(ValueError):
    """An engine folder that cannot be used, with the reason and the fix."""


class EngineExistsError(FileExistsError):
    """The output folder exists and ``force`` was not given."""


def sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of the stacks that produced the engine (those importable)."""
    from importlib import metadata

    out = {}
    for name in ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "numpy", "tokenizers"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def check_output(target: str | Path, force: bool = False) -> Path:
    """Refuse an existing output folder unless ``force`` (before any expensive work)."""
    target = Path(target)
    if target.exists() and not force:
        raise EngineExistsError(f"{target} exists; pass --force to replace it or choose another --output")
    if target.exists() and not target.is_dir():
        raise EngineExistsError(f"{target} exists and is not a folder; remove it or choose another --output")
    return target


@contextlib.contextmanager
def staging(target: str | Path, force: bool = False):
    """Yield a temporary folder next to ``target``; on success it becomes ``target``.

    On any error (or interruption) the temporary folder is removed and ``target`` is untouched.
    """
    target = check_output(target, force).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield tmp
        usual_permissions(tmp)
        if target.exists():  # force: swap the old engine out, then delete it
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "engine")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def usual_permissions(folder: Path) -> None:
    """mkdtemp/mkstemp make owner-only entries; give the engine the umask's usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def copy_tokenizer(model_folder: str | Path, folder: str | Path) -> list[str]:
    """Copy the tokenizer files present in ``model_folder``; tokenizer.json is required."""
    model_folder, folder = Path(model_folder), Path(folder)
    missing = [n for n in REQUIRED_TOKENIZER_FILES if not (model_folder / n).is_file()]
    if missing:
        raise EngineError(
            f"{model_folder} has no {missing[0]}: engines need a fast tokenizer; save one with "
            "AutoTokenizer.from_pretrained(...).save_pretrained(model_folder)"
        )
    copied = []
    for name in TOKENIZER_FILES:
        if (model_folder / name).is_file():
            shutil.copyfile(model_folder / name, folder / name)
            copied.append(name)
    return copied


def write_manifest(folder: str | Path, info: dict) -> dict:
    """Write manifest.json over every file in ``folder`` (sha256 + bytes), last."""
    folder = Path(folder)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (MANIFEST, VALIDATION)):
        rel = path.relative_to(folder).as_posix()
        files[rel] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
    manifest = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tool": {"name": "prefixkv", "version": __version__},
        "libraries": library_versions(),
        **info,
        "files": files,
    }
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(folder: str | Path, verify: bool = True) -> dict:
    """The manifest of an engine folder, checked; ``verify`` also hashes every file.

    Raises ``EngineError`` for a missing, incomplete, tampered or mismatched folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise EngineError(f"no engine folder at {folder}; build one with `prefixkv build --output {folder}`")
    path = folder / MANIFEST
    if not path.is_file():
        partial = folder.name.startswith(".") and ".partial-" in folder.name
        hint = "an interrupted build" if partial else "not an engine, or an unfinished build"
        raise EngineError(f"{folder} has no {MANIFEST} ({hint}); rebuild it with `prefixkv build --force --output {folder}`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EngineError(f"{path} is not valid JSON ({err}); rebuild the engine with `prefixkv build --force`") from err
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise EngineError(f"{path} is not a prefixkv engine manifest; rebuild the engine with `prefixkv build --force`")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise EngineError(
            f"{folder} has engine schema version {manifest.get('schema_version')!r}; this prefixkv reads "
            f"version {SCHEMA_VERSION}: rebuild the engine with this version (`prefixkv build --force`)"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise EngineError(f"{path} lists no files; rebuild the engine with `prefixkv build --force`")
    needed = {"prefill.onnx", "decode.onnx", "profile.json", "tokenizer.json"}
    if needed - set(files):
        raise EngineError(f"{path} does not list {sorted(needed - set(files))}; rebuild the engine with `prefixkv build --force`")
    for name, entry in files.items():
        file = folder / name
        if not file.is_file():
            raise EngineError(f"{file} is missing from the engine; rebuild it with `prefixkv build --force --output {folder}`")
        if file.stat().st_size != entry.get("bytes"):
            raise EngineError(f"{file} was modified after the build (size differs from the manifest); rebuild the engine with `prefixkv build --force`")
        if verify and sha256(file) != entry.get("sha256"):
            raise EngineError(f"{file} was modified after the build (sha256 differs from the manifest); rebuild the engine with `prefixkv build --force`")
    _check_profile(folder, manifest)
    return manifest


def _check_profile(folder: Path, manifest: dict) -> None:
    """The profile in the folder must be the one the graphs were built from."""
    try:
        profile = RetentionProfile.load(folder / "profile.json")
        fingerprint = Fingerprint(**manifest["model"]["fingerprint"])
        profile.check_model(fingerprint)
        fractions = profile.layer_fractions(manifest["keep_fraction"])
    except (ProfileError, KeyError, TypeError) as err:
        raise EngineError(f"{folder}: the profile does not match the engine ({err}); rebuild it with `prefixkv build --force`") from err
    if [float(f) for f in fractions] != [float(f) for f in manifest.get("layer_keep_fractions", [])]:
        raise EngineError(f"{folder}: profile.json's layer keep fractions differ from the manifest's; rebuild the engine with `prefixkv build --force`")


ALLOW_FAILED = "--allow-failed-validation"  # the override flag named by ``check_validated``


def mark_validation(folder: str | Path, report: dict) -> dict:
    """Record a validation report's verdict in the manifest (``"validation"``; the report itself
    is ``validation.json``).  The files and their hashes are unchanged."""
    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["validation"] = {
        "passed": bool(report["passed"]),
        "checks": {name: check.get("status", "pass" if check["passed"] else "FAIL") for name, check in report["checks"].items()},
        "report": VALIDATION,
    }
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def check_validated(folder: str | Path, manifest: dict, allow_failed: bool = False) -> None:
    """Refuse an engine whose validation failed (its manifest says so), unless ``allow_failed``.
    An engine built without validation (or before prefixkv recorded it) is not refused."""
    verdict = manifest.get("validation")
    if allow_failed or not isinstance(verdict, dict) or verdict.get("passed", True):
        return
    failed = [name for name, status in (verdict.get("checks") or {}).items() if status == "FAIL"]
    raise EngineError(f"{folder} failed its validation ({', '.join(failed) or 'see the report'}; {Path(folder) / VALIDATION}); "
                      f"rebuild it, or pass {ALLOW_FAILED} to use it anyway")


def is_engine(folder: str | Path) -> bool:
    """True for a complete engine folder (manifest present and every file's size right)."""
    try:
        read_manifest(folder, verify=False)
        return True
    except EngineError:
        return False


def verify_engine_folder(folder: str | Path) -> dict:
    """``read_manifest(folder, verify=True)``: the manifest of a complete, untampered engine."""
    return read_manifest(folder, verify=True)
