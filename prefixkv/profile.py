"""Retention profiles: per-layer keep fractions calibrated offline, as a versioned JSON file.

A profile belongs to one model (its fingerprint), one importance score (the scorer and
its parameters) and one allocation setting (the search's curve, floor and blend).  For each calibrated keep
fraction it holds the per-layer keep fractions averaged over the calibration samples and
their spread.  Loading validates everything against a declared schema and says exactly
what is wrong, in one line that names the file and the field.

Schema library: pydantic v2 in strict mode: well kept, already installed with transformers (via typer), exact types, and a field path for every error.

On disk (schema version 1)::

    {"schema": "prefixkv.retention-profile", "schema_version": 1,
     "model": {"architecture": str, "layers": int, "heads": int, "kv_heads": int, "head_dim": int, "config_hash": str},
     "sink": int, "protect_last": bool, "evict_distance": int,
     "scorer": {"name": str, "params": {...}},
     "allocation": {"min_layer_keep": float, "blend": float, "curve": "all" | "unprotected",
                    "rule": "prefix-search" | "sensitivity" | "uniform" | "pyramid"},
     "budgets": {"<keep fraction>": {"layer_keep_fractions": [float] * layers, "layer_keep_std": [float] * layers}},
     "calibration": {...}}

``allocation.curve`` is the search's curve (``prefixkv.search``); files written before it was
recorded have none, and load with ``curve`` None ("not recorded").  ``allocation.rule`` says
how the lengths were chosen (``defaults.ALLOCATION_RULES``); absent means the prefix search.
``evict_distance`` is the decode-phase rule (the entry that many slots before the end of the
compacted prompt is evicted; ``defaults.OLDEST``: the oldest after the sinks, StreamingLLM's);
absent means ``defaults.EVICT_DISTANCE`` (25, the released code's).

LayerKeep keys are written with ``repr(float)`` so they read back as the same float; keys
written by older versions with 6 significant digits (``:g``) are still read.
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import re
import tempfile
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from . import defaults

SCHEMA = "prefixkv.retention-profile"
SCHEMA_VERSION = 1

# -- bounds: every size a profile can hold ---------------------------------------------------
MAX_LAYERS = 10_000          # fingerprint layers (and so every per-layer list)
MAX_DIM = 1_000_000          # heads, kv_heads, head_dim
MAX_SINK = 1_000_000         # attention-sink tokens
MAX_BUDGETS = 1_000          # calibrated keep fractions
MAX_NAME = 256               # architecture, config_hash, scorer name, keys of free-form objects
MAX_KEY = 64                 # characters of a budget key
MAX_TEXT = 10_000            # characters of a string in scorer params / calibration
MAX_DEPTH = 16               # nesting of scorer params / calibration (the object itself is depth 0)
MAX_ITEMS = 10_000           # entries of one list or object in scorer params / calibration
MAX_NODES = 100_000          # values in scorer params / calibration, all together
MAX_INT = 2**63 - 1          # magnitude of an integer in scorer params / calibration
MAX_FILE_BYTES = 64 << 20    # a profile file
KEY_TOLERANCE = 1e-9         # a keep fraction matches a calibrated one this close; keys must be further apart

# a budget key: an unsigned JSON number written as a string ("0.2", "1", "1e-05")
_KEY_SPELLING = re.compile(r"(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_SURROGATE = re.compile("[\ud800-\udfff]")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INTERNAL = "internal error while reading the profile"

# the source named in errors raised by __post_init__ while a file is being read
_SOURCE: ContextVar[str] = ContextVar("prefixkv_profile_source", default="RetentionProfile")


class ProfileError(ValueError):
    """A profile that cannot be used, with the reason and the fix."""


@dataclass(frozen=True)
class Fingerprint:
    """What a profile must match in the model it is applied to."""

    architecture: str
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    config_hash: str

    @classmethod
    def of(cls, config) -> Fingerprint:
        """From a transformers config (the text config of a vision-language model)."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "rope_theta", "rms_norm_eps", "max_position_embeddings")
        described = {k: getattr(text, k, None) for k in keys}
        digest = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:16]
        archs = getattr(config, "architectures", None) or [type(config).__name__]
        return cls(
            architecture=archs[0],
            layers=text.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            config_hash=digest,
        )


@dataclass
class LayerKeep:
    """Per-layer keep fractions for one global keep fraction."""

    layer_keep_fractions: list[float]
    layer_keep_std: list[float]

    def __post_init__(self):
        source = _SOURCE.get()
        if not isinstance(self.layer_keep_std, list):
            raise ProfileError(f"{source}: LayerKeep.layer_keep_std: must be a list, got {_show(self.layer_keep_std)}")
        doc = _validate(_BudgetDoc, {"layer_keep_fractions": self.layer_keep_fractions,
                                     "layer_keep_std": self.layer_keep_std}, source, prefix=("LayerKeep",))
        if len(doc.layer_keep_std) != len(doc.layer_keep_fractions):
            raise ProfileError(f"{source}: LayerKeep.layer_keep_std: expected {len(doc.layer_keep_fractions)} values "
                               f"(one per layer, as layer_keep_fractions), got {len(doc.layer_keep_std)}")
        self.layer_keep_fractions = [float(f) for f in doc.layer_keep_fractions]
        self.layer_keep_std = [float(s) for s in doc.layer_keep_std]


@dataclass
class RetentionProfile:
    fingerprint: Fingerprint
    sink: int
    calibrated: dict[float, LayerKeep]
    scorer: str = "accumulated"
    scorer_params: dict = field(default_factory=dict)
    min_layer_keep: float = 0.0
    blend: float = 1.0
    protect_last: bool = True
    calibration: dict = field(default_factory=dict)
    curve: str | None = None  # the search's curve; None: not recorded (older files)
    rule: str = defaults.RULE  # how the lengths were chosen: the prefix search, or measured sensitivity
    evict_distance: int = defaults.EVICT_DISTANCE  # the decode-phase rule (defaults.OLDEST: the oldest entry)

    def __post_init__(self):
        # a profile built in code is held to the file's rules; only an empty ``budgets`` is
        # allowed (to be filled in), and saving refuses it
        self.calibrated = _check_in_memory(self, _SOURCE.get(), allow_empty=True)
        self.min_layer_keep = float(self.min_layer_keep)
        self.blend = float(self.blend)

    # -- use ----------------------------------------------------------------------------
    @property
    def keep_fractions(self) -> list[float]:
        return sorted(self.calibrated)

    def layer_fractions(self, keep_fraction: float) -> list[float]:
        """Per-layer keep fractions for a calibrated global ``keep_fraction``.

        It matches the calibrated keep fraction nearest to it when within 1e-9 (float noise),
        nothing coarser."""
        if isinstance(keep_fraction, bool) or not isinstance(keep_fraction, numbers.Real):
            raise ProfileError(f"keep fraction must be a number, got {_show(keep_fraction)}")
        try:
            wanted = float(keep_fraction)
        except (OverflowError, ValueError, TypeError):
            wanted = math.nan
        if not math.isfinite(wanted):
            raise ProfileError(f"keep fraction must be a finite number, got {_show(keep_fraction)}")
        if not self.calibrated:
            raise ProfileError("this profile has no calibrated keep fractions; calibrate one with "
                               f"--keep {_num(wanted)}")
        nearest = min(self.calibrated, key=lambda k: abs(k - wanted))
        if abs(nearest - wanted) <= KEY_TOLERANCE:
            return list(self.calibrated[nearest].layer_keep_fractions)
        two = sorted(self.calibrated, key=lambda k: abs(k - wanted))[:2]
        raise ProfileError(
            f"keep fraction {_num(wanted)} is not in this profile (calibrated: "
            f"{', '.join(_num(k) for k in self.keep_fractions)}); use the nearest, "
            f"{' or '.join(_num(k) for k in two)}, or calibrate it with --keep {_num(wanted)}"
        )

    def check_model(self, fingerprint: Fingerprint) -> None:
        """Refuse a profile made for another model."""
        mine = self.fingerprint
        if mine.layers != fingerprint.layers:
            raise ProfileError(
                f"the profile has {mine.layers} layers but the model has {fingerprint.layers}: "
                f"it was calibrated for another model ({mine.architecture}); calibrate one for this model"
            )
        if mine != fingerprint:
            diff = [f"{k}: profile {getattr(mine, k)!r} vs model {getattr(fingerprint, k)!r}"
                    for k in asdict(mine) if getattr(mine, k) != getattr(fingerprint, k)]
            raise ProfileError("the profile was calibrated for another model (" + "; ".join(diff) + "); calibrate one for this model")

    def departures(self) -> list[str]:
        """The search settings that differ from the paper's (``prefixkv.defaults``: curve all,
        one sink, the last token, no floor, blend 1, the prefix search, evict distance 25), as ``name=value``;
        empty: the paper's."""
        rule = [] if self.rule == defaults.RULE else [f"rule={self.rule!r}"]
        evict = [] if self.evict_distance == defaults.EVICT_DISTANCE else [f"evict_distance={self.evict_distance!r}"]
        return rule + defaults.departures(self) + evict

    def check_scorer(self, scorer: str, params: dict | None = None, force: bool = False) -> None:
        """Refuse to apply the profile with another importance score unless forced."""
        if force:
            return
        if scorer != self.scorer or (params is not None and dict(params) != dict(self.scorer_params)):
            raise ProfileError(
                f"the profile was calibrated with scorer {self.scorer!r} {self.scorer_params or ''} but "
                f"{scorer!r} {params or ''} was asked for; calibrate with that scorer or pass force=True (--force-scorer)"
            )

    # -- I/O ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return _document(self, self.calibrated)

    def save(self, path: str | Path) -> Path:
        # fields may have been changed since construction: write only what load() accepts
        _check_in_memory(self, f"{path}", allow_empty=False)
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")

    @classmethod
    def from_dict(cls, data: dict, source: str = "profile") -> RetentionProfile:
        return _parse(data, source)

    @classmethod
    def load(cls, path: str | Path, fingerprint: Fingerprint | None = None) -> RetentionProfile:
        path = Path(path)
        if not path.is_file():
            raise ProfileError(f"no profile at {path}; make one with `prefixkv calibrate --output {path}`")
        source = str(path)
        try:
            with path.open("rb") as handle:
                raw = handle.read(MAX_FILE_BYTES + 1)
        except OSError as err:
            raise ProfileError(f"{source}: cannot be read ({err.strerror or err})") from None
        if len(raw) > MAX_FILE_BYTES:
            raise ProfileError(f"{source}: is larger than {MAX_FILE_BYTES >> 20} MiB; not a prefixkv retention profile")
        profile = _parse(_decode(raw, source), source)
        if fingerprint is not None:
            profile.check_model(fingerprint)
        return profile


# -- the schema -------------------------------------------------------------------------------
def _fail(message: str, path: tuple = ()):
    """A validation error whose message is used as is; ``path`` extends the error's location."""
    raise PydanticCustomError("prefixkv", "{message}", {"message": message, "path": tuple(path)})


def _within(lo, hi=None, *, open_lo: bool = False):
    rule = f"must be >= {lo}" if hi is None else f"must be in {'(' if open_lo else '['}{lo}, {hi}]"

    def check(value):
        if (value > lo if open_lo else value >= lo) and (hi is None or value <= hi):
            return value
        _fail(f"{rule}, got {_show(value)}")

    return AfterValidator(check)


def _text(value: str) -> str:
    if _SURROGATE.search(value):
        _fail("must be valid Unicode text (it holds a lone surrogate)")
    return value


def _schema(value: str) -> str:
    if value != SCHEMA:
        _fail(_not_a_profile(f"got {_show(value)}"))
    return value


def _schema_version(value: int) -> int:
    if value != SCHEMA_VERSION:
        _fail(_unknown_version(value))
    return value


def _budget_key(key: str) -> str:
    if len(key) > MAX_KEY or not _KEY_SPELLING.fullmatch(key):
        _fail(f"keep fraction key must be a number written as a string, such as \"0.2\", got {_show(key)}")
    kf = float(key)
    if not 0 < kf <= 1:
        _fail(f"keep fraction {key} is outside (0, 1]")
    return key


def _fractions_in_range(values: list[float]) -> list[float]:
    bad = [i for i, f in enumerate(values) if not 0 < f <= 1]
    if len(bad) == 1:
        _fail(f"must be in (0, 1], got {_show(values[bad[0]])}", (bad[0],))
    if bad:
        shown = ", ".join(_show(values[i]) for i in bad[:8])
        _fail(f"must be in (0, 1]; layers {bad[:8]}{' ...' if len(bad) > 8 else ''} are not ({shown})", (bad[0],))
    return values


def _json_object(value: dict) -> dict:
    """Free-form metadata (scorer params, calibration): plain JSON, finite, bounded."""
    stack = [(value, (), 0)]
    nodes = 0
    while stack:
        item, path, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            _fail(f"holds more than {MAX_NODES} values")
        if isinstance(item, dict):
            if depth > MAX_DEPTH:
                _fail(f"is nested deeper than {MAX_DEPTH} levels", path)
            if len(item) > MAX_ITEMS:
                _fail(f"must have at most {MAX_ITEMS} entries, got {len(item)}", path)
            children = []
            for k, v in item.items():
                if not isinstance(k, str):
                    _fail(f"keys must be strings, got {_show(k)}", path)
                if len(k) > MAX_NAME:
                    _fail(f"keys must be at most {MAX_NAME} characters, got {len(k)}", path)
                if _SURROGATE.search(k):
                    _fail("keys must be valid Unicode text (one holds a lone surrogate)", path)
                children.append((v, (*path, k), depth + 1))
            stack.extend(reversed(children))
        elif isinstance(item, list):
            if depth > MAX_DEPTH:
                _fail(f"is nested deeper than {MAX_DEPTH} levels", path)
            if len(item) > MAX_ITEMS:
                _fail(f"must have at most {MAX_ITEMS} items, got {len(item)}", path)
            stack.extend(reversed([(v, (*path, i), depth + 1) for i, v in enumerate(item)]))
        elif isinstance(item, str):
            if len(item) > MAX_TEXT:
                _fail(f"must be at most {MAX_TEXT} characters, got {len(item)}", path)
            if _SURROGATE.search(item):
                _fail("must be valid Unicode text (it holds a lone surrogate)", path)
        elif item is None or isinstance(item, bool):
            pass
        elif isinstance(item, int):
            if not -MAX_INT - 1 <= item <= MAX_INT:
                _fail(f"must be a 64-bit integer, got {_show(item)}", path)
        elif isinstance(item, float):
            if not math.isfinite(item):
                _fail(f"must be a finite number, got {_show(item)}", path)
        else:
            _fail(f"must be a JSON value (object, list, string, number, true, false or null), got {_show(item)}", path)
    return value


Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME), AfterValidator(_text)]
Dim = Annotated[int, _within(1, MAX_DIM)]
Unit = Annotated[float, _within(0, 1)]
JsonObject = Annotated[dict[str, Any], AfterValidator(_json_object)]
LayerFractions = Annotated[list[float], Field(min_length=1, max_length=MAX_LAYERS), AfterValidator(_fractions_in_range)]
LayerSpread = Annotated[list[Annotated[float, _within(0)]], Field(min_length=1, max_length=MAX_LAYERS)]
BudgetKey = Annotated[str, AfterValidator(_budget_key)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)


class _ModelDoc(_Strict):
    architecture: Name
    layers: Annotated[int, _within(1, MAX_LAYERS)]
    heads: Dim
    kv_heads: Dim
    head_dim: Dim
    config_hash: Name


class _ScorerDoc(_Strict):
    name: Name = "accumulated"
    params: JsonObject = {}


class _AllocationDoc(_Strict):
    min_layer_keep: Unit = 0.0
    blend: Unit = 1.0
    curve: Optional[Literal["all", "unprotected"]] = None
    rule: Literal["prefix-search", "sensitivity", "uniform", "pyramid"] = "prefix-search"


class _BudgetDoc(_Strict):
    layer_keep_fractions: LayerFractions
    layer_keep_std: Optional[LayerSpread] = None  # absent in a file: zeros

    @field_validator("layer_keep_std", mode="before")
    @classmethod
    def _no_null(cls, value):
        if value is None:  # only an explicit null gets here (defaults are not validated)
            _fail("must be a list, got null")
        return value


class _ProfileDoc(_Strict):
    schema_: Annotated[str, AfterValidator(_schema)] = Field(alias="schema")
    schema_version: Annotated[int, AfterValidator(_schema_version)]
    model: _ModelDoc
    sink: Annotated[int, _within(0, MAX_SINK)]
    protect_last: bool = True
    evict_distance: Annotated[int, _within(1, defaults.OLDEST)] = defaults.EVICT_DISTANCE
    scorer: _ScorerDoc = _ScorerDoc()
    allocation: _AllocationDoc = _AllocationDoc()
    budgets: Annotated[dict[BudgetKey, _BudgetDoc], Field(max_length=MAX_BUDGETS)]
    calibration: JsonObject = {}

    @field_validator("budgets")
    @classmethod
    def _distinct_keep_fractions(cls, budgets: dict, info: ValidationInfo) -> dict:
        if not budgets and not (info.context or {}).get("allow_empty"):
            _fail("no calibrated keep fractions (\"budgets\" is empty)")
        order = sorted((float(k), i, k) for i, k in enumerate(budgets))
        for (a, ia, ka), (b, ib, kb) in zip(order, order[1:]):
            later, earlier = (kb, ka) if ib > ia else (ka, kb)
            if a == b:
                _fail(f"keep fraction {_num(a)} is given twice (\"{earlier}\" and \"{later}\")", (later,))
            if b - a <= KEY_TOLERANCE:
                _fail(f"keep fraction {later} is within {KEY_TOLERANCE:g} of {earlier}: a lookup could not tell "
                      "them apart", (later,))
        return budgets

    @model_validator(mode="after")
    def _one_value_per_layer(self):
        layers = self.model.layers
        for key, budget in self.budgets.items():
            got = len(budget.layer_keep_fractions)
            if got != layers:
                _fail(f"expected {layers} layer keep fractions (one per layer), got {got}",
                      ("budgets", key, "layer_keep_fractions"))
            if budget.layer_keep_std is not None and len(budget.layer_keep_std) != layers:
                _fail(f"expected {layers} layer keep spreads (one per layer), got {len(budget.layer_keep_std)}",
                      ("budgets", key, "layer_keep_std"))
        return self


_NESTED = {(): _ProfileDoc, ("model",): _ModelDoc, ("scorer",): _ScorerDoc, ("allocation",): _AllocationDoc}


def _not_a_profile(detail: str) -> str:
    return f"not a prefixkv retention profile (expected \"schema\": \"{SCHEMA}\", {detail})"


def _unknown_version(value) -> str:
    return (f"unknown schema version {_show(value)}; this prefixkv reads version {SCHEMA_VERSION} "
            "(upgrade prefixkv or re-calibrate)")


# -- reading ----------------------------------------------------------------------------------
def _decode(raw: bytes, source: str):
    """Bytes -> JSON value: UTF-8 only, no duplicate keys, no stack overflow."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ProfileError(f"{source}: is not valid JSON (not UTF-8 text: byte {err.start} is "
                           f"0x{raw[err.start]:02x}); re-run `prefixkv calibrate`") from None
    duplicated: list[tuple[dict, str]] = []

    def pairs_hook(pairs):
        obj = dict(pairs)
        if len(obj) != len(pairs):
            seen = set()
            first = next(k for k, _ in pairs if k in seen or seen.add(k))
            duplicated.append((obj, first))
        return obj

    try:
        data = json.loads(text, object_pairs_hook=pairs_hook)
    except json.JSONDecodeError as err:
        raise ProfileError(f"{source}: is not valid JSON (line {err.lineno} column {err.colno}: {err.msg}); "
                           "re-run `prefixkv calibrate`") from None
    except RecursionError:
        raise ProfileError(f"{source}: is not valid JSON for a profile (nested too deeply)") from None
    except ValueError as err:  # e.g. an integer with more digits than Python converts
        raise ProfileError(f"{source}: is not valid JSON ({_one_line(str(err))})") from None
    if duplicated:
        path, key = _find_duplicate(data, {id(obj): key for obj, key in duplicated})
        raise ProfileError(f"{source}: {_path((*path, key))}: the key appears more than once in one JSON object")
    return data


def _find_duplicate(data, marked: dict[int, str]):
    """The path of the shallowest reachable object that had a duplicate key."""
    queue = [(data, ())]
    for item, path in queue:  # breadth first; ``queue`` grows while it is walked
        if isinstance(item, dict):
            if id(item) in marked:
                return path, marked[id(item)]
            queue.extend((v, (*path, k)) for k, v in item.items())
        elif isinstance(item, list):
            queue.extend((v, (*path, i)) for i, v in enumerate(item))
    return (), next(iter(marked.values()))


def _validate(model: type[BaseModel], data, source: str, prefix: tuple = (), allow_empty: bool = False):
    try:
        return model.model_validate(data, context={"allow_empty": allow_empty})
    except ValidationError as err:
        raise ProfileError(_error_line(err, source, prefix)) from None


def _parse(data, source: str) -> RetentionProfile:
    token = _SOURCE.set(source)
    try:
        doc = _validate(_ProfileDoc, data, source)
        layers = doc.model.layers
        return RetentionProfile(
            fingerprint=Fingerprint(**doc.model.model_dump()),
            sink=doc.sink,
            calibrated={float(k): LayerKeep([float(f) for f in b.layer_keep_fractions],
                                      [float(s) for s in b.layer_keep_std] if b.layer_keep_std is not None
                                      else [0.0] * layers)
                     for k, b in doc.budgets.items()},
            scorer=doc.scorer.name,
            scorer_params=dict(doc.scorer.params),
            min_layer_keep=float(doc.allocation.min_layer_keep),
            blend=float(doc.allocation.blend),
            curve=doc.allocation.curve,
            rule=doc.allocation.rule,
            protect_last=doc.protect_last,
            evict_distance=doc.evict_distance,
            calibration=dict(doc.calibration),
        )
    except ProfileError:
        raise
    except Exception as err:  # pragma: no cover - the schema above is meant to leave nothing for this
        raise ProfileError(f"{source}: {_INTERNAL} ({type(err).__name__}: {_one_line(str(err))[:200]}); "
                           "please report it") from err
    finally:
        _SOURCE.reset(token)


def _document(profile: RetentionProfile, calibrated: dict[float, LayerKeep]) -> dict:
    """The profile as the file holds it (version 1: the calibrated keep fractions under "budgets")."""
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "model": asdict(profile.fingerprint),
        "sink": profile.sink,
        "protect_last": profile.protect_last,
        **({"evict_distance": profile.evict_distance} if profile.evict_distance != defaults.EVICT_DISTANCE else {}),
        "scorer": {"name": profile.scorer, "params": profile.scorer_params},
        "allocation": {"min_layer_keep": profile.min_layer_keep, "blend": profile.blend,
                       **({"curve": profile.curve} if profile.curve is not None else {}),
                       **({"rule": profile.rule} if profile.rule != defaults.RULE else {})},
        "budgets": {_key(kf): {"layer_keep_fractions": b.layer_keep_fractions, "layer_keep_std": b.layer_keep_std}
                    for kf, b in sorted(calibrated.items())},
        "calibration": profile.calibration,
    }


def _check_in_memory(profile: RetentionProfile, source: str, allow_empty: bool) -> dict[float, LayerKeep]:
    """Validate a profile object against the file's schema; returns its budgets keyed by float."""
    if not isinstance(profile.fingerprint, Fingerprint):
        raise ProfileError(f"{source}: fingerprint: must be a Fingerprint, got {_show(profile.fingerprint)}")
    if not isinstance(profile.calibrated, dict):
        raise ProfileError(f"{source}: calibrated: must be a dict of keep fraction -> LayerKeep, got {_show(profile.calibrated)}")
    budgets: dict[float, LayerKeep] = {}
    for k, b in profile.calibrated.items():
        where = f"{source}: budgets[{_show(k)}]"
        if isinstance(k, bool) or not isinstance(k, (int, float)):
            raise ProfileError(f"{where}: a keep fraction must be a number, got {_show(k)}")
        if isinstance(k, int) and k != 1:
            raise ProfileError(f"{where}: keep fraction {_show(k)} is outside (0, 1]")
        kf = float(k)
        if not (math.isfinite(kf) and 0 < kf <= 1):
            raise ProfileError(f"{where}: keep fraction {_show(k)} is outside (0, 1]")
        if not isinstance(b, LayerKeep):
            raise ProfileError(f"{where}: must be a LayerKeep, got {_show(b)}")
        if kf in budgets:
            raise ProfileError(f"{where}: keep fraction {_num(kf)} is given twice")
        budgets[kf] = b
    _validate(_ProfileDoc, _document(profile, budgets), source, allow_empty=allow_empty)
    return profile.calibrated if all(type(k) is float for k in profile.calibrated) else budgets


# -- error messages ---------------------------------------------------------------------------
_MISSING = {
    ("model",): "the \"model\" fingerprint is missing (architecture, layers, heads, kv_heads, head_dim, config_hash)",
    ("budgets",): "no calibrated keep fractions (\"budgets\" is missing)",
    ("sink",): "is missing (the number of attention-sink tokens, an integer)",
}


def _error_line(err: ValidationError, source: str, prefix: tuple = ()) -> str:
    errors = err.errors(include_url=False)

    def rank(e):
        loc = e["loc"]
        return 0 if loc in ((), ("schema",)) else 1 if loc == ("schema_version",) else 2

    e = sorted(errors, key=rank)[0]  # stable: otherwise the first in file order
    loc = tuple(e["loc"])
    if len(loc) >= 2 and loc[-1] == "[key]":
        loc = loc[:-1]
    ctx = e.get("ctx") or {}
    if e["type"] == "prefixkv":
        loc = loc + tuple(ctx.get("path", ()))
    message = _describe(e, loc)
    where = _path((*prefix, *loc))
    return _one_line(f"{source}: {where}: {message}" if where else f"{source}: {message}")


def _describe(e: dict, loc: tuple) -> str:
    kind, value, ctx = e["type"], e.get("input"), e.get("ctx") or {}
    if kind == "prefixkv":
        return str(ctx.get("message", e["msg"]))
    if loc == ():
        return _not_a_profile(f"got {_show(value)}; the top level must be a JSON object")
    if loc == ("schema",):
        return _not_a_profile("but it is missing" if kind == "missing" else f"got {_show(value)}")
    if loc == ("schema_version",):
        return f"is missing; this prefixkv reads version {SCHEMA_VERSION}" if kind == "missing" else _unknown_version(value)
    if kind == "missing":
        return _MISSING.get(loc, "is missing")
    if kind == "extra_forbidden":
        model = _NESTED.get(loc[:-1]) or (_BudgetDoc if len(loc) == 3 and loc[0] == "budgets" else None)
        known = f" (known: {', '.join(f.alias or n for n, f in model.model_fields.items())})" if model else ""
        return f"is not a field of a version {SCHEMA_VERSION} profile{known}; remove it"
    simple = {
        "int_type": "must be an integer",
        "float_type": "must be a finite number",
        "finite_number": "must be a finite number",
        "bool_type": "must be true or false",
        "string_type": "must be a string",
        "list_type": "must be a list",
        "dict_type": "must be a JSON object",
        "model_type": "must be a JSON object",
        "model_attributes_type": "must be a JSON object",
        "invalid_key": "keys must be strings",
    }
    if kind in simple:
        return f"{simple[kind]}, got {_show(value)}"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "string_too_long":
        return f"must be at most {ctx.get('max_length')} characters, got {len(value) if isinstance(value, str) else '?'}"
    if kind in ("too_long", "too_short"):
        got = ctx.get("actual_length")
        got = got if got is not None else len(value) if isinstance(value, (list, dict)) else "?"
        if kind == "too_long":
            return f"must have at most {ctx.get('max_length')} entries, got {got}"
        return f"must have at least {ctx.get('min_length')} entries, got {got}"
    msg = str(e.get("msg", kind))
    return f"{msg[:1].lower()}{msg[1:]}, got {_show(value)}"


def _path(loc: tuple) -> str:
    """('budgets', '0.2', 'layer_keep_fractions', 3) -> budgets."0.2".layer_keep_fractions[3]"""
    out = ""
    for part in loc:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        else:
            name = str(part)
            name = name if _IDENTIFIER.fullmatch(name) else json.dumps(name)
            out += f".{name}" if out else name
    return out


def _show(value) -> str:
    """A short one-line description of any value, for messages."""
    try:
        if value is None:
            return "null"
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int):
            bits = int(value).bit_length()
            return f"an integer of about {int(bits * 0.30103) + 1} digits" if bits > 128 else str(int(value))
        if isinstance(value, float):
            return repr(float(value))
        if isinstance(value, str):
            return json.dumps(str(value[:60])) + ("..." if len(value) > 60 else "")
        if isinstance(value, list):
            return f"a list of {len(value)} items"
        if isinstance(value, dict):
            return f"an object of {len(value)} entries"
        name = type(value).__name__
        return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"
    except Exception:  # pragma: no cover - a value that cannot even be described
        return "a value"


def _num(x: float) -> str:
    """A keep fraction in messages, exactly (repr, not 6 digits)."""
    return repr(float(x))


def _key(kf: float) -> str:
    """A budget key on disk: ``repr(float)`` reads back as the same float."""
    return repr(float(kf))


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
