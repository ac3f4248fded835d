"""``prefixkv build``, ``generate`` and ``validate``: parsing, then one library call each.

    prefixkv build --model smollm2-135m --calibrate --keep 0.2 --output engines/smollm2-k20
    prefixkv build --model models/llava --profile profile.json --keep 0.2 --output engines/llava-k20
    prefixkv generate engines/smollm2-k20 --chat --prompt "What is the capital of France?"
    prefixkv generate engines/llava-k20 --image cat.png --prompt "<image>\\nWhat is shown?"
    prefixkv validate engines/smollm2-k20 --json report.json
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from .. import defaults
from ..engines import BACKENDS, load_runner
from ..engines.base import GenerationConfig
from ..engines.validate import validate_engine
from ..models import DEFAULT_MODEL, load_model
from ..pipeline import BuildConfig, BuildResult, build_engine
from ..vision import is_vision_engine
from ..vision.data import ImageError, load_image
from . import args as a


def register(subparsers) -> None:
    p = subparsers.add_parser("build", help="calibrate (or load) a profile, export, build and validate an engine")
    a.add_model(p, default=DEFAULT_MODEL)
    a.add_profile(p, calibrate=True)
    a.add_keep(p)
    a.add_output(p, None, "engine folder to write", dest="engine_dir")
    a.add_force(p, "engine folder")
    a.add_data(p, samples=defaults.CALIBRATION_SAMPLES,
               what="calibration prompts with --calibrate (vision: also the validation prompts)")
    a.add_scoring(p)
    a.add_rule(p)
    g = p.add_argument_group("with --tune")
    a.add_tasks(g)
    a.add_candidates(g)
    p.add_argument("--evict-distance", type=a.positive_int,
                   help="decode-phase eviction slot from the end of the compacted prompt (default: the profile's, "
                        f"{defaults.EVICT_DISTANCE} unless it records another)")
    p.add_argument("--max-context", type=a.positive_int, help="context limit recorded in the engine (default: the model's)")
    p.add_argument("--no-validate", action="store_true", help="skip validation against the PyTorch reference")
    a.add_backend(p, ("onnxruntime", "tensorrt"), "onnxruntime",
                  "onnxruntime: plain ONNX graphs; tensorrt: plugin-mode graphs + TensorRT engines (GPU)")
    p.add_argument("--weights", choices=defaults.WEIGHT_PRECISIONS, default=defaults.WEIGHTS,
                   help="ONNX Runtime engine weights: fp32 as exported, or int8 / int4 weight-only (onnxruntime's "
                        f"MatMulNBits, blocks of {defaults.WEIGHT_BLOCK}; validated by greedy agreement and PPL) "
                        "(default %(default)s)")
    a.add_tensorrt(p)
    a.add_validation(p)
    a.add_runtime(p)
    p.set_defaults(func=run_build)

    p = subparsers.add_parser("generate", help="generate text with an engine (images too for a vision engine)")
    p.add_argument("engine", help="engine folder (from `prefixkv build`)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text (vision: one <image> per --image unless --chat)")
    source.add_argument("--prompt-file", help="read the prompt from this UTF-8 text file ('-': standard input)")
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="an image file (repeatable, in prompt order)")
    a.add_chat(p)
    a.add_sampling(p)
    a.add_backend(p, BACKENDS, "auto", "auto (the engine's own: onnxruntime or tensorrt), onnxruntime, tensorrt, "
                                      "or torch (the PyTorch reference)")
    a.add_runtime(p)
    a.add_allow_failed(p)
    p.set_defaults(func=run_generate)

    p = subparsers.add_parser("validate", help="check an engine against the PyTorch reference")
    p.add_argument("engine", help="engine folder")
    a.add_model(p, help="reference model (default: the source recorded in the engine's manifest)")
    a.add_backend(p, ("auto", "onnxruntime", "tensorrt"), "auto", "runner under test: the engine's own, onnxruntime or tensorrt")
    a.add_validation(p)
    a.add_data(p, samples=None, tokens=False,
               what="vision engines: prompts with images (default: synthetic pictures)")
    a.add_runtime(p)
    p.set_defaults(func=run_validate)


def run_build(args) -> int:
    if not args.tune:
        given = [flag for flag, value, default in (("--candidates", args.candidates, None),
                                                   ("--tasks", tuple(args.tasks), ("continuation", "retrieval")))
                 if value != default]
        if given:
            raise a.UserError(f"{given[0]} narrows the tuning: it takes --tune")
    if args.tune:
        return _build_tuned(args)
    if args.profile:
        given = [flag for flag, value in (("--blend", args.blend), ("--min-layer-keep", args.min_layer_keep),
                                          ("--curve", args.curve), ("--scorer", args.scorer), ("--sink", args.sink))
                 if value is not None]
        given += [flag for flag, value, default in (("--window", args.window, defaults.WINDOW),
                                                    ("--samples", args.samples, defaults.CALIBRATION_SAMPLES),
                                                    ("--tokens", args.tokens, defaults.CALIBRATION_TOKENS),
                                                    ("--rule", args.rule, defaults.RULE)) if value != default]
        if given:
            raise a.UserError(f"{given[0]} shapes a new calibration (--calibrate); with --profile PATH the profile's own "
                              "settings are used (calibrate another with `prefixkv calibrate ...`)")
    names = a.scorer_names(args)
    if names is not None and len(names) != 1:
        raise a.UserError(f"build calibrates one --scorer, got {args.scorer!r} (`prefixkv calibrate` takes several)")
    a.check_writable(args.json_out, "the validation report")
    config = BuildConfig(
        model=args.model, engine_dir=args.engine_dir, keep_fraction=args.keep, profile=args.profile,
        calibration=a.calibration_config(args, (args.keep,)), force=args.force, validate=not args.no_validate,
        validation=a.validation_config(args), evict_distance=args.evict_distance, max_context=args.max_context,
        backend=args.backend, weights=args.weights, onnx_only=args.onnx_only, tensorrt=a.tensorrt_profile(args))
    return build_exit_code(build_engine(config))


def _build_tuned(args) -> int:
    """``build --tune``: ``prefixkv tune`` at --keep, its outputs next to the engine folder, then the build."""
    from .tune import run_tuning, tune_config, write_outputs

    given = [flag for flag, value in (("--scorer", args.scorer), ("--sink", args.sink), ("--blend", args.blend),
                                      ("--min-layer-keep", args.min_layer_keep), ("--curve", args.curve))
             if value is not None] + (["--rule"] if args.rule != defaults.RULE else [])
    if given:
        raise a.UserError(f"{given[0]} sets what --tune chooses; narrow the candidates with --candidates instead")
    engine_dir = Path(args.engine_dir)
    tuned = engine_dir.with_name(f"{engine_dir.name}_tune") / "profile.json"
    a.check_writable(tuned, "the tuned profile")
    a.check_writable(args.json_out, "the validation report")
    config = tune_config(args, (args.keep,))
    model, tokenizer = load_model(args.model)
    result = run_tuning(model, tokenizer, config)
    tuned.parent.mkdir(parents=True, exist_ok=True)
    for path in write_outputs(result, tuned):
        a.stderr(f"wrote {path}")
    a.stderr(f"tuned: {result.winner.label}; building it")
    build = BuildConfig(
        model=args.model, engine_dir=args.engine_dir, keep_fraction=args.keep, profile=result.profile, force=args.force,
        validate=not args.no_validate, validation=a.validation_config(args), evict_distance=args.evict_distance,
        max_context=args.max_context, backend=args.backend, weights=args.weights, onnx_only=args.onnx_only,
        tensorrt=a.tensorrt_profile(args))
    return build_exit_code(build_engine(build, model=model, tokenizer=tokenizer))


def build_exit_code(result: BuildResult) -> int:
    """Report a ``BuildResult`` on stderr: 0, or 1 when its validation failed."""
    print(f"engine: {result.path} ({result.seconds:.0f} s)", file=sys.stderr)
    if result.validation is not None and not result.validation["passed"]:
        print(f"error: validation failed; see {result.path / 'validation.json'}", file=sys.stderr)
        return 1
    return 0


def run_generate(args) -> int:
    start = time.perf_counter()
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))
    config.validate()
    prompt = prompt_text(args)
    pictures = [load_image(path) for path in args.image]  # fail before loading the engine
    if pictures and not is_vision_engine(args.engine):
        raise ImageError(f"{args.engine} is a text-only engine; it takes no image: drop --image, or build a vision "
                         "engine from a LLaVA model with `prefixkv build`")
    runner = load_runner(args.engine, backend=args.backend, threads=args.threads, prefill_chunk=args.prefill_chunk,
                         allow_failed_validation=args.allow_failed_validation,
                         **({"providers": args.providers} if args.providers else {}))
    vision = getattr(runner, "vision", None)
    extra = {"images": [pictures]} if vision else {}
    loaded = time.perf_counter()

    def stream(row: int, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    (result,) = runner.generate(prompt, config, chat=args.chat, callback=stream if args.stream else None, **extra)
    if not args.stream:
        sys.stdout.write(result.text)
    sys.stdout.write("\n")
    sys.stdout.flush()
    images = f" ({len(pictures)} image(s) of {vision['tokens_per_image']} tokens)" if vision else ""
    print(f"[{runner.name}] {result.prompt_tokens} prompt tokens{images}, {len(result.token_ids)} new tokens "
          f"({result.finish_reason}) in {time.perf_counter() - loaded:.2f} s; load {loaded - start:.1f} s", file=sys.stderr)
    return 0


def prompt_text(args) -> str:
    """The prompt of ``--prompt`` or ``--prompt-file`` ('-': standard input), as UTF-8 text."""
    if args.prompt is not None:
        try:  # bytes that are not UTF-8 reach argv as lone surrogates (Python's surrogateescape)
            args.prompt.encode("utf-8")
        except UnicodeEncodeError as err:
            bad = args.prompt[err.start].encode("utf-8", "surrogateescape")
            raise a.UserError(f"--prompt is not UTF-8 text (byte 0x{bad.hex()} at character {err.start}); "
                              "pass UTF-8 text, or --prompt-file with a UTF-8 file") from None
        return args.prompt
    if args.prompt_file == "-":
        where, data = "standard input", sys.stdin.buffer.read()
    else:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"no prompt file at {path}")
        where, data = str(path), path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise a.UserError(f"{where} is not UTF-8 text ({err.reason}: byte 0x{data[err.start]:02x} at offset {err.start}); "
                          "convert it to UTF-8 (e.g. iconv -t UTF-8)") from None


def run_validate(args) -> int:
    a.check_writable(args.json_out, "the validation report")
    vision = is_vision_engine(args.engine)
    if args.chat and not vision:
        raise a.UserError("--chat applies to a vision engine's image prompts; text validation prompts are used as they are")
    rows = a.data_config(args, args.validate_prompts).load(None, "evaluation", vision=vision)[0] if args.data else None
    config = a.validation_config(args, rows if vision else None)
    if rows is not None and not vision:
        config = replace(config, prompts=[r["prompt"] for r in rows])
    model = processor = None
    if args.model:
        model, processor = load_model(args.model)
    report = validate_engine(args.engine, config, model=model, processor=processor)
    print(json.dumps({"passed": report["passed"],
                      **{k: "reported" if v["status"] == "reported" else v["passed"] for k, v in report["checks"].items()}}))
    return 0 if report["passed"] else 1
