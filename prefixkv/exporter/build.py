"""The build pipeline: model + retention profile -> validated engine folder.

    build_engine("smollm2-135m", "engines/smollm2-k20", keep_fraction=0.2)          # calibrates
    build_engine("smollm2-135m", "engines/smollm2-k20", 0.2, profile="profile.json")

1. refuse an existing output (unless ``force``) and bad settings, before any work
2. load the model; load (and check) or calibrate the retention profile
3. export prefill.onnx and decode.onnx with the per-layer fractions as graph constants
4. copy the tokenizer files, save profile.json, write manifest.json, rename into place
5. validate against the PyTorch reference (``prefixkv.engines.validate``) unless told not to
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .engine_folder import VALIDATION, check_output, copy_tokenizer, io_metadata, staging, write_manifest
from .onnx import OPSET, export_engine_graphs, exporter_version, graph_spec


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class BuildResult:
    path: Path
    manifest: dict
    validation: dict | None
    seconds: float

    @property
    def passed(self) -> bool:
        return self.validation is None or bool(self.validation.get("passed"))


def resolve_profile(profile, model, tokenizer, keep_fraction: float, calibrate_samples: int = 16,
                    calibrate_tokens: int = 512, scorer: str = "accumulated", sink: int = 4, log=_stderr):
    """A ``RetentionProfile`` for ``model`` holding ``keep_fraction``: loaded from a path (checked
    against the model), taken as given, or calibrated on the built-in calibration split."""
    from ..profile import Fingerprint, RetentionProfile

    fingerprint = Fingerprint.of(model.config)
    if profile is None:
        from ..calibration import calibrate_profile
        from ..data import builtin_samples

        log(f"calibrating a profile: {calibrate_samples} samples x {calibrate_tokens} tokens, scorer {scorer}")
        rows = builtin_samples(tokenizer, "calibration", n=calibrate_samples, tokens=calibrate_tokens, reference_tokens=0)
        samples = [_encode(tokenizer, r["prompt"]) for r in rows]
        profile = calibrate_profile(model, samples, [keep_fraction], sink=sink, scorer=scorer, progress=False,
                                    data_name=f"builtin:calibration:{calibrate_samples}x{calibrate_tokens}")
    elif isinstance(profile, (str, Path)):
        profile = RetentionProfile.load(profile, fingerprint)
    else:
        profile.check_model(fingerprint)
    profile.layer_fractions(keep_fraction)  # ProfileError naming the calibrated fractions
    return profile


def _encode(tokenizer, text: str) -> list[int]:
    try:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    except TypeError:
        return list(tokenizer.encode(text))


def build_engine(
    model_source: str,
    output: str | Path,
    keep_fraction: float,
    profile=None,
    calibrate_samples: int = 16,
    calibrate_tokens: int = 512,
    scorer: str = "accumulated",
    sink: int = 4,
    force: bool = False,
    validate: bool = True,
    validate_options: dict | None = None,
    evict_distance: int = 25,
    max_context: int | None = None,
    opset: int = OPSET,
    model=None,
    tokenizer=None,
    log=_stderr,
) -> BuildResult:
    """Build the engine for ``model_source`` at ``keep_fraction`` into ``output``.

    profile: None (calibrate), a path, or a ``RetentionProfile``.  model/tokenizer: an
    already loaded model (and its HF tokenizer) for ``model_source``, to skip loading.
    validate_options: keyword arguments of ``prefixkv.engines.validate.validate_engine``.
    Returns a ``BuildResult``; ``result.passed`` is False when validation failed.
    """
    start = time.perf_counter()
    if not isinstance(keep_fraction, (int, float)) or not 0 < keep_fraction <= 1:
        raise ValueError(f"the keep fraction must be in (0, 1] (0.2 keeps 20% of the entries), got {keep_fraction!r}")
    output = check_output(output, force)
    if model is None:
        from ..models import load_model

        log(f"loading {model_source}")
        model, tokenizer = load_model(model_source)
    from ..models import model_folder
    from ..profile import Fingerprint

    folder = model_folder(model)
    if folder is None:
        raise ValueError(f"cannot find the local folder of {model_source!r} (for its tokenizer files); pass a model folder")
    profile = resolve_profile(profile, model, tokenizer, keep_fraction, calibrate_samples, calibrate_tokens, scorer, sink, log)
    spec = graph_spec(model, profile, keep_fraction, evict_distance)
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    context = int(max_context or getattr(text, "max_position_embeddings", 2048))

    with staging(output, force) as tmp:
        export_engine_graphs(model, spec, tmp, opset, log)
        copy_tokenizer(folder, tmp)
        profile.save(tmp / "profile.json")
        graphs = {}
        for graph in ("prefill", "decode"):
            meta = io_metadata(tmp / f"{graph}.onnx")
            graphs[graph] = {"file": f"{graph}.onnx", "data": f"{graph}.onnx.data", **meta}
        manifest = write_manifest(tmp, {
            "model": {"source": str(model_source), "folder": str(folder),
                      "fingerprint": asdict(Fingerprint.of(model.config))},
            "keep_fraction": float(keep_fraction),
            "layer_keep_fractions": spec.fractions,
            "layers": spec.layers,
            "heads": spec.heads,
            "kv_heads": spec.kv_heads,
            "head_dim": spec.head_dim,
            "vocab": spec.vocab,
            "dtype": spec.dtype,
            "sink": spec.sink,
            "protect_last": spec.protect_last,
            "scorer": {"name": spec.scorer, "params": spec.scorer_params},
            "evict_distance": spec.evict_distance,
            "opset": opset,
            "exporter": exporter_version(),
            "max_context": context,
            "graphs": graphs,
        })
    log(f"engine written: {output} ({sum(f['bytes'] for f in manifest['files'].values()) / 2**20:.0f} MiB)")

    report = None
    if validate:
        from ..engines.validate import validate_engine
        from ..profile import atomic_write_text

        report = validate_engine(output, model=model, log=log, **(validate_options or {}))
        atomic_write_text(output / VALIDATION, json.dumps(report, indent=2) + "\n")
        log(f"validation {'passed' if report['passed'] else 'FAILED'}: {output / VALIDATION}")
    return BuildResult(output, manifest, report, time.perf_counter() - start)
