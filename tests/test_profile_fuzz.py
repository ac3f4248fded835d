"""Fuzzing the retention profile's reader and constructors with hypothesis.

Properties, each over at least 1000 generated cases:
  (a) nothing but ``ProfileError`` escapes ``load`` / ``from_dict`` / the constructors, and its
      message is one line that starts with the file (the source);
  (b) whatever is accepted keeps the profile's rules -- checked here by a reference checker
      written from the rules (``reference_problem``), not by the parser -- and whatever is
      refused breaks one of them;
  (c) save -> load gives back exactly the profile that was saved.
"""
from __future__ import annotations

import copy
import json
import math
import re
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from prefixkv import profile as prof
from prefixkv.profile import (
    SCHEMA,
    SCHEMA_VERSION,
    Fingerprint,
    LayerKeep,
    ProfileError,
    RetentionProfile,
)

FUZZ = settings(max_examples=1000, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much, HealthCheck.large_base_example])
STATS: dict[str, Counter] = {}


def count(prop: str, outcome: str) -> None:
    STATS.setdefault(prop, Counter())[outcome] += 1
    STATS[prop]["cases"] += 1


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


# -- the rules, written out independently of prefixkv.profile ---------------------------------
class Pairs(list):
    """A JSON object as its (key, value) pairs in order: duplicate keys allowed."""


# the documented bounds, written out here so that the reference does not follow a changed constant
MAX_LAYERS, MAX_DIM, MAX_SINK, MAX_BUDGETS = 10_000, 1_000_000, 1_000_000, 1_000
MAX_NAME, MAX_KEY, MAX_TEXT = 256, 64, 10_000
MAX_DEPTH, MAX_ITEMS, MAX_NODES = 16, 10_000, 100_000
TOP = {"schema", "schema_version", "model", "sink", "protect_last", "evict_distance", "scorer", "allocation", "budgets",
       "calibration"}
REQUIRED = {"schema", "schema_version", "model", "sink", "budgets"}
MODEL = {"architecture", "layers", "heads", "kv_heads", "head_dim", "config_hash"}
KEY = re.compile(r"(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")


def has_duplicate_keys(v) -> bool:
    if isinstance(v, Pairs):
        keys = [k for k, _ in v]
        return len(set(keys)) != len(keys) or any(has_duplicate_keys(x) for _, x in v)
    if isinstance(v, dict):
        return any(has_duplicate_keys(x) for x in v.values())
    if isinstance(v, list):
        return any(has_duplicate_keys(x) for x in v)
    return False


def plain(v):
    if isinstance(v, Pairs):
        return {k: plain(x) for k, x in v}
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [plain(x) for x in v]
    return v


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def as_float(v):
    """The finite float a JSON number stands for, or None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def text_ok(s, most) -> bool:
    return isinstance(s, str) and len(s) <= most and not any(0xD800 <= ord(c) <= 0xDFFF for c in s)


def name_ok(s) -> bool:
    return text_ok(s, MAX_NAME) and len(s) >= 1


def json_ok(v, depth=0, nodes=None) -> bool:
    """Free-form metadata: plain JSON, finite numbers, 64-bit integers, bounded sizes."""
    nodes = nodes if nodes is not None else [0]
    nodes[0] += 1
    if nodes[0] > MAX_NODES:
        return False
    if isinstance(v, dict):
        return (depth <= MAX_DEPTH and len(v) <= MAX_ITEMS
                and all(text_ok(k, MAX_NAME) for k in v)
                and all(json_ok(x, depth + 1, nodes) for x in v.values()))
    if isinstance(v, list):
        return depth <= MAX_DEPTH and len(v) <= MAX_ITEMS and all(json_ok(x, depth + 1, nodes) for x in v)
    if isinstance(v, str):
        return text_ok(v, MAX_TEXT)
    if v is None or isinstance(v, bool):
        return True
    if isinstance(v, int):
        return -2**63 <= v <= 2**63 - 1
    if isinstance(v, float):
        return math.isfinite(v)
    return False


def reference_problem(doc, allow_empty: bool = False) -> str | None:
    """Why ``doc`` (the JSON a file holds) is not a valid profile, or None when it is."""
    if has_duplicate_keys(doc):
        return "duplicate key"
    d = plain(doc)
    if not isinstance(d, dict):
        return "top level is not an object"
    if any(not isinstance(k, str) for k in d) or set(d) - TOP:
        return "unknown top-level key"
    if REQUIRED - set(d):
        return f"missing {sorted(REQUIRED - set(d))}"
    if not isinstance(d["schema"], str) or d["schema"] != SCHEMA:
        return "schema"
    if not is_int(d["schema_version"]) or d["schema_version"] != SCHEMA_VERSION:
        return "schema_version"
    m = d["model"]
    if not isinstance(m, dict) or set(m) != MODEL:
        return "model keys"
    if not (name_ok(m["architecture"]) and name_ok(m["config_hash"])):
        return "model names"
    if not (is_int(m["layers"]) and 1 <= m["layers"] <= MAX_LAYERS):
        return "model.layers"
    if not all(is_int(m[k]) and 1 <= m[k] <= MAX_DIM for k in ("heads", "kv_heads", "head_dim")):
        return "model dims"
    if not (is_int(d["sink"]) and 0 <= d["sink"] <= MAX_SINK):
        return "sink"
    if "protect_last" in d and not isinstance(d["protect_last"], bool):
        return "protect_last"
    if "evict_distance" in d and not (is_int(d["evict_distance"]) and 1 <= d["evict_distance"] <= 1 << 30):
        return "evict_distance"
    if "scorer" in d:
        s = d["scorer"]
        if not isinstance(s, dict) or set(s) - {"name", "params"}:
            return "scorer keys"
        if "name" in s and not name_ok(s["name"]):
            return "scorer.name"
        if "params" in s and not (isinstance(s["params"], dict) and json_ok(s["params"])):
            return "scorer.params"
    if "allocation" in d:
        a = d["allocation"]
        if not isinstance(a, dict) or set(a) - {"min_layer_keep", "blend"}:
            return "allocation keys"
        for k, v in a.items():
            f = as_float(v)
            if f is None or not 0 <= f <= 1:
                return f"allocation.{k}"
    if "calibration" in d and not (isinstance(d["calibration"], dict) and json_ok(d["calibration"])):
        return "calibration"
    b = d["budgets"]
    if not isinstance(b, dict) or len(b) > MAX_BUDGETS or (not b and not allow_empty):
        return "budgets"
    layers, values = m["layers"], []
    for key, entry in b.items():
        if not isinstance(key, str) or len(key) > MAX_KEY or not KEY.fullmatch(key):
            return f"budget key {key!r}"
        kf = float(key)
        if not 0 < kf <= 1:
            return f"budget key {key!r} out of range"
        values.append(kf)
        if not isinstance(entry, dict) or set(entry) - {"layer_keep_fractions", "layer_keep_std"}:
            return "budget entry keys"
        fr = entry.get("layer_keep_fractions")
        if not isinstance(fr, list) or len(fr) != layers:
            return "layer_keep_fractions length"
        if any(as_float(x) is None or not 0 < as_float(x) <= 1 for x in fr):
            return "layer_keep_fractions value"
        if "layer_keep_std" in entry:
            sd = entry["layer_keep_std"]
            if not isinstance(sd, list) or len(sd) != layers or any(as_float(x) is None or as_float(x) < 0 for x in sd):
                return "layer_keep_std"
    values.sort()
    if any(b2 - b1 <= 1e-9 for b1, b2 in zip(values, values[1:])):
        return "keep fractions not distinct"
    return None


def check_invariants(p: RetentionProfile) -> None:
    """The rules, on an accepted profile object."""
    fp = p.fingerprint
    assert type(fp) is Fingerprint
    assert type(fp.architecture) is str and name_ok(fp.architecture) and name_ok(fp.config_hash)
    assert type(fp.layers) is int and 1 <= fp.layers <= MAX_LAYERS
    assert all(type(x) is int and 1 <= x <= MAX_DIM for x in (fp.heads, fp.kv_heads, fp.head_dim))
    assert type(p.sink) is int and 0 <= p.sink <= MAX_SINK
    assert type(p.protect_last) is bool
    for x in (p.min_layer_keep, p.blend):
        assert type(x) is float and math.isfinite(x) and 0 <= x <= 1
    assert type(p.scorer) is str and name_ok(p.scorer)
    assert isinstance(p.scorer_params, dict) and json_ok(p.scorer_params)
    assert isinstance(p.calibration, dict) and json_ok(p.calibration)
    keys = sorted(p.calibrated)
    assert all(type(k) is float and math.isfinite(k) and 0 < k <= 1 for k in keys)
    assert all(b - a > 1e-9 for a, b in zip(keys, keys[1:]))
    for b in p.calibrated.values():
        assert type(b) is LayerKeep
        assert type(b.layer_keep_fractions) is list and len(b.layer_keep_fractions) == fp.layers
        assert type(b.layer_keep_std) is list and len(b.layer_keep_std) == fp.layers
        assert all(type(f) is float and math.isfinite(f) and 0 < f <= 1 for f in b.layer_keep_fractions)
        assert all(type(s) is float and math.isfinite(s) and s >= 0 for s in b.layer_keep_std)


def matches_doc(p: RetentionProfile, d: dict) -> None:
    """An accepted profile holds what the file said (defaults where it said nothing)."""
    assert p.fingerprint == Fingerprint(**d["model"])
    assert p.sink == d["sink"] and p.protect_last == d.get("protect_last", True)
    assert p.evict_distance == d.get("evict_distance", 25)
    scorer, alloc = d.get("scorer", {}), d.get("allocation", {})
    assert (p.scorer, p.scorer_params) == (scorer.get("name", "accumulated"), scorer.get("params", {}))
    assert (p.min_layer_keep, p.blend) == (alloc.get("min_layer_keep", 0.0), alloc.get("blend", 1.0))
    assert p.calibration == d.get("calibration", {})
    want = {float(k): e for k, e in d["budgets"].items()}
    assert set(p.calibrated) == set(want)
    for kf, e in want.items():
        assert p.calibrated[kf].layer_keep_fractions == [float(x) for x in e["layer_keep_fractions"]]
        assert p.calibrated[kf].layer_keep_std == [float(x) for x in e.get("layer_keep_std", [0.0] * d["model"]["layers"])]


def check_refusal(err: ProfileError, source: str) -> None:
    message = str(err)
    assert type(err) is ProfileError
    assert len(message.splitlines()) == 1, message
    assert message.startswith(f"{source}: "), message
    assert prof._INTERNAL not in message, message


# -- generators -------------------------------------------------------------------------------
def dumps(v) -> str:
    """JSON text; a Pairs object keeps its duplicate keys, NaN / Infinity are written as Python does."""
    if isinstance(v, Pairs):
        return "{" + ", ".join(f"{json.dumps(k)}: {dumps(x)}" for k, x in v) + "}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {dumps(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(dumps(x) for x in v) + "]"
    return json.dumps(v)


unit_floats = st.floats(min_value=0, max_value=1, exclude_min=True)
fraction_values = st.one_of(unit_floats, st.sampled_from([1.0, 1, 0.2, 0.2000001, 0.123456789, 5e-324, 1e-9, 0.5]))
json_leaves = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63 - 1),
                        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
json_values = st.recursive(json_leaves, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                           max_leaves=12)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=4)
names = st.text(min_size=1, max_size=24)


def distinct(kfs):
    kept = []
    for k in sorted(set(kfs)):
        if not kept or k - kept[-1] > 1e-9:
            kept.append(k)
    return kept


@st.composite
def valid_docs(draw):
    layers = draw(st.integers(1, 5))
    kfs = distinct(draw(st.lists(fraction_values.map(float), min_size=1, max_size=4)))
    budgets = {}
    for kf in kfs:
        entry = {"layer_keep_fractions": draw(st.lists(fraction_values, min_size=layers, max_size=layers))}
        if draw(st.booleans()):
            entry["layer_keep_std"] = draw(st.lists(st.one_of(st.floats(0, 1), st.just(0)), min_size=layers, max_size=layers))
        budgets[repr(kf)] = entry
    doc = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "model": {"architecture": draw(names), "layers": layers, "heads": draw(st.integers(1, 64)),
                  "kv_heads": draw(st.integers(1, 64)), "head_dim": draw(st.integers(1, 256)), "config_hash": draw(names)},
        "sink": draw(st.one_of(st.integers(0, 64), st.sampled_from([0, MAX_SINK]))),
        "budgets": budgets,
    }
    if draw(st.booleans()):
        doc["protect_last"] = draw(st.booleans())
    if draw(st.booleans()):
        doc["evict_distance"] = draw(st.one_of(st.integers(1, 64), st.sampled_from([1, 25, 1 << 30])))
    if draw(st.booleans()):
        doc["scorer"] = draw(st.fixed_dictionaries({}, optional={"name": names, "params": json_objects}))
    if draw(st.booleans()):
        doc["allocation"] = draw(st.fixed_dictionaries({}, optional={"min_layer_keep": st.floats(0, 1), "blend": st.floats(0, 1)}))
    if draw(st.booleans()):
        doc["calibration"] = draw(json_objects)
    return doc


SPECIAL = [None, True, False, 0, 1, -1, 2, 3, 1_000_000, 1_000_001, 2**31, 2**63 - 1, 2**63, 2**64, -2**63 - 1, 10**30,
           10**400, 0.0, -0.0, 1.0, 0.5, 1.5, -0.5, 1e-9, 5e-324, 1e308, math.nan, math.inf, -math.inf,
           "", "false", "true", "0", "1", "0.2", "nan", "x" * 257, "y" * 10_001, "\ud800", "é", "[]", [], {}, [1],
           [0.5, 0.5, 0.5], [1, 1, 1, 1, 1], {"a": 1}, SCHEMA, "accumulated", {"name": "x"}, {"blend": 2}]


def nested(depth: int):
    v = 1
    for i in range(depth):
        v = [v] if i % 2 else {"k": v}
    return v


# numbers at the edges of every range a profile has
EDGES = [math.nan, math.inf, -math.inf, -0.0, 0.0, 1.0, 1, 0, -1, True, False, math.nextafter(1.0, 2), math.nextafter(1.0, 0),
         math.nextafter(0.0, 1), -5e-324, 1e308, 0.5 + 1e-10, 0.5 - 9e-10, 0.5 + 1.1e-9, 0.5 + 2e-9, math.nextafter(0.5, 1),
         MAX_SINK, MAX_SINK + 1, MAX_LAYERS, MAX_LAYERS + 1, MAX_DIM, MAX_DIM + 1, 2**63, -2**63 - 1, "y" * MAX_TEXT,
         "x" * MAX_NAME, "x" * (MAX_NAME + 1)]
weird_values = st.one_of(st.sampled_from(EDGES), st.sampled_from(EDGES), st.sampled_from(SPECIAL), json_values,
                         st.integers(10, 40).map(nested), st.floats(), st.integers(), st.text(max_size=20))


def spellings(kf: float):
    return st.one_of(st.sampled_from(key_forms(kf)), st.text(max_size=8))


def key_forms(kf: float) -> list[str]:
    r = repr(kf)
    near = [repr(x) for x in (kf + 1e-10, kf - 9e-10, kf + 1.1e-9, kf - 2e-9, math.nextafter(kf, 2), kf + 1e-7)]
    forms = near + [r, f"{kf:g}", f"{kf:.17g}", f"{kf:.20f}", f"{kf:e}", f"{kf:E}", f" {r}", f"{r} ", f"+{r}", f"-{r}",
             f"{r}0", f"0{r}", r.replace(".", ","), f"{r}\n", "nan", "NaN", "inf", "Infinity", "1e400", "1e-400", "0x1p-2",
             "１", "0.５", "1_0", "0_5", "", ".5", "5.", "0." + "0" * 80 + "1", "1.0", "1", "1e0", "10e-1", "0.10", "1E-1"]
    return forms


KEY_FORMS = sorted({f for kf in (0.2, 0.5, 1.0, 5e-324) for f in key_forms(kf)})


def paths(doc, here=()):
    yield here
    if isinstance(doc, dict) and not isinstance(doc, Pairs):
        for k, v in doc.items():
            yield from paths(v, (*here, k))
    elif isinstance(doc, list) and not isinstance(doc, Pairs):
        for i, v in enumerate(doc):
            yield from paths(v, (*here, i))


def at(doc, path):
    for p in path:
        doc = doc[p]
    return doc


@st.composite
def mutation(draw, doc):
    doc = copy.deepcopy(doc)
    op = draw(st.sampled_from(["edge", "edge", "edge", "replace", "replace", "delete", "insert", "budget_key", "budget_key",
                               "duplicate_key"]))
    budgets = doc.get("budgets") if isinstance(doc, dict) else None
    if op == "budget_key" and isinstance(budgets, dict) and budgets and not isinstance(budgets, Pairs):
        key = draw(st.sampled_from(sorted(budgets)))
        try:
            kf = float(key)
        except ValueError:
            kf = 0.5
        new = draw(spellings(kf if math.isfinite(kf) else 0.5))
        entry = budgets[key] if draw(st.booleans()) else copy.deepcopy(budgets[key])
        if draw(st.booleans()):
            del budgets[key]  # rename, else an alias beside it
        budgets[new] = entry
        return doc
    every = list(paths(doc))
    leaves = [p for p in every if p and not isinstance(at(doc, p), (dict, list))]
    if op == "edge" and leaves:  # a number or string at a range's edge, in place of a leaf
        path = draw(st.sampled_from(leaves))
        at(doc, path[:-1])[path[-1]] = draw(st.sampled_from(EDGES))
        return doc
    path = draw(st.sampled_from(every))
    if op in ("replace", "edge") or (op == "delete" and not path):
        value = draw(weird_values)
        if not path:
            return value
        at(doc, path[:-1])[path[-1]] = value
        return doc
    if op == "delete":
        del at(doc, path[:-1])[path[-1]]
        return doc
    target = at(doc, path)
    if op == "insert" and isinstance(target, list) and not isinstance(target, Pairs):
        target.insert(draw(st.integers(0, len(target))), draw(weird_values))
    elif op == "insert" and isinstance(target, dict):
        key = draw(st.one_of(st.sampled_from(sorted(TOP | MODEL) + ["extra", "name", "params", "blend", "layer_keep_std"]),
                             st.text(max_size=8)))
        target[key] = draw(weird_values)
    elif op == "duplicate_key" and isinstance(target, dict) and target:
        items = list(target.items())
        k = draw(st.sampled_from([k for k, _ in items]))
        pairs = Pairs(items)
        pairs.insert(draw(st.integers(0, len(pairs))), (k, draw(st.one_of(st.just(target[k]), weird_values))))
        if not path:
            return pairs
        at(doc, path[:-1])[path[-1]] = pairs
    return doc


@st.composite
def mutated_docs(draw):
    doc = draw(valid_docs())
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):
        doc = draw(mutation(doc))
    return doc


# -- (a) + (b): mutated profile files ---------------------------------------------------------
@FUZZ
@given(doc=mutated_docs())
def test_mutated_profiles(folder, doc):
    path = folder / "mutated.json"
    path.write_bytes(dumps(doc).encode("ascii"))
    problem = reference_problem(doc)
    try:
        loaded = RetentionProfile.load(path)
    except ProfileError as err:
        check_refusal(err, str(path))
        count("mutated", "refused")
        assert problem is not None, f"a valid profile was refused: {err}"
        return
    count("mutated", "accepted")
    assert problem is None, f"an invalid profile was accepted ({problem})"
    check_invariants(loaded)
    matches_doc(loaded, plain(doc))


# -- (a) + (b): raw bytes ---------------------------------------------------------------------
SPECIAL_BYTES = [b"", b"\xff\xfe", b"\xef\xbb\xbf{}", b"\x00", b"NaN", b"1e400", b"-Infinity", b"1" * 5000, b"[" * 100_000,
                 b'{"a":' * 20_000, b"{}", b"[]", b"null", b"true", b'"schema"', b'{"schema": "prefixkv.retention-profile"}',
                 b'{"schema": "\\ud800"}', b"\x80abc", b"\xed\xa0\x80", "é".encode("latin-1")]


@st.composite
def corrupted(draw):
    raw = bytearray(dumps(draw(valid_docs())).encode("ascii"))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        i = draw(st.integers(0, max(len(raw) - 1, 0)))
        if op == "flip" and raw:
            raw[i] = draw(st.integers(0, 255))
        elif op == "cut":
            del raw[i:]
        elif op == "insert":
            raw[i:i] = draw(st.sampled_from([b"0", b"-", b"e9", b",", b"}", b"]", b"\\", b'"', b"\xff", b"\xc3", b"9" * 30]))
        elif raw:
            del raw[i]
    return bytes(raw)


raw_inputs = st.one_of(st.binary(max_size=300), st.text(max_size=80).map(lambda s: s.encode("utf-8")),
                       st.sampled_from(SPECIAL_BYTES), corrupted(), corrupted())


@FUZZ
@given(raw=raw_inputs)
def test_random_bytes(folder, raw):
    path = folder / "raw.json"
    path.write_bytes(raw)
    try:
        loaded = RetentionProfile.load(path)
    except ProfileError as err:
        check_refusal(err, str(path))
        count("bytes", "refused")
        return
    count("bytes", "accepted")
    doc = json.loads(raw.decode("utf-8"), object_pairs_hook=Pairs)  # it was accepted: it must be UTF-8 JSON
    problem = reference_problem(doc)
    assert problem is None, f"invalid bytes were accepted ({problem})"
    check_invariants(loaded)
    matches_doc(loaded, plain(doc))


# -- (a) + (b): from_dict and the constructors with any Python value ----------------------------
class Thing:
    pass


def cyclic():
    d = {"a": [1]}
    d["a"].append(d)
    return d


python_values = st.one_of(weird_values, st.lists(st.sampled_from(EDGES), min_size=1, max_size=4), st.sampled_from([(0.5,), {0.5}, b"0.5", Thing(), 10**5000, -10**5000, 1j, range(3),
                                                         (1, 1, 1), [0.5, 0.5, 0.5], {1: 2}, {None: 1}]),
                          st.builds(cyclic))


@FUZZ
@given(doc=valid_docs(), where=st.integers(0, 10_000), value=python_values, whole=st.booleans())
def test_from_dict_any_python_value(doc, where, value, whole):
    if whole:
        doc = value
    else:
        path = list(paths(doc))[where % len(list(paths(doc)))]
        if path:
            at(doc, path[:-1])[path[-1]] = value
        else:
            doc = value
    try:
        loaded = RetentionProfile.from_dict(doc, "in-memory")
    except ProfileError as err:
        check_refusal(err, "in-memory")
        count("from_dict", "refused")
        return
    count("from_dict", "accepted")
    assert reference_problem(doc) is None, "an invalid dict was accepted"
    check_invariants(loaded)


FIELDS = ["fingerprint", "sink", "calibrated", "scorer", "scorer_params", "min_layer_keep", "blend", "protect_last", "calibration",
          "evict_distance"]


@FUZZ
@given(field=st.sampled_from(FIELDS + ["fractions", "std", "key", "second_key"]), value=python_values, layers=st.integers(1, 4))
def test_constructors_hold_the_same_rules(field, value, layers):
    fp = Fingerprint("LlamaForCausalLM", layers, 4, 2, 16, "abc")
    fractions, std, key = [0.5] * layers, [0.0] * layers, 0.5
    args = dict(fingerprint=fp, sink=4, scorer="accumulated", scorer_params={}, min_layer_keep=0.0, blend=1.0,
                protect_last=True, calibration={})
    if field in ("key", "second_key"):
        try:
            hash(value)
        except TypeError:
            assume(False)  # Python itself refuses an unhashable key in a dict
    try:
        if field in ("fractions", "std"):
            budget = LayerKeep(value, std) if field == "fractions" else LayerKeep(fractions, value)
            args["calibrated"] = {key: budget}
        elif field == "key":
            args["calibrated"] = {value: LayerKeep(fractions, std)}
        elif field == "second_key":
            args["calibrated"] = {key: LayerKeep(fractions, std), value: LayerKeep(fractions, std)}
        else:
            args["calibrated"] = {key: LayerKeep(fractions, std)}
            args[field] = value
        made = RetentionProfile(**args)
    except ProfileError as err:
        check_refusal(err, "RetentionProfile")
        count("constructors", "refused")
        return
    count("constructors", "accepted")
    check_invariants(made)
    d = made.to_dict()
    assert reference_problem(json.loads(json.dumps(d, allow_nan=False)), allow_empty=True) is None


# -- (a) + (b): every field at every edge, exhaustively ------------------------------------------
BASE = {
    "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
    "model": {"architecture": "LlamaForCausalLM", "layers": 3, "heads": 4, "kv_heads": 2, "head_dim": 16, "config_hash": "abc"},
    "sink": 4, "protect_last": True, "scorer": {"name": "window", "params": {"window": 8}},
    "allocation": {"min_layer_keep": 0.25, "blend": 0.5},
    "budgets": {"0.2": {"layer_keep_fractions": [0.3, 0.2, 0.1], "layer_keep_std": [0.01, 0.02, 0.03]},
                "0.5": {"layer_keep_fractions": [0.6, 0.5, 0.4], "layer_keep_std": [0.0, 0.0, 0.0]}},
    "calibration": {"samples": 16, "tokens": {"min": 1}},
}
SLOTS = [("schema",), ("schema_version",), ("sink",), ("protect_last",), ("evict_distance",), ("model", "architecture"), ("model", "layers"),
         ("model", "heads"), ("model", "kv_heads"), ("model", "head_dim"), ("model", "config_hash"), ("scorer", "name"),
         ("scorer", "params", "window"), ("allocation", "min_layer_keep"), ("allocation", "blend"),
         ("budgets", "0.2", "layer_keep_fractions", 1), ("budgets", "0.2", "layer_keep_std", 1),
         ("budgets", "0.2", "layer_keep_fractions"), ("budgets", "0.2", "layer_keep_std"), ("calibration", "samples"),
         ("calibration", "tokens", "min"), ("scorer",), ("allocation",), ("model",), ("budgets",), ("calibration",)]


def test_every_field_at_every_edge():
    """Each value of EDGES and SPECIAL in each field, and each key spelling beside / instead of a budget key."""
    cases = [(slot, v) for slot in SLOTS for v in EDGES + SPECIAL]
    cases += [(("rename",), k) for k in KEY_FORMS] + [(("alias",), k) for k in KEY_FORMS]
    for slot, value in cases:
        doc = copy.deepcopy(BASE)
        if slot == ("rename",):
            doc["budgets"] = {value: doc["budgets"]["0.2"], "0.5": doc["budgets"]["0.5"]}
        elif slot == ("alias",):
            doc["budgets"][value] = copy.deepcopy(doc["budgets"]["0.2"])
        else:
            at(doc, slot[:-1])[slot[-1]] = copy.deepcopy(value)
        problem = reference_problem(doc)
        try:
            loaded = RetentionProfile.from_dict(doc, "edge.json")
        except ProfileError as err:
            check_refusal(err, "edge.json")
            count("edges", "refused")
            assert problem is not None, f"{slot} = {value!r}: a valid profile was refused: {err}"
            continue
        count("edges", "accepted")
        assert problem is None, f"{slot} = {value!r}: an invalid profile was accepted ({problem})"
        check_invariants(loaded)
        matches_doc(loaded, doc)


# -- (c): save -> load round trip ---------------------------------------------------------------
@st.composite
def profiles(draw):
    layers = draw(st.integers(1, 4))
    kfs = distinct(draw(st.lists(st.one_of(unit_floats, st.sampled_from([0.2, 0.2000001, 0.123456789, 1.0, 5e-324])),
                                 min_size=1, max_size=4)))
    budgets = {kf: LayerKeep(draw(st.lists(unit_floats, min_size=layers, max_size=layers)),
                          draw(st.lists(st.floats(0, 10), min_size=layers, max_size=layers)))
               for kf in kfs}
    return RetentionProfile(
        Fingerprint(draw(names), layers, draw(st.integers(1, 128)), draw(st.integers(1, 128)), draw(st.integers(1, 512)),
                    draw(names)),
        draw(st.integers(0, MAX_SINK)), budgets, scorer=draw(names), scorer_params=draw(json_objects),
        min_layer_keep=draw(st.floats(0, 1)), blend=draw(st.floats(0, 1)), protect_last=draw(st.booleans()),
        calibration=draw(json_objects))


def bits(values):
    return [float(v).hex() for v in values]


@FUZZ
@given(p=profiles(), noise=st.floats(-9e-10, 9e-10))
def test_save_load_round_trip(folder, p, noise):
    path = p.save(folder / "round.json")
    text = path.read_text()
    q = RetentionProfile.load(path, p.fingerprint)
    count("round_trip", "cases ok")
    assert bits(q.keep_fractions) == bits(p.keep_fractions)
    for kf, b in p.calibrated.items():
        assert bits(q.calibrated[kf].layer_keep_fractions) == bits(b.layer_keep_fractions)
        assert bits(q.calibrated[kf].layer_keep_std) == bits(b.layer_keep_std)
        assert q.layer_fractions(kf) == b.layer_keep_fractions
        if 0 < kf + noise:
            nearest = min(p.calibrated, key=lambda k: abs(k - (kf + noise)))
            assert q.layer_fractions(kf + noise) == p.calibrated[nearest].layer_keep_fractions
        off = kf + 3e-9
        if all(abs(k - off) > 1e-9 for k in p.calibrated):
            with pytest.raises(ProfileError, match="is not in this profile"):
                q.layer_fractions(off)
    assert (q.fingerprint, q.sink, q.protect_last, q.scorer, q.scorer_params, q.calibration) == \
           (p.fingerprint, p.sink, p.protect_last, p.scorer, p.scorer_params, p.calibration)
    assert bits([q.min_layer_keep, q.blend]) == bits([p.min_layer_keep, p.blend])
    assert q.to_dict() == p.to_dict()
    assert q.save(folder / "again.json").read_text() == text  # stable on disk


def test_the_bounds_are_the_documented_ones():
    assert [getattr(prof, n) for n in ("MAX_LAYERS", "MAX_DIM", "MAX_SINK", "MAX_BUDGETS", "MAX_NAME", "MAX_KEY", "MAX_TEXT",
                                       "MAX_DEPTH", "MAX_ITEMS", "MAX_NODES")] == \
        [MAX_LAYERS, MAX_DIM, MAX_SINK, MAX_BUDGETS, MAX_NAME, MAX_KEY, MAX_TEXT, MAX_DEPTH, MAX_ITEMS, MAX_NODES]
    assert prof.KEY_TOLERANCE == 1e-9


def test_every_property_ran_enough_cases():
    """Summary (printed with -s): each property's cases, acceptances and refusals."""
    for prop, stats in sorted(STATS.items()):
        print(f"fuzz {prop}: " + ", ".join(f"{k}={v}" for k, v in sorted(stats.items())))
    if not STATS:
        pytest.skip("no fuzz property ran in this session")
    for prop, stats in STATS.items():
        assert stats["cases"] >= 1000, (prop, stats)
