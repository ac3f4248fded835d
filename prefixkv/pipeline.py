"""The pipeline, text and vision alike: data -> calibrated profile -> exported graphs -> engine folder -> validation.

    build_engine(BuildConfig("smollm2-135m", "engines/smollm2-k20", 0.2))                        # calibrates
    build_engine(BuildConfig("smollm2-135m", "engines/smollm2-k20", 0.2, profile="profile.json"))
    build_engine(BuildConfig("models/llava", "engines/llava-k20", 0.2,
                             calibration=CalibrationConfig(data=DataConfig("llava.json"))))

The modality is chosen once, from the model: a vision-language model's prompts carry images
(its data must hold them), its engine gets the vision graph and an image-taking prefill
graph, and everything else is the same code.  Each stage takes one validated config:

1. ``calibrate_model``: prompts from ``DataConfig`` -> a ``Calibration`` (profiles per scorer);
2. ``resolve_profile``: a profile for the build, loaded (checked against the model) or calibrated;
3. ``build_engine``: export the graphs with the per-layer lengths baked in, write the folder
   atomically (``engine_folder.staging``), then validate it (``engines.validate``).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from . import architectures, defaults, report
from .calibration import Calibration, calibrate
from .data import builtin_samples, load_jsonl
from .engine_folder import (
    ENGINE_SUBDIR,
    LANGUAGE_GRAPHS,
    VALIDATION,
    atomic_write_text,
    check_output,
    copy_tokenizer,
    mark_validation,
    output_lock,
    staging,
    usual_permissions,
    write_manifest,
)
from .engines.validate import ValidationConfig, validate_engine
from .evaluation import pad_token_id
from .exporter.onnx import (
    OPSET,
    export_engine_graphs,
    exporter_version,
    graph_spec,
    io_metadata,
)
from .exporter.plugin_onnx import check_plugin_spec, export_plugin_graphs
from .exporter.quantize import quantize_graphs
from .exporter.tensorrt import build_tensorrt_engine
from .models import load_model, model_folder
from .profile import Fingerprint, RetentionProfile
from .scoring import make_scorer
from .search import PAPER, SearchSettings
from .sensitivity import calibrate_sensitivity
from .vision import is_vision_model
from .vision.calibration import calibrate_vision
from .vision.data import load_samples
from .vision.export import (
    TextView,
    copy_processor,
    export_vision_engine_graphs,
    image_geometry,
)

BACKENDS = ("onnxruntime", "tensorrt")
REPORT = "report"  # the calibration plots, inside the engine folder


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_keep_fraction(value, name: str = "the keep fraction") -> float:
    """A keep fraction in (0, 1], as a float (ValueError naming the rule otherwise)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1] (0.2 keeps 20% of the entries), got {value!r}")
    return float(value)


# -- data --------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    """Where prompts come from.

    path: a JSONL file (``{"prompt", "reference"?, "image"?}`` per line) or, for vision models,
    LLaVA conversations (JSON/JSONL); None: the built-in text's split (text models only).
    samples: how many (the first N); tokens: prompt tokens of a built-in sample.
    image_folder / first_turn_only / chat: LLaVA data options and the chat template (vision).
    """

    path: str | Path | None = None
    samples: int = defaults.CALIBRATION_SAMPLES
    tokens: int = defaults.CALIBRATION_TOKENS
    image_folder: str | Path | None = None
    first_turn_only: bool = False
    chat: bool = False

    def __post_init__(self):
        _positive("the number of samples", self.samples)
        _positive("the tokens per sample", self.tokens)

    def load(self, tokenizer, split: str, vision: bool, reference_tokens: int = 0) -> tuple[list[dict], str]:
        """(samples, a name of the data for the profile) for ``split`` ("calibration" / "evaluation")."""
        if vision:
            if self.path is None:
                raise ValueError("vision-language models need image data: pass --data with LLaVA conversations "
                                 "(JSON/JSONL) or prefixkv JSONL with an \"image\" field")
            rows = load_samples(self.path, self.image_folder, self.first_turn_only)[: self.samples]
            return rows, f"{self.path} ({len(rows)} samples)"
        if self.path is not None:
            return load_jsonl(self.path)[: self.samples], str(self.path)
        rows = builtin_samples(tokenizer, split, n=self.samples, tokens=self.tokens, reference_tokens=reference_tokens)
        return rows, f"builtin:{split}:{self.samples}x{self.tokens}"


def check_chat(chat: bool, vision: bool) -> None:
    """``--chat`` wraps a vision-language model's image prompts; a text model's prompts are used as they are."""
    if chat and not vision:
        raise ValueError("--chat applies to a vision-language model's image prompts; a text model's prompts are used as they are")


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (a transformers tokenizer or ``prefixkv.tokenizer``)."""
    try:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    except TypeError:
        return list(tokenizer.encode(text))


# -- calibration -------------------------------------------------------------------------------
@dataclass
class CalibrationConfig:
    """One calibration run: keep fractions, importance scores, the search's settings (the
    paper's by default) and data."""

    keep_fractions: tuple[float, ...] = defaults.CALIBRATION_KEEP_FRACTIONS
    scorers: tuple[str, ...] = (defaults.SCORER,)
    window: int = defaults.WINDOW
    search: SearchSettings = PAPER
    data: DataConfig = field(default_factory=DataConfig)
    rule: str = defaults.RULE  # prefix-search (the paper's) or sensitivity (prefixkv.sensitivity)

    def __post_init__(self):
        if self.rule not in defaults.CALIBRATED_RULES:
            raise ValueError(f"the allocation rule must be one of {', '.join(defaults.CALIBRATED_RULES)}, got {self.rule!r}")
        self.keep_fractions = tuple(check_keep_fraction(k, "keep fractions") for k in self.keep_fractions)
        if not self.keep_fractions:
            raise ValueError("give at least one keep fraction to calibrate")
        self.scorers = tuple(self.scorers)
        if not self.scorers:
            raise ValueError("give at least one importance score (--scorer)")
        for name in self.scorers:
            self.scorer(name)  # ValueError naming the known scorers
        _positive("the window", self.window)
        if not isinstance(self.search, SearchSettings):
            raise ValueError(f"search must be a SearchSettings, got {self.search!r}")
        if self.rule == "sensitivity":
            shaped = [f"--{name.replace('_', '-')}" for name in ("curve", "min_layer_keep", "blend")
                      if getattr(self.search, name) != defaults.PAPER_SEARCH[name]]
            if shaped:
                raise ValueError(f"{shaped[0]} shapes the prefix search; the sensitivity rule does not use it (drop it, "
                                 "or use --rule prefix-search)")

    def scorer(self, name: str):
        return make_scorer(name, window=self.window) if name == "window" else make_scorer(name)


def describe_rule(config: CalibrationConfig) -> str:
    """How ``config`` chooses the per-layer lengths, in words, for a log line."""
    if config.rule == "sensitivity":
        return (f"allocation rule sensitivity (beyond the paper: the measured harm of compressing each layer), "
                f"sink {config.search.sink}")
    departures = config.search.departures()
    return "search settings: " + (f"the paper's except {', '.join(departures)}" if departures else
                                  f"the paper's (curve {defaults.CURVE}, sink {defaults.SINK}, blend {defaults.BLEND:g}, no floor)")


def calibrate_model(model, tokenizer, config: CalibrationConfig, progress: bool = True) -> Calibration:
    """Calibrate one profile per scorer of ``config`` on its data (images too for a vision model).

    tokenizer: the tokenizer, or the processor of a vision-language model.  A vision model's
    result is a ``VisionCalibration`` (the image share of the kept entries per layer, too)."""
    vision = is_vision_model(model)
    check_chat(config.data.chat, vision)
    if vision and config.rule != defaults.RULE:
        raise ValueError(f"the {config.rule} rule calibrates text models only for now; use the prefix search for a vision model")
    rows, name = config.data.load(tokenizer, "calibration", vision)
    scorers = [config.scorer(n) for n in config.scorers]
    if vision:
        return calibrate_vision(model, tokenizer, rows, config.keep_fractions, scorers, search=config.search,
                                chat=config.data.chat, progress=progress, data_name=name)
    samples = [encode(tokenizer, r["prompt"]) for r in rows]
    if config.rule == "sensitivity":
        run = Calibration(profiles={})
        for scorer in scorers:
            run.profiles.update(calibrate_sensitivity(model, samples, config.keep_fractions, scorer, search=config.search,
                                                      pad_id=pad_token_id(model, tokenizer), progress=progress,
                                                      data_name=name).profiles)
        return run
    return calibrate(model, samples, config.keep_fractions, scorers, search=config.search, progress=progress,
                     data_name=name)


def resolve_profile(profile, model, tokenizer, keep_fraction: float, calibration: CalibrationConfig | None = None,
                    log=_stderr) -> tuple[RetentionProfile, Calibration | None]:
    """A profile for ``model`` holding ``keep_fraction``: loaded from a path (checked against the
    model), taken as given (checked), or calibrated (``calibration``, at that keep fraction only;
    then also the ``Calibration``, with its curves)."""
    fingerprint = Fingerprint.of(model.config)
    run = None
    if profile is None:
        config = calibration or CalibrationConfig()
        config = replace(config, keep_fractions=(keep_fraction,), scorers=config.scorers[:1])
        log(f"calibrating a profile: {config.data.samples} samples, scorer {config.scorers[0]}, " + describe_rule(config))
        run = calibrate_model(model, tokenizer, config, progress=False)
        profile = next(iter(run.profiles.values()))
    elif isinstance(profile, (str, Path)):
        profile = RetentionProfile.load(profile, fingerprint)
    else:
        profile.check_model(fingerprint)
    profile.layer_fractions(keep_fraction)  # ProfileError naming the calibrated fractions
    return profile, run


# -- the build ---------------------------------------------------------------------------------
@dataclass
class BuildConfig:
    """One engine build.

    model: HF folder, .gguf file, hub id or built-in name.  engine_dir: the folder to write.
    profile: a path or ``RetentionProfile``; None calibrates one (``calibration``) at
    ``keep_fraction``.  backend: "onnxruntime" (plain ONNX graphs) or "tensorrt" (plugin-mode
    graphs and TensorRT engines built with ``tensorrt``; ``onnx_only`` writes the graphs
    without building engines).  validation: the checks run after the build unless
    ``validate`` is False.  max_context: the context recorded (default: the model's).
    """

    model: str
    engine_dir: str | Path
    keep_fraction: float = defaults.KEEP_FRACTION
    profile: str | Path | RetentionProfile | None = None
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    force: bool = False
    validate: bool = True
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    evict_distance: int | None = None  # None: the profile's decode rule (25 unless it records another)
    max_context: int | None = None
    backend: str = "onnxruntime"
    weights: str = defaults.WEIGHTS
    onnx_only: bool = False
    tensorrt: defaults.TensorRTProfile = defaults.TENSORRT
    opset: int = OPSET

    def __post_init__(self):
        self.keep_fraction = check_keep_fraction(self.keep_fraction)
        self.engine_dir = Path(self.engine_dir)
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.onnx_only and self.backend != "tensorrt":
            raise ValueError("--onnx-only applies to --backend tensorrt (the ONNX Runtime engine is ONNX already)")
        if self.evict_distance is not None:
            _positive("the evict distance", self.evict_distance)
        if self.weights not in defaults.WEIGHT_PRECISIONS:
            raise ValueError(f"weights must be one of {', '.join(defaults.WEIGHT_PRECISIONS)}, got {self.weights!r}")
        if self.weights != "fp32" and self.backend != "onnxruntime":
            raise ValueError("--weights int8/int4 applies to the ONNX Runtime engine; TensorRT builds set --precision")
        if self.max_context is not None:
            _positive("the maximum context", self.max_context)


class _KeptAside(Exception):
    """A --force build that failed validation, moved aside: the result to return."""

    def __init__(self, result):
        super().__init__(str(result.path))
        self.result = result


@dataclass
class BuildResult:
    path: Path
    manifest: dict
    validation: dict | None
    seconds: float

    @property
    def passed(self) -> bool:
        return self.validation is None or bool(self.validation.get("passed"))


def build_engine(config: BuildConfig, model=None, tokenizer=None, log=_stderr) -> BuildResult:
    """Build the engine ``config`` describes; returns a ``BuildResult`` (``passed`` False when
    validation failed).  model/tokenizer: the model of ``config.model`` already loaded (and its
    tokenizer, or processor for a vision model), to skip loading.

    The build holds the output's lock throughout (a second build into the same folder is
    refused), and checks the output first thing under it (``--force`` replaces only an
    engine folder)."""
    with output_lock(config.engine_dir):
        return _build(config, model, tokenizer, log)


def _build(config: BuildConfig, model, tokenizer, log) -> BuildResult:
    start = time.perf_counter()
    output = check_output(config.engine_dir, config.force)
    if config.backend == "tensorrt" and not config.onnx_only:
        from .plugins.trt import import_tensorrt

        try:  # before any work: one line naming the fix
            import_tensorrt()
        except ImportError as err:
            raise ImportError(f"{err}; or pass --onnx-only to write the plugin-mode ONNX graphs without engines") from err
    if model is None:
        log(f"loading {config.model}")
        model, tokenizer = load_model(config.model)
    vision = is_vision_model(model)
    architectures.check(model, export=True)  # before any work: the exporter implements this layout
    check_chat(config.calibration.data.chat or config.validation.chat, vision)
    if vision and config.backend != "onnxruntime":
        raise ValueError("vision engines are built for onnxruntime only (no TensorRT vision graph yet); drop --backend tensorrt")
    folder = model_folder(model)
    if folder is None:
        raise ValueError(f"cannot find the local folder of {config.model!r} (for its tokenizer files); pass a model folder")
    if vision and config.profile is None and config.calibration.data.path is None:
        raise ValueError("a vision engine needs a retention profile calibrated on image prompts: pass --profile PATH, "
                         "or --calibrate with --data holding LLaVA conversations")
    profile, run = resolve_profile(config.profile, model, tokenizer, config.keep_fraction, config.calibration, log)
    context = _context(model, config.max_context, log)
    if vision:
        spec = graph_spec(TextView(model), profile, config.keep_fraction, config.evict_distance, context)
        geometry = image_geometry(model, tokenizer)
    else:
        spec = graph_spec(model, profile, config.keep_fraction, config.evict_distance, context)
        geometry = None
    if config.backend == "tensorrt":
        check_plugin_spec(spec)
    validation = _validation(config, vision, tokenizer, log)

    try:
        with staging(output, config.force, log) as tmp:
            tensorrt_info = None
            if config.backend == "tensorrt":
                export_plugin_graphs(model, spec, tmp, config.opset, log)
                if not config.onnx_only:
                    tensorrt_info = build_tensorrt_engines(tmp, config.tensorrt, log)
            elif vision:
                export_vision_engine_graphs(model, spec, geometry, tmp, config.opset, log)
                copy_processor(folder, tmp)
            else:
                export_engine_graphs(model, spec, tmp, config.opset, log)
            language = tuple(g for g in LANGUAGE_GRAPHS if (tmp / f"{g}.onnx").is_file())  # those exported
            # the language model's weights (a vision engine's image encoder stays as exported)
            weights = quantize_graphs(tmp, [g for g in language if g != "compact"], config.weights, log)
            copy_tokenizer(folder, tmp)
            profile.save(tmp / "profile.json")
            _plot_profile(profile, run, config.keep_fraction, tmp / REPORT)
            graphs = {g: {"file": f"{g}.onnx", "data": f"{g}.onnx.data" if (tmp / f"{g}.onnx.data").is_file() else None,
                          **io_metadata(tmp / f"{g}.onnx")}
                      for g in (("vision",) if vision else ()) + language}
            manifest = write_manifest(tmp, {
                "model": {"source": str(config.model), "folder": str(folder), "fingerprint": asdict(Fingerprint.of(model.config))},
                "keep_fraction": config.keep_fraction,
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
                "opset": config.opset,
                "exporter": exporter_version(),
                "max_context": context,
                "graphs": graphs,
                "backend": config.backend,
                "tensorrt": tensorrt_info,
                **({"weights": weights} if weights is not None else {}),
                **({"vision": geometry} if vision else {}),
            })
            report = None
            if validation is not None:  # before the folder replaces anything
                report = validate_engine(tmp, validation, model=model, processor=tokenizer if vision else None, log=log)
                report["engine"] = str(output)
                atomic_write_text(tmp / VALIDATION, json.dumps(report, indent=2) + "\n")
                manifest = mark_validation(tmp, report)
                if not report["passed"] and output.exists():  # --force over an engine: keep it, keep the new build aside
                    failed = output.with_name(f"{output.name}.failed-{time.strftime('%Y%m%d-%H%M%S')}")
                    report["engine"] = str(failed)
                    atomic_write_text(tmp / VALIDATION, json.dumps(report, indent=2) + "\n")
                    usual_permissions(tmp)
                    os.replace(tmp, failed)
                    log(f"validation FAILED: {output} was left as it was; the new build is in {failed} (see its {VALIDATION})")
                    raise _KeptAside(BuildResult(failed, manifest, report, time.perf_counter() - start))
    except _KeptAside as kept:  # staging did not swap: the engine that was there stays
        return kept.result
    log(f"engine written: {output} ({sum(f['bytes'] for f in manifest['files'].values()) / 2**20:.0f} MiB); "
        f"calibration plots in {output / REPORT}/")
    if report is not None:
        log(f"validation {'passed' if report['passed'] else 'FAILED'}: {output / VALIDATION}")
    return BuildResult(output, manifest, report, time.perf_counter() - start)



def _validation(config: BuildConfig, vision: bool, tokenizer, log) -> ValidationConfig | None:
    """The validation the build runs (None: none), with a vision model's prompts from its data."""
    if not config.validate:
        return None
    if config.backend == "tensorrt" and config.onnx_only:
        log("validation skipped: no TensorRT engines were built (--onnx-only); build and validate on a GPU machine")
        return None
    validation = config.validation
    data = config.calibration.data
    if vision and validation.samples is None and data.path is not None:  # the image prompts of the data
        rows, _ = data.load(tokenizer, "evaluation", vision)
        validation = replace(validation, samples=rows[: validation.n_prompts], chat=validation.chat or data.chat)
    if config.backend != "onnxruntime" and validation.backend == "auto":
        validation = replace(validation, backend=config.backend)
    return validation

def _context(model, max_context: int | None, log) -> int:
    """The context recorded in the engine: the model's (or ``max_context``), within its sliding window."""
    text = architectures.text_config(model.config)
    context = int(max_context or getattr(text, "max_position_embeddings", 2048))
    window = getattr(text, "sliding_window", None)
    if window and context > int(window):  # Mistral: exact only while the whole context fits the window
        log(f"context limited to the model's sliding window ({window} tokens): the engine attends over all kept entries")
        context = int(window)
    return context


def _plot_profile(profile: RetentionProfile, calibration: Calibration | None, keep_fraction: float, folder: Path) -> None:
    """The profile's per-layer keep fractions and, when calibrated here, the per-layer
    cumulative-priority (Lorenz) curves with their Gini coefficients, as PNGs in ``folder``."""
    if calibration is None:
        key = make_scorer(profile.scorer, **profile.scorer_params).key
        calibration = Calibration(profiles={key: profile})
    report.plot_calibration(calibration, [keep_fraction], folder)


def build_tensorrt_engines(folder: Path, options: defaults.TensorRTProfile, log=_stderr) -> dict:
    """``tensorrt/prefill.engine`` and ``tensorrt/decode.engine`` from the plugin-mode graphs in ``folder``.

    Optimization profiles: prefill over (batch, prompt length); decode over (batch, every
    layer's past length), each layer's range that of the prompt it can hold."""
    import onnx

    out, built = folder / ENGINE_SUBDIR, {}
    for graph in ("prefill", "decode"):
        onnx_path = folder / f"{graph}.onnx"
        dims = None
        if graph == "decode":
            names = {d.dim_param for i in onnx.load(str(onnx_path), load_external_data=False).graph.input
                     for d in i.type.tensor_type.shape.dim if d.dim_param.startswith("past_length_")}
            dims = {name: (1, options.opt_seq, options.max_seq) for name in names}
        start = time.perf_counter()
        path = build_tensorrt_engine(onnx_path, out, precision=options.precision, max_batch=options.max_batch,
                                     opt_seq=options.opt_seq, max_seq=options.max_seq, dims=dims, engine_name=f"{graph}.engine")
        log(f"built TensorRT {graph} engine ({options.precision}) in {time.perf_counter() - start:.0f} s -> {path}")
        built[graph] = f"{ENGINE_SUBDIR}/{graph}.engine"
    return {"engines": built, **asdict(options)}
