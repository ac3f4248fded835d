"""Retention profiles: per-layer keep fractions calibrated offline, as a versioned JSON file.

A profile belongs to one model (its fingerprint), one importance score (the scorer and
its parameters) and one allocation setting (floor, blend).  For each calibrated keep
fraction it holds the per-layer keep fractions averaged over the calibration samples and
their spread.  Loading validates everything and says exactly what is wrong.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

SCHEMA = "prefixkv.retention-profile"
SCHEMA_VERSION = 1


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
class Budget:
    """Per-layer keep fractions for one global keep fraction."""

    layer_keep_fractions: list[float]
    layer_keep_std: list[float]


@dataclass
class RetentionProfile:
    fingerprint: Fingerprint
    sink: int
    budgets: dict[float, Budget]
    scorer: str = "accumulated"
    scorer_params: dict = field(default_factory=dict)
    min_layer_keep: float = 0.0
    blend: float = 1.0
    protect_last: bool = True
    calibration: dict = field(default_factory=dict)

    # -- use ----------------------------------------------------------------------------
    @property
    def keep_fractions(self) -> list[float]:
        return sorted(self.budgets)

    def layer_fractions(self, keep_fraction: float) -> list[float]:
        """Per-layer keep fractions for a calibrated global ``keep_fraction``."""
        for kf, budget in self.budgets.items():
            if math.isclose(kf, keep_fraction, abs_tol=1e-9):
                return list(budget.layer_keep_fractions)
        nearest = sorted(self.budgets, key=lambda k: abs(k - keep_fraction))[:2]
        raise ProfileError(
            f"keep fraction {keep_fraction:g} is not in this profile (calibrated: "
            f"{', '.join(f'{k:g}' for k in self.keep_fractions)}); use the nearest, "
            f"{' or '.join(f'{k:g}' for k in nearest)}, or calibrate it with --keep {keep_fraction:g}"
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
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "model": asdict(self.fingerprint),
            "sink": self.sink,
            "protect_last": self.protect_last,
            "scorer": {"name": self.scorer, "params": self.scorer_params},
            "allocation": {"min_layer_keep": self.min_layer_keep, "blend": self.blend},
            "budgets": {
                f"{kf:g}": {"layer_keep_fractions": b.layer_keep_fractions, "layer_keep_std": b.layer_keep_std}
                for kf, b in sorted(self.budgets.items())
            },
            "calibration": self.calibration,
        }

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict, source: str = "profile") -> RetentionProfile:
        return _parse(data, source)

    @classmethod
    def load(cls, path: str | Path, fingerprint: Fingerprint | None = None) -> RetentionProfile:
        path = Path(path)
        if not path.is_file():
            raise ProfileError(f"no profile at {path}; make one with `prefixkv calibrate --output {path}`")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ProfileError(f"{path} is not valid JSON ({err}); re-run `prefixkv calibrate`") from err
        profile = _parse(data, str(path))
        if fingerprint is not None:
            profile.check_model(fingerprint)
        return profile


def _parse(data, source: str) -> RetentionProfile:
    def fail(message: str):
        raise ProfileError(f"{source}: {message}")

    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        fail(f"not a prefixkv retention profile (expected \"schema\": \"{SCHEMA}\")")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        fail(f"unknown schema version {version!r}; this prefixkv reads version {SCHEMA_VERSION} (upgrade prefixkv or re-calibrate)")
    try:
        fingerprint = Fingerprint(**data["model"])
    except (KeyError, TypeError) as err:
        fail(f"the \"model\" fingerprint is missing or malformed ({err})")
    sink = data.get("sink")
    if not isinstance(sink, int) or sink < 0:
        fail(f"\"sink\" must be a non-negative integer, got {sink!r}")
    budgets_in = data.get("budgets")
    if not isinstance(budgets_in, dict) or not budgets_in:
        fail("no calibrated keep fractions (\"budgets\" is empty)")
    budgets = {}
    for key, entry in budgets_in.items():
        try:
            kf = float(key)
        except ValueError:
            fail(f"budget key {key!r} is not a keep fraction")
        if not 0 < kf <= 1:
            fail(f"keep fraction {key} is outside (0, 1]")
        fractions = entry.get("layer_keep_fractions") if isinstance(entry, dict) else None
        spread = entry.get("layer_keep_std", [0.0] * fingerprint.layers) if isinstance(entry, dict) else None
        if not isinstance(fractions, list) or len(fractions) != fingerprint.layers:
            got = len(fractions) if isinstance(fractions, list) else fractions
            fail(f"keep fraction {key}: expected {fingerprint.layers} layer keep fractions (one per layer), got {got}")
        bad = [i for i, f in enumerate(fractions) if not isinstance(f, (int, float)) or not 0 < f <= 1]
        if bad:
            fail(f"keep fraction {key}: layer keep fractions must be in (0, 1]; layers {bad[:8]} are not ({[fractions[i] for i in bad[:8]]})")
        budgets[kf] = Budget([float(f) for f in fractions], [float(s) for s in spread])
    scorer = data.get("scorer", {"name": "accumulated", "params": {}})
    if not isinstance(scorer, dict) or not isinstance(scorer.get("name", ""), str) or not isinstance(scorer.get("params", {}), dict):
        fail(f"\"scorer\" must be {{\"name\": ..., \"params\": {{...}}}}, got {scorer!r}")
    allocation = data.get("allocation", {})
    if not isinstance(allocation, dict):
        fail(f"\"allocation\" must be {{\"min_layer_keep\": ..., \"blend\": ...}}, got {allocation!r}")
    return RetentionProfile(
        fingerprint=fingerprint,
        sink=sink,
        budgets=budgets,
        scorer=scorer.get("name", "accumulated"),
        scorer_params=dict(scorer.get("params", {})),
        min_layer_keep=float(allocation.get("min_layer_keep", 0.0)),
        blend=float(allocation.get("blend", 1.0)),
        protect_last=bool(data.get("protect_last", True)),
        calibration=dict(data.get("calibration", {})),
    )


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
