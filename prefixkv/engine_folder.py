"""The engine folder: what ``build`` writes and every runner loads.

    ENGINE/
      decoder.onnx, decoder.onnx.data     the model, once: a chunk of C >= 1 tokens per row over the
                                          layers' cache buffers (prefill chunks and decode steps alike)
      compact.onnx                        no weights: the prompt's caches compacted to the profile's
                                          per-layer counts (the lengths baked in)
      (tensorrt backend: prefill.onnx and decode.onnx plugin-mode graphs, tensorrt/ engines)
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
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, ValidationError, model_validator

from . import __version__
from .defaults import OLDEST

# the profile's schema vocabulary (pydantic, strict: exact types, finite floats, bounded sizes)
from .profile import (
    Dim,
    Fingerprint,
    JsonObject,
    Name,
    ProfileError,
    RetentionProfile,
    _fail,
    _one_line,
    _path,
    _show,
    _Strict,
    _within,
    atomic_write_text,
)

SCHEMA = "prefixkv.engine"
SCHEMA_VERSION = 7  # 2: one decoder graph (and weightless score and compact graphs); 3: the decoder returns the attention mass;
# 4: the decoder takes each layer's past length (past_lengths) and applies the decode rule to all layers at once;
# 5: the decoder takes and returns every layer's slots side by side (past/present.positions and .valid, past_widths)
# and one mass output; 6: the decoder's prefill and decode phases are the branches of one If (a prefill chunk's
# attention unmasked and returning its probabilities, a decode step's masked), and SLOTS_KEY is read;
# 7: shared slots hold each row's entries first (the fused attention's per-row lengths, no bias), and a
# decoder whose layers never evict is one graph, no If
# the graphs every engine folder of a backend has
ENGINE_GRAPHS = {"onnxruntime": ("decoder", "compact"), "tensorrt": ("prefill", "decode")}
LANGUAGE_GRAPHS = ("decoder", "compact", "prefill", "decode")  # every graph but the vision tower's, in order
MANIFEST = "manifest.json"
VALIDATION = "validation.json"
ENGINE_SUBDIR = "tensorrt"  # the TensorRT engines of a tensorrt-backend folder
CACHE_LAYOUT_KEY = "prefixkv.cache_layout"  # decode graph metadata: "buffer" (ONNX Runtime) or "compact"
SCORE_ROWS_KEY = "prefixkv.score_rows"  # decoder graph metadata: trailing prompt rows scored ("all" or a count)
# decoder graph metadata: "shared" (no layer evicts: one set of slots, (B, P), for every layer, each row's entries
# first from schema 7 on) or "per-layer"
# (every layer's slots side by side, (B, sum of P_l)).  Added under schema 5 without a bump; schema 6 engines
# all carry it, and a prefixkv from before schema 6 refuses them with its "rebuild" line.
SLOTS_KEY = "prefixkv.slots"
FUSIONS_KEY = "prefixkv.fusions"  # decoder graph metadata: the ONNX Runtime kernels the exporter fused, "rule=count,..."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
REQUIRED_TOKENIZER_FILES = ("tokenizer.json",)


MAX_FILES = 10_000
MAX_FILE_BYTES = 1 << 50
MAX_PATH = 1024
DTYPES = ("float32", "float16", "bfloat16")
BACKENDS = ("onnxruntime", "tensorrt")
CHECK_STATUSES = ("pass", "FAIL", "reported")


def onnx_graphs(graph):
    """An ONNX GraphProto and, recursively, its subgraphs: the decoder's phases are the
    branches of its one ``If`` (no onnx import: protobuf attribute types 5 and 10 are GRAPH
    and GRAPHS)."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            subgraphs = [attribute.g] if attribute.type == 5 else list(attribute.graphs) if attribute.type == 10 else []
            for sub in subgraphs:
                yield from onnx_graphs(sub)


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


def _replaceable(target: Path) -> str | None:
    """Why ``--force`` may not replace ``target`` (None: it may): only a prefixkv engine folder
    (its manifest names the engine schema), or an empty folder, is ever replaced."""
    if not target.is_dir():
        return "is not a folder"
    if not any(target.iterdir()):
        return None
    try:
        schema = json.loads((target / MANIFEST).read_text()).get("schema")
    except (OSError, ValueError, AttributeError):
        schema = None
    if schema != SCHEMA:
        return f"is not a prefixkv engine (no prefixkv {MANIFEST}); --force replaces only an engine folder"
    return None


def check_output(target: str | Path, force: bool = False) -> Path:
    """Refuse an existing output folder unless ``force`` (before any expensive work); ``force``
    replaces only an engine folder (or an empty one), never anything else."""
    target = Path(target)
    if target.exists() and not force:
        raise EngineExistsError(f"{target} exists; pass --force to replace it or choose another --output")
    if target.exists():
        why = _replaceable(target)
        if why is not None:
            raise EngineExistsError(f"{target} exists and {why}: remove it yourself or choose another --output")
    return target


LOCK_SUFFIX = ".lock"


def _lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}{LOCK_SUFFIX}"


def _try_lock(path: Path):
    """An exclusive, non-blocking lock on ``path`` (an open file), or None when another process
    holds it.  The file may be removed by its last holder: the lock counts only when the
    path still names the file that was locked."""
    import fcntl

    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return handle
        handle.close()  # removed (and perhaps re-made) since it was opened: try again


def _unlock(path: Path, handle) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
    handle.close()


@contextlib.contextmanager
def output_lock(target: str | Path):
    """Hold the build lock of ``target`` (``.NAME.lock`` next to it) for the whole build, so two
    builds into one folder never run at once: the second is refused at its start."""
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    path = _lock_path(target)
    handle = _try_lock(path)
    if handle is None:
        try:
            holder = Path(path).read_text().strip() or "?"
        except OSError:
            holder = "?"
        raise EngineExistsError(f"another prefixkv build is writing {target} (pid {holder}); wait for it to finish "
                                "or choose another --output")
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield path
    finally:
        _unlock(path, handle)


_LEFTOVER = (".partial-", ".old-")


def remove_stale_builds(parent: str | Path, log=None) -> list[Path]:
    """Remove the temporary folders (``.NAME.partial-*``, ``.NAME.old-*``) that interrupted or
    killed builds left in ``parent``: those whose NAME no running build holds the lock of.
    ``log`` gets one line per folder removed.  Returns the folders removed."""
    parent = Path(parent)
    removed = []
    if not parent.is_dir():
        return removed
    for entry in sorted(parent.iterdir()):
        name = entry.name
        cut = min((name.find(m) for m in _LEFTOVER if m in name), default=-1)
        if not (entry.is_dir() and name.startswith(".") and cut > 1) or entry.is_symlink():
            continue
        owner = parent / name[1:cut]
        lock = _lock_path(owner)
        handle = _try_lock(lock)
        if handle is None:
            continue  # a build of that name is running: its folder is in use
        try:
            size = sum(p.stat().st_size for p in entry.rglob("*") if p.is_file() and not p.is_symlink())
            shutil.rmtree(entry, ignore_errors=True)
        finally:
            _unlock(lock, handle)
        removed.append(entry)
        if log is not None:
            log(f"removed {entry} ({size / 2**20:.1f} MiB), left by an interrupted build of {owner.name}")
    return removed


def _keep_aside(tmp: Path, target: Path, why: str):
    kept = target.with_name(f"{target.name}.new-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(tmp, kept)
    raise EngineExistsError(f"{target} {why} and was left as it is; the new engine is in {kept}")


@contextlib.contextmanager
def staging(target: str | Path, force: bool = False, log=None):
    """Yield a temporary folder next to ``target``; on success it becomes ``target``.

    The caller holds ``output_lock(target)``.  On any error (or interruption) the temporary
    folder is removed and ``target`` is untouched.  At the swap, ``target`` is checked again:
    a folder that appeared meanwhile (without ``force``), or that is no longer an engine, is
    never replaced; the new build is then kept next to it, under ``NAME.new-TIME``, and
    ``EngineExistsError`` says where.
    """
    target = check_output(target, force).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(target.parent, log)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield tmp
        usual_permissions(tmp)
        if target.exists() or target.is_symlink():
            why = "appeared during the build" if not force else _replaceable(target)
            if why is not None:
                _keep_aside(tmp, target, why)
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "engine")  # force: swap the old engine out, then delete it
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, target)  # fails on a folder with files in it: nothing is overwritten
            except OSError:
                _keep_aside(tmp, target, "appeared during the build")
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


# -- the manifest's schema --------------------------------------------------------------------------
MAX_MANIFEST_BYTES = 16 << 20


def _unique_keys(pairs: list) -> dict:
    """A JSON object whose keys are all distinct (a later duplicate would silently win)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {key!r} is given twice")
        out[key] = value
    return out


def _relative(value: str) -> str:
    """A path inside the engine folder: relative, POSIX separators, no '..', no empty parts."""
    parts = value.split("/")
    if value.startswith("/") or "\\" in value or (len(value) > 1 and value[1] == ":"):
        _fail(f"must be a relative path inside the engine folder, got {_show(value)}")
    if any(part in ("", ".", "..") for part in parts):
        _fail(f"must be a plain relative path inside the engine folder (no '.', '..' or empty parts), got {_show(value)}")
    if value == MANIFEST:
        _fail(f"{MANIFEST} does not hash itself")
    return value


RelPath = Annotated[str, Field(min_length=1, max_length=MAX_PATH), AfterValidator(_relative)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Text = Annotated[str, Field(max_length=4096)]


class _FileDoc(_Strict):
    bytes: Annotated[int, _within(0, MAX_FILE_BYTES)]
    sha256: Sha256


class _TensorDoc(_Strict):
    name: Name
    dtype: Name
    shape: Annotated[list[Annotated[int, _within(0, 1 << 40)] | Name], Field(max_length=16)]


class _GraphDoc(_Strict):
    file: RelPath
    data: RelPath | None = None
    inputs: Annotated[list[_TensorDoc], Field(max_length=MAX_FILES)] = []
    outputs: Annotated[list[_TensorDoc], Field(max_length=MAX_FILES)] = []
    opset: Annotated[int, _within(1, 1000)] | None = None


class _FingerprintDoc(_Strict):
    architecture: Name
    layers: Dim
    heads: Dim
    kv_heads: Dim
    head_dim: Dim
    config_hash: Name


class _ModelDoc(_Strict):
    source: Text
    folder: Text
    fingerprint: _FingerprintDoc


class _ScorerDoc(_Strict):
    name: Name
    params: JsonObject = {}


class _ValidationDoc(_Strict):
    passed: bool
    checks: Annotated[dict[Name, Literal[CHECK_STATUSES]], Field(max_length=64)] = {}
    report: RelPath = VALIDATION


class _WeightsDoc(_Strict):
    precision: Literal["int8", "int4"]
    bits: Literal[8, 4]
    block_size: Annotated[int, _within(16, 1 << 16)]
    symmetric: bool
    accuracy_level: Annotated[int, _within(0, 4)] | None = None
    tool: Text


class _ManifestDoc(_Strict):
    schema_: Literal[SCHEMA] = Field(alias="schema")
    schema_version: Literal[SCHEMA_VERSION]
    created: Text
    tool: JsonObject
    libraries: Annotated[dict[Name, Name], Field(max_length=64)] = {}
    model: _ModelDoc
    keep_fraction: Annotated[float, _within(0, 1, open_lo=True)]
    layer_keep_fractions: Annotated[list[Annotated[float, _within(0, 1)]], Field(min_length=1, max_length=MAX_FILES)]
    layers: Dim
    heads: Dim
    kv_heads: Dim
    head_dim: Dim
    vocab: Dim
    dtype: Literal[DTYPES]
    sink: Annotated[int, _within(0, 1_000_000)]
    protect_last: bool
    scorer: _ScorerDoc
    evict_distance: Annotated[int, _within(1, OLDEST)]  # OLDEST: evict the oldest entry after the sinks
    opset: Annotated[int, _within(1, 1000)]
    exporter: Text
    max_context: Annotated[int, _within(1, 1 << 30)]
    graphs: dict[Literal["decoder", "compact", "prefill", "decode", "vision"], _GraphDoc]
    backend: Literal[BACKENDS]
    tensorrt: JsonObject | None = None
    vision: JsonObject | None = None
    weights: _WeightsDoc | None = None  # absent: the weights as exported (fp32)
    validation: _ValidationDoc | None = None
    files: Annotated[dict[RelPath, _FileDoc], Field(min_length=1, max_length=MAX_FILES)]

    @model_validator(mode="after")
    def _consistent(self):
        if len(self.layer_keep_fractions) != self.layers:
            _fail(f"expected {self.layers} values (one per layer), got {len(self.layer_keep_fractions)}",
                  ("layer_keep_fractions",))
        if self.model.fingerprint.layers != self.layers:
            _fail(f"says {self.model.fingerprint.layers} layers but the engine has {self.layers}",
                  ("model", "fingerprint", "layers"))
        for graph in ENGINE_GRAPHS[self.backend]:
            if graph not in self.graphs:
                _fail(f"has no {graph!r} graph", ("graphs",))
        for name, graph in self.graphs.items():
            for key in ("file", "data"):
                path = getattr(graph, key)
                if path is not None and path not in self.files:
                    _fail(f"{path} is not in the hashed files", ("graphs", name, key))
        for name in (*(f"{g}.onnx" for g in ENGINE_GRAPHS[self.backend]), "profile.json", "tokenizer.json"):
            if name not in self.files:
                _fail(f"does not list {name}", ("files",))
        return self


def _manifest_error(err: ValidationError, path: Path) -> str:
    e = err.errors(include_url=False)[0]
    loc = tuple(e["loc"])
    if len(loc) >= 2 and loc[-1] == "[key]":
        loc = loc[:-1]
    ctx = e.get("ctx") or {}
    if e["type"] == "prefixkv":
        loc, message = loc + tuple(ctx.get("path", ())), str(ctx.get("message", e["msg"]))
    elif e["type"] == "missing":
        message = "is missing"
    elif e["type"] == "extra_forbidden":
        message = "is not a field of the engine manifest"
    else:
        text = re.sub(r" or instance of _?\w+", "", e["msg"])
        message = f"{text[:1].lower()}{text[1:]}, got {_show(e.get('input'))}"
    where = _path(loc).replace("schema_", "schema")
    return _one_line(f"{path}: {where}: {message}" if where else f"{path}: {message}")[:600]


def check_manifest(manifest, path: str | Path) -> dict:
    """``manifest`` (the parsed JSON of ``path``) against the declared schema; returns it.
    Raises ``EngineError``, one line naming the file and the field."""
    try:
        _ManifestDoc.model_validate(manifest)
    except ValidationError as err:
        raise EngineError(f"{_manifest_error(err, Path(path))}; rebuild the engine with `prefixkv build --force`") from None
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
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise EngineError(f"{path} is larger than {MAX_MANIFEST_BYTES >> 20} MiB: not a manifest prefixkv wrote; "
                          "rebuild the engine with `prefixkv build --force`")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as err:  # bad JSON or UTF-8, a key given twice, nesting too deep
        reason = _one_line(str(err))[:200] if not isinstance(err, RecursionError) else "nested too deep"
        raise EngineError(f"{path} is not a valid manifest ({reason}); rebuild the engine with `prefixkv build --force`") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise EngineError(f"{path} is not a prefixkv engine manifest; rebuild the engine with `prefixkv build --force`")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise EngineError(
            f"{folder} has engine schema version {manifest.get('schema_version')!r}; this prefixkv reads "
            f"version {SCHEMA_VERSION}: rebuild the engine with this version (`prefixkv build --force`)"
        )
    check_manifest(manifest, path)
    files = manifest["files"]
    root = folder.resolve()
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*")
               if (p.is_file() or p.is_symlink()) and p.relative_to(folder).as_posix() not in (MANIFEST, VALIDATION)}
    unlisted = sorted(on_disk - set(files))
    if unlisted:
        raise EngineError(f"{folder / unlisted[0]} is not in the manifest's hashed files (added or dropped after the build); "
                          f"rebuild the engine with `prefixkv build --force --output {folder}`")
    for name, entry in files.items():
        file = folder / name
        if file.is_symlink() or not file.resolve().is_relative_to(root):
            raise EngineError(f"{file} is a link or leads outside the engine folder; rebuild the engine with `prefixkv build --force`")
        if not file.is_file():
            raise EngineError(f"{file} is missing from the engine; rebuild it with `prefixkv build --force --output {folder}`")
        if file.stat().st_size != entry["bytes"]:
            raise EngineError(f"{file} was modified after the build (size differs from the manifest); rebuild the engine with `prefixkv build --force`")
        if verify and sha256(file) != entry["sha256"]:
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
