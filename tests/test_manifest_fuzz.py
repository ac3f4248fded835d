"""Fuzzing the engine manifest's reader with hypothesis.

Properties, each over at least 1000 generated cases:
  (a) nothing but ``EngineError`` escapes ``check_manifest`` / ``read_manifest``, and its message is
      one line that starts with the manifest's path;
  (b) a mutation the rules below allow is accepted and one they forbid is refused; the rules are
      written out here from the documented format, not taken from the parser;
  (c) on disk: a file dropped from the hashed set, added to the folder, or changed is caught.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefixkv.engine_folder import MANIFEST, SCHEMA_VERSION, EngineError, check_manifest, read_manifest

FUZZ = settings(max_examples=1000, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
STATS: dict[str, Counter] = {}
PATH = Path("/engines/e/manifest.json")
LAYERS = 3


def count(prop: str, outcome: str) -> None:
    STATS.setdefault(prop, Counter())[outcome] += 1
    STATS[prop]["cases"] += 1


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


CONTENTS = {"decoder.onnx": b"p", "decoder.onnx.data": b"pd" * 8, "compact.onnx": b"d", "compact.onnx.data": b"dd" * 8,
            "profile.json": b"{}", "tokenizer.json": b"{}", "report/keep.png": b"png"}


def valid_manifest() -> dict:
    """A manifest as ``build`` writes it (the graphs' I/O lists shortened)."""
    io = {"inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}],
          "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 256]}], "opset": 18}
    return {
        "schema": "prefixkv.engine", "schema_version": SCHEMA_VERSION, "created": "2026-12-02T00:00:00Z",
        "tool": {"name": "prefixkv", "version": "0.1.0"}, "libraries": {"torch": "2.13.0+cpu"},
        "model": {"source": "tiny", "folder": "/models/tiny",
                  "fingerprint": {"architecture": "LlamaForCausalLM", "layers": LAYERS, "heads": 4, "kv_heads": 2,
                                  "head_dim": 16, "config_hash": "abc"}},
        "keep_fraction": 0.4, "layer_keep_fractions": [0.5, 0.3, 0.4], "layers": LAYERS, "heads": 4, "kv_heads": 2,
        "head_dim": 16, "vocab": 256, "dtype": "float32", "sink": 1, "protect_last": True,
        "scorer": {"name": "accumulated", "params": {}}, "evict_distance": 25, "opset": 18,
        "exporter": "0.1.0+abc", "max_context": 2048,
        "graphs": {"decoder": {"file": "decoder.onnx", "data": "decoder.onnx.data", **io},
                   "compact": {"file": "compact.onnx", "data": "compact.onnx.data", **io}},
        "backend": "onnxruntime", "tensorrt": None,
        "validation": {"passed": True, "checks": {"graph": "pass", "quality": "reported"}, "report": "validation.json"},
        "files": {name: {"bytes": len(data), "sha256": digest(data)} for name, data in CONTENTS.items()},
    }


# -- the rules, written out from the documented format ----------------------------------------------
def is_int(v) -> bool:
    return type(v) is int


def is_number(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def int_in(lo, hi):
    return lambda v: is_int(v) and lo <= v <= hi


def text(most=256, least=1):
    return lambda v: type(v) is str and least <= len(v) <= most and not re.search(r"[\ud800-\udfff]", v)


def relative_path(v) -> bool:
    return (type(v) is str and 1 <= len(v) <= 1024 and not v.startswith("/") and "\\" not in v
            and not (len(v) > 1 and v[1] == ":") and all(part not in ("", ".", "..") for part in v.split("/"))
            and v != MANIFEST)


RULES = {  # field path -> is the value allowed there (types exact: no bool for int, no str for number)
    ("keep_fraction",): lambda v: is_number(v) and 0 < v <= 1,
    ("sink",): int_in(0, 1_000_000),
    ("protect_last",): lambda v: type(v) is bool,
    ("dtype",): lambda v: v in ("float32", "float16", "bfloat16") and type(v) is str,
    ("backend",): lambda v: v == "onnxruntime" and type(v) is str,  # "tensorrt" needs the plugin graphs, not these
    ("evict_distance",): int_in(1, 1 << 30),
    ("max_context",): int_in(1, 1 << 30),
    ("opset",): int_in(1, 1000),
    ("heads",): int_in(1, 1_000_000),
    ("vocab",): int_in(1, 1_000_000),
    ("exporter",): text(4096, 0),
    ("scorer", "name"): text(),
    ("model", "source"): text(4096, 0),
    ("layer_keep_fractions", 1): lambda v: is_number(v) and 0 <= v <= 1,
    ("files", "report/keep.png", "bytes"): lambda v: is_int(v) and 0 <= v <= 1 << 50,
    ("files", "report/keep.png", "sha256"): lambda v: type(v) is str and re.fullmatch(r"[0-9a-f]{64}", v) is not None,
    ("graphs", "decoder", "opset"): lambda v: v is None or (is_int(v) and 1 <= v <= 1000),
    ("validation", "passed"): lambda v: type(v) is bool,
    ("validation", "checks", "graph"): lambda v: v in ("pass", "FAIL", "reported") and type(v) is str,
    ("tensorrt",): lambda v: v is None or (type(v) is dict and all(type(k) is str for k in v) and json_plain(v)),
    ("layers",): lambda v: is_int(v) and v == LAYERS,  # must agree with the fractions and the fingerprint
    ("graphs", "compact", "data"): lambda v: v is None or (type(v) is str and v in CONTENTS),  # a hashed file, or no data file
}
REQUIRED = ["schema", "schema_version", "created", "tool", "model", "keep_fraction", "layer_keep_fractions", "layers",
            "heads", "kv_heads", "head_dim", "vocab", "dtype", "sink", "protect_last", "scorer", "evict_distance",
            "opset", "exporter", "max_context", "graphs", "backend", "files"]
OPTIONAL = ["libraries", "tensorrt", "vision", "validation"]
NEEDED_FILES = {"decoder.onnx", "decoder.onnx.data", "compact.onnx", "compact.onnx.data", "profile.json", "tokenizer.json"}


def json_plain(v, depth=0) -> bool:
    if depth > 16:
        return False
    if v is None or type(v) is bool:
        return True
    if type(v) is int:  # the format's free-form objects hold 64-bit integers
        return -(2 ** 63) <= v < 2 ** 63
    if type(v) is str:
        return not re.search(r"[\ud800-\udfff]", v)
    if type(v) is float:
        return math.isfinite(v)
    if type(v) is list:
        return all(json_plain(x, depth + 1) for x in v)
    if type(v) is dict:
        return all(type(k) is str and json_plain(x, depth + 1) for k, x in v.items())
    return False


def at(doc, path):
    for part in path:
        doc = doc[part]
    return doc


def put(doc, path, value):
    at(doc, path[:-1])[path[-1]] = value


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8) | st.sampled_from(["float32", "tensorrt", "pass", "FAIL", "a" * 64, "0" * 64, "decoder.onnx"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6)
paths = st.one_of(st.text(max_size=12), st.sampled_from(
    ["/etc/passwd", "../x", "a/../b", "a//b", "./a", "a\\b", "C:x", "ok/name.bin", "x", "manifest.json", "report"]))


@st.composite
def mutations(draw):
    doc = valid_manifest()
    kind = draw(st.sampled_from(["set", "set", "set", "drop", "extra", "rename_file", "drop_file", "add_file"]))
    if kind == "set":
        path = draw(st.sampled_from(sorted(RULES, key=str)))
        value = draw(json_values | st.sampled_from([0, 1, 3, 0.5, 1.0, 25, 2048, True, False, None, "x"]))
        put(doc, path, value)
        return doc, RULES[path](value), f"set {path}"
    if kind == "drop":
        key = draw(st.sampled_from(REQUIRED + OPTIONAL))
        doc.pop(key, None)
        return doc, key in OPTIONAL, f"drop {key}"
    if kind == "extra":
        key = draw(st.text(max_size=10))
        value = draw(json_values)
        known = key in REQUIRED + OPTIONAL  # then a known field got any value: not judged here
        doc[key] = value
        return doc, None if known else False, f"extra {key!r}"
    names = sorted(doc["files"])
    if kind == "rename_file":
        old = draw(st.sampled_from(names))
        new = draw(paths)
        entry = doc["files"].pop(old)
        doc["files"][new] = entry
        ok = relative_path(new) and (old not in NEEDED_FILES or new == old)
        return doc, ok, f"rename {old} -> {new!r}"
    if kind == "drop_file":
        old = draw(st.sampled_from(names))
        del doc["files"][old]
        return doc, old not in NEEDED_FILES, f"drop file {old}"
    new = draw(paths)
    doc["files"][new] = {"bytes": 1, "sha256": "0" * 64}
    return doc, relative_path(new), f"add file {new!r}"


def check_refusal(err: EngineError) -> None:
    message = str(err)
    assert "\n" not in message and message.startswith(str(PATH)), message


@FUZZ
@given(case=mutations())
def test_mutated_manifests(case):
    doc, allowed, what = case
    doc = json.loads(json.dumps(doc))  # what a file holds (NaN and Infinity as json writes them)
    try:
        check_manifest(doc, PATH)
    except EngineError as err:
        check_refusal(err)
        count("mutated", "refused")
        assert allowed is not True, f"{what}: refused a valid manifest: {err}"
        return
    count("mutated", "accepted")
    assert allowed is not False, f"{what}: accepted an invalid manifest"


@FUZZ
@given(value=json_values)
def test_any_json_document(value):
    """Any JSON value at all, as the whole manifest or in place of one of its objects."""
    for doc in (value, {**valid_manifest(), "graphs": value}, {**valid_manifest(), "model": value},
                {**valid_manifest(), "files": value}):
        try:
            check_manifest(doc, PATH)
            count("any", "accepted")
        except EngineError as err:
            check_refusal(err)
            count("any", "refused")


def write_engine(folder: Path, doc: dict) -> None:
    for name, data in CONTENTS.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    (folder / MANIFEST).write_text(json.dumps(doc))


@FUZZ
@given(action=st.sampled_from(["unhash", "add", "change", "none"]), name=st.sampled_from(sorted(CONTENTS)),
       extra=st.text("abc.", min_size=1, max_size=6))
def test_the_folder_matches_its_hashed_files(action, name, extra):
    """Every file in the folder is hashed, the data files included: a file dropped from the set
    (then free to tamper with), a file added, or a byte changed is refused; an untouched folder
    is accepted.  (The profile's own check is not under test: the stub profile.json passes it.)"""
    from prefixkv import engine_folder

    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine_folder, "_check_profile", lambda folder, manifest: None)
        folder = Path(tmp) / "e"
        folder.mkdir()
        doc = valid_manifest()
        write_engine(folder, doc)
        if action == "unhash":
            doc["files"].pop(name)
            (folder / MANIFEST).write_text(json.dumps(doc))
        elif action == "add":
            (folder / f"{extra}.x").write_bytes(b"x")
        elif action == "change":
            (folder / name).write_bytes(CONTENTS[name][::-1] + b"!")
        try:
            read_manifest(folder, verify=True)
            outcome = "accepted"
        except EngineError as err:
            assert "\n" not in str(err)
            outcome = "refused"
        count("folder", outcome)
        assert outcome == ("accepted" if action == "none" else "refused"), (action, name, extra)


def test_duplicate_keys_and_huge_files_are_refused(tmp_path):
    """JSON lets a key repeat (the later one would win unseen): refused, as is a manifest too big
    to be one prefixkv wrote."""
    folder = tmp_path / "e"
    folder.mkdir()
    write_engine(folder, valid_manifest())
    text = json.dumps(valid_manifest())
    (folder / MANIFEST).write_text(text[:-1] + ', "sink": 4}')
    with pytest.raises(EngineError, match="not a valid manifest \\(the key 'sink' is given twice\\)"):
        read_manifest(folder)
    (folder / MANIFEST).write_bytes(b" " * (17 << 20))
    with pytest.raises(EngineError, match="larger than 16 MiB"):
        read_manifest(folder)
    (folder / MANIFEST).write_bytes(b"[" * 100_000)
    with pytest.raises(EngineError, match="not a valid manifest"):
        read_manifest(folder)


def test_every_property_ran_enough_cases():
    for prop in ("mutated", "any", "folder"):
        assert STATS.get(prop, Counter())["cases"] >= 1000, (prop, STATS.get(prop))
    assert STATS["mutated"]["accepted"] > 50 and STATS["mutated"]["refused"] > 300, STATS["mutated"]
