"""The build pipeline: model + retention profile -> validated engine folder.

    build_engine("smollm2-135m", "engines/smollm2-k20", keep_fraction=0.2)          # calibrates
    build_engine("smollm2-135m", "engines/smollm2-k20", 0.2, profile="profile.json")

1. refuse an existing output (unless ``force``) and bad settings, before any work
2. load the model; load (and check) or calibrate the retention profile
3. export prefill.onnx and decode.onnx with the per-layer fractions as graph constants
   (backend "tensorrt": the plugin-mode graphs of ``prefixkv.exporter.plugin_onnx``, then
   ``tensorrt/prefill.engine`` and ``tensorrt/decode.engine`` built from them, unless ``onnx_only``)
4. copy the tokenizer files, save profile.json, write manifest.json, rename into place
5. validate against the PyTorch reference (``prefixkv.engines.validate``) unless told not to
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..engine_folder import ENGINE_SUBDIR, VALIDATION, check_output, copy_tokenizer, staging, write_manifest
from .onnx import OPSET, export_engine_graphs, exporter_version, graph_spec, io_metadata

BACKENDS = ("onnxruntime", "tensorrt")
REPORT = "report"  # the calibration plots, inside the engine folder


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
                    calibrate_tokens: int = 512, scorer: str = "accumulated", sink: int = 4, log=_stderr,
                    calibration_out: list | None = None, min_layer_keep: float = 0.0, blend: float | None = None):
    """A ``RetentionProfile`` for ``model`` holding ``keep_fraction``: loaded from a path (checked
    against the model), taken as given, or calibrated on the built-in calibration split
    (then the ``Calibration``, with its curves, is appended to ``calibration_out``)."""
    from ..profile import Fingerprint, RetentionProfile

    fingerprint = Fingerprint.of(model.config)
    if profile is None:
        from ..calibration import calibrate
        from ..data import builtin_samples
        from ..scoring import make_scorer

        from ..search import DEFAULT_BLEND

        blend = DEFAULT_BLEND if blend is None else blend
        log(f"calibrating a profile: {calibrate_samples} samples x {calibrate_tokens} tokens, scorer {scorer}, "
            f"blend {blend:g}, min layer keep {min_layer_keep:g}")
        rows = builtin_samples(tokenizer, "calibration", n=calibrate_samples, tokens=calibrate_tokens, reference_tokens=0)
        samples = [_encode(tokenizer, r["prompt"]) for r in rows]
        scorer_obj = make_scorer(scorer)
        run = calibrate(model, samples, [keep_fraction], [scorer_obj], sink=sink, progress=False,
                        min_layer_keep=min_layer_keep, blend=blend,
                        data_name=f"builtin:calibration:{calibrate_samples}x{calibrate_tokens}")
        profile = run.profiles[scorer_obj.key]
        if calibration_out is not None:
            calibration_out.append(run)
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
    backend: str = "onnxruntime",
    tensorrt_options: dict | None = None,
    onnx_only: bool = False,
    min_layer_keep: float = 0.0,
    blend: float | None = None,
) -> BuildResult:
    """Build the engine for ``model_source`` at ``keep_fraction`` into ``output``.

    profile: None (calibrate), a path, or a ``RetentionProfile``.  model/tokenizer: an
    already loaded model (and its HF tokenizer) for ``model_source``, to skip loading.
    validate_options: keyword arguments of ``prefixkv.engines.validate.validate_engine``.
    backend: "onnxruntime" (plain ONNX graphs) or "tensorrt" (plugin-mode graphs and
    TensorRT engines; ``tensorrt_options`` go to ``build_tensorrt_engine``: precision,
    batch and sequence ranges).  onnx_only: with "tensorrt", write the plugin-mode graphs
    without building engines (no TensorRT needed; build them on the GPU machine).
    Returns a ``BuildResult``; ``result.passed`` is False when validation failed.
    """
    start = time.perf_counter()
    if not isinstance(keep_fraction, (int, float)) or not 0 < keep_fraction <= 1:
        raise ValueError(f"the keep fraction must be in (0, 1] (0.2 keeps 20% of the entries), got {keep_fraction!r}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if onnx_only and backend != "tensorrt":
        raise ValueError("--onnx-only applies to --backend tensorrt (the ONNX Runtime engine is ONNX already)")
    output = check_output(output, force)
    if backend == "tensorrt" and not onnx_only:
        from ..plugins.trt import import_tensorrt

        try:  # before any work: one line naming the fix
            import_tensorrt()
        except ImportError as err:
            raise ImportError(f"{err}; or pass --onnx-only to write the plugin-mode ONNX graphs without engines") from err
    if model is None:
        from ..models import load_model

        log(f"loading {model_source}")
        model, tokenizer = load_model(model_source)
    from ..models import model_folder
    from ..profile import Fingerprint

    folder = model_folder(model)
    if folder is None:
        raise ValueError(f"cannot find the local folder of {model_source!r} (for its tokenizer files); pass a model folder")
    calibrated: list = []
    profile = resolve_profile(profile, model, tokenizer, keep_fraction, calibrate_samples, calibrate_tokens, scorer, sink,
                              log, calibrated, min_layer_keep, blend)
    spec = graph_spec(model, profile, keep_fraction, evict_distance)
    if backend == "tensorrt":
        from .plugin_onnx import check_plugin_spec

        check_plugin_spec(spec)
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    context = int(max_context or getattr(text, "max_position_embeddings", 2048))
    window = getattr(text, "sliding_window", None)
    if window and context > int(window):  # Mistral: exact only while the whole context fits the window
        log(f"context limited to the model's sliding window ({window} tokens): the engine attends over all kept entries")
        context = int(window)

    with staging(output, force) as tmp:
        tensorrt_info = None
        if backend == "tensorrt":
            from .plugin_onnx import export_plugin_graphs

            export_plugin_graphs(model, spec, tmp, opset, log)
            if not onnx_only:
                tensorrt_info = build_tensorrt_engines(tmp, tensorrt_options or {}, log)
        else:
            export_engine_graphs(model, spec, tmp, opset, log)
        copy_tokenizer(folder, tmp)
        profile.save(tmp / "profile.json")
        _plot_profile(profile, calibrated[0] if calibrated else None, keep_fraction, tmp / REPORT)
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
            "backend": backend,
            "tensorrt": tensorrt_info,
        })
    log(f"engine written: {output} ({sum(f['bytes'] for f in manifest['files'].values()) / 2**20:.0f} MiB); "
        f"calibration plots in {output / REPORT}/")

    report = None
    if validate and backend == "tensorrt" and onnx_only:
        log("validation skipped: no TensorRT engines were built (--onnx-only); build and validate on a GPU machine")
        validate = False
    if validate:
        from ..engines.validate import validate_engine
        from ..profile import atomic_write_text

        report = validate_engine(output, model=model, log=log, backend=backend, **(validate_options or {}))
        atomic_write_text(output / VALIDATION, json.dumps(report, indent=2) + "\n")
        log(f"validation {'passed' if report['passed'] else 'FAILED'}: {output / VALIDATION}")
    return BuildResult(output, manifest, report, time.perf_counter() - start)


def _plot_profile(profile, calibration, keep_fraction: float, folder: Path) -> None:
    """The profile's per-layer keep fractions and, when calibrated here, the per-layer
    cumulative-priority (Lorenz) curves with their Gini coefficients, as PNGs in ``folder``."""
    from .. import report
    from ..calibration import Calibration
    from ..scoring import make_scorer

    if calibration is None:
        key = make_scorer(profile.scorer, **profile.scorer_params).key
        calibration = Calibration(profiles={key: profile})
    report.plot_calibration(calibration, [keep_fraction], folder)


def build_tensorrt_engines(folder: Path, options: dict, log=_stderr) -> dict:
    """``tensorrt/prefill.engine`` and ``tensorrt/decode.engine`` from the plugin-mode graphs in
    ``folder``.  options: precision (fp16), max_batch (8), opt_seq (512), max_seq (4096).

    Optimization profiles: prefill over (batch, prompt length); decode over (batch, every
    layer's past length), each layer's range that of the prompt it can hold."""
    from .tensorrt import build_tensorrt_engine

    precision = options.get("precision", "fp16")
    max_batch, opt_seq, max_seq = int(options.get("max_batch", 8)), int(options.get("opt_seq", 512)), int(options.get("max_seq", 4096))
    out, built = folder / ENGINE_SUBDIR, {}
    for graph in ("prefill", "decode"):
        onnx_path = folder / f"{graph}.onnx"
        dims = None
        if graph == "decode":
            import onnx

            names = {d.dim_param for i in onnx.load(str(onnx_path), load_external_data=False).graph.input
                     for d in i.type.tensor_type.shape.dim if d.dim_param.startswith("past_length_")}
            dims = {name: (1, opt_seq, max_seq) for name in names}
        start = time.perf_counter()
        path = build_tensorrt_engine(onnx_path, out, precision=precision, max_batch=max_batch, opt_seq=opt_seq,
                                     max_seq=max_seq, dims=dims, engine_name=f"{graph}.engine")
        log(f"built TensorRT {graph} engine ({precision}) in {time.perf_counter() - start:.0f} s -> {path}")
        built[graph] = f"{ENGINE_SUBDIR}/{graph}.engine"
    return {"engines": built, "precision": precision, "max_batch": max_batch, "opt_seq": opt_seq, "max_seq": max_seq}
