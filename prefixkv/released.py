"""Importing the released PrefixKV profiles (THU-MIG/PrefixKV, ``confs/*.json``) as retention profiles.

The released code stores one budget per file, ``confs/prefixkv_<model>_<ratio>.json``: a bare
JSON list with one float per layer, the share of that layer's prompt entries it *evicts*.
Its ``--ratio r`` is the share evicted, so the paper's "20%" (kept) is ``--ratio 0.8``.
Here a file becomes one budget of a ``RetentionProfile``:

- keep fraction = ``1 - ratio``, with the ratio from the file name's ``_<ratio>.json`` suffix
  (the number after the last underscore) or given explicitly for a single file;
- layer ``l`` keeps ``1 - r_l`` of its entries.

The released lists' means are close to, not exactly, their ratio (``_0.2.json`` averages
0.199 evicted), because the released calibration truncates each sample's counts and
averages the samples.  Like prefixkv's own calibration (``calibration.average``), each kept
list is rescaled so that its mean is exactly the keep fraction (a layer is capped at 1), so
an engine built from it keeps the total the budget names; the raw mean is recorded in the
profile's ``calibration`` along with the source files (name and sha256) and the paper's
settings (one sink, the last token kept, the accumulated score, blend 1, no floor, the
search curve over all positions).
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers
import re
import time
from pathlib import Path

from . import __version__, defaults
from .profile import (
    KEY_TOLERANCE,
    MAX_FILE_BYTES,
    Fingerprint,
    LayerKeep,
    ProfileError,
    RetentionProfile,
)

SETTINGS = "released PrefixKV (THU-MIG/PrefixKV)"
# the released code's settings (its evaluation scripts: --start-size 1, the last token kept),
# which are prefixkv's defaults
SINK = defaults.SINK
PROTECT_LAST = defaults.PROTECT_LAST
SCORER = "accumulated"
BLEND = defaults.BLEND
MIN_LAYER_KEEP = defaults.MIN_LAYER_KEEP
CURVE = defaults.CURVE

_NUMBER = re.compile(r"[+-]?[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?")
_RATIO_RULE = "the released ratio is the share evicted, in (0, 1); keep = 1 - ratio"


def ratio_from_name(path: str | Path) -> float | None:
    """The released ratio in a file name ``..._<ratio>.json`` (``prefixkv_llava-v1.5-7b_0.8.json`` -> 0.8), else None."""
    stem = Path(path).name.removesuffix(".json")
    if "_" not in stem:
        return None
    text = stem.rsplit("_", 1)[1]
    return float(text) if _NUMBER.fullmatch(text) else None


def read_released(path: str | Path) -> tuple[object, str]:
    """(the JSON value, the sha256 of the bytes) of a released file; ``kept_fractions`` checks the value."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no released profile at {path}")
    with path.open("rb") as handle:
        raw = handle.read(MAX_FILE_BYTES + 1)
    if len(raw) > MAX_FILE_BYTES:
        raise ProfileError(f"{path}: is larger than {MAX_FILE_BYTES >> 20} MiB; not a released PrefixKV profile")
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=lambda name: math.nan)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        detail = f"line {err.lineno} column {err.colno}: {err.msg}" if isinstance(err, json.JSONDecodeError) else type(err).__name__
        raise ProfileError(f"{path}: is not valid JSON ({detail}); expected a released PrefixKV list "
                           "of per-layer evicted fractions") from None
    return value, hashlib.sha256(raw).hexdigest()


def kept_fractions(evicted, layers: int, source: str = "released list") -> list[float]:
    """Per-layer kept fractions ``1 - r_l`` of a released list of evicted fractions, checked."""
    if not isinstance(evicted, list) or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in evicted):
        raise ProfileError(f"{source}: is not a released PrefixKV profile: expected a JSON list of numbers "
                           "(one evicted fraction per layer)")
    if len(evicted) != layers:
        raise ProfileError(f"{source}: has {len(evicted)} layer fractions but the model has {layers} layers; "
                           "these lists are for another model")
    for i, value in enumerate(evicted):
        value = float(value)
        if not (math.isfinite(value) and 0 <= value <= 1):
            raise ProfileError(f"{source}: layer {i}: evicted fraction {value!r} is outside [0, 1]")
        if value == 1:
            raise ProfileError(f"{source}: layer {i}: evicted fraction 1.0 keeps nothing; every layer must keep some entries")
    return [1.0 - float(v) for v in evicted]


def rescaled(fractions: list[float], keep_fraction: float) -> list[float]:
    """``fractions`` scaled so their mean is ``keep_fraction``, each capped at 1 (as ``calibration.average``)."""
    scale = keep_fraction * len(fractions) / sum(fractions)
    return [min(f * scale, 1.0) for f in fractions]


def check_ratio(ratio: float, source: str) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not (math.isfinite(ratio) and 0 < ratio < 1):
        raise ProfileError(f"{source}: released ratio {ratio!r} is outside (0, 1) ({_RATIO_RULE})")
    return float(ratio)


def import_profiles(paths, fingerprint: Fingerprint, ratio: float | None = None) -> RetentionProfile:
    """One retention profile from released PrefixKV files, one budget per file.

    ratio: the released ratio (share evicted) of a single file; otherwise each file's name gives it."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise ProfileError("no released profile files given")
    if ratio is not None and len(paths) != 1:
        raise ProfileError(f"--ratio applies to one file, got {len(paths)}; name each file ..._<ratio>.json instead")
    calibrated: dict[float, LayerKeep] = {}
    sources, ratios, raw_means, origin = [], {}, {}, {}
    for path in paths:
        named = ratio_from_name(path)
        if ratio is not None and named is not None and abs(named - ratio) > KEY_TOLERANCE:
            raise ProfileError(f"{path}: --ratio {ratio!r} disagrees with the file name's {named!r} ({_RATIO_RULE}); "
                               "drop --ratio or rename the file")
        r = ratio if ratio is not None else named
        if r is None:
            raise ProfileError(f"{path}: no ratio in the file name (expected ..._<ratio>.json, as the released "
                               "confs/prefixkv_<model>_<ratio>.json) and no --ratio; pass --ratio R (the share evicted)")
        r = check_ratio(r, str(path))
        keep = round(1.0 - r, 12)  # 1 - 0.8 is 0.19999999999999996: the budget is 0.2
        same = next((k for k in calibrated if abs(k - keep) <= KEY_TOLERANCE), None)
        if same is not None:
            raise ProfileError(f"{path}: gives keep fraction {keep!r} (ratio {r!r}), as {origin[same]} does; "
                               "import each budget once")
        evicted, digest = read_released(path)
        kept = kept_fractions(evicted, fingerprint.layers, str(path))
        calibrated[keep] = LayerKeep(rescaled(kept, keep), [0.0] * len(kept))
        origin[keep] = path.name
        sources.append({"file": path.name, "sha256": digest})
        ratios[repr(keep)] = r
        raw_means[repr(keep)] = sum(kept) / len(kept)
    return RetentionProfile(
        fingerprint=fingerprint,
        sink=SINK,
        protect_last=PROTECT_LAST,
        calibrated=calibrated,
        scorer=SCORER,
        scorer_params={},
        min_layer_keep=MIN_LAYER_KEEP,
        blend=BLEND,
        curve=CURVE,
        calibration={
            "imported_from": sources,
            "released_ratio": ratios,
            "raw_mean_keep": raw_means,
            "rescaled": "each layer list scaled so its mean is the keep fraction (capped at 1), as calibration does",
            "settings": SETTINGS,
            "tool": f"prefixkv {__version__}",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )


def model_config(source: str):
    """The transformers config of ``source`` without its weights where possible: a hub id is
    asked for its config only; a folder, a .gguf file or a built-in name goes through
    ``models.resolve`` (a GGUF model is converted once, as ``load_model`` does)."""
    from transformers import AutoConfig

    from .models import BUILTIN, ModelError, resolve

    local = source in BUILTIN or Path(source).expanduser().exists()
    if not local and source.count("/") == 1 and not source.startswith((".", "/")):
        try:
            return AutoConfig.from_pretrained(source)
        except Exception as err:  # offline, unknown repo, gated...
            raise ModelError(f"could not fetch the config of {source!r} from the Hugging Face hub ({type(err).__name__}); "
                             "this machine may be offline: pass the model's local folder") from err
    return AutoConfig.from_pretrained(resolve(source))
