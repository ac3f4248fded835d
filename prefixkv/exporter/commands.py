"""Engine subcommands: ``build``, ``generate`` and ``validate``.  Parsing and delegation only.

    prefixkv build --model smollm2-135m --profile --keep 0.2 --output engines/smollm2-k20
    prefixkv generate engines/smollm2-k20 --chat --prompt "What is the capital of France?"
    prefixkv validate engines/smollm2-k20 --json report.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
import time


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"the keep fraction is a number in (0, 1] (0.2 keeps 20%), got {text!r}") from err
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"the keep fraction must be in (0, 1] (0.2 keeps 20%), got {text!r}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_build_arguments(p: argparse.ArgumentParser) -> None:
    from ..models import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help="HF folder, .gguf file, hub id or built-in name (default %(default)s)")
    p.add_argument("--profile", nargs="?", const=None, default=None, metavar="PATH",
                   help="retention profile; without PATH (or without the flag) one is calibrated for --keep")
    p.add_argument("--keep", type=_fraction, default=0.2, help="keep fraction (0.2 keeps 20%% of the entries)")
    p.add_argument("--output", required=True, help="engine folder to write")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--samples", type=_positive, default=16, help="calibration samples (when calibrating)")
    p.add_argument("--tokens", type=_positive, default=512, help="tokens per calibration sample")
    p.add_argument("--scorer", default="accumulated", help="importance score when calibrating")
    p.add_argument("--sink", type=int, default=4, help="first tokens always kept (when calibrating)")
    p.add_argument("--blend", type=float, help="when calibrating: 1 = PrefixKV lengths (the paper), 0 = uniform "
                                              "(default 0.5, measured best; see README)")
    p.add_argument("--min-layer-keep", type=float, default=0.0,
                   help="when calibrating: per-layer floor, a fraction of the uniform share")
    p.add_argument("--evict-distance", type=int, default=25, help="decode-phase eviction slot from the end of the compacted prompt")
    p.add_argument("--max-context", type=_positive, help="context limit recorded in the engine (default: the model's)")
    p.add_argument("--no-validate", action="store_true", help="skip validation against the PyTorch reference")
    g = p.add_argument_group("backend")
    g.add_argument("--backend", choices=("onnxruntime", "tensorrt"), default="onnxruntime",
                   help="onnxruntime: plain ONNX graphs (default); tensorrt: plugin-mode graphs + TensorRT engines (GPU)")
    g.add_argument("--onnx-only", action="store_true",
                   help="with --backend tensorrt: write the plugin-mode ONNX graphs only (no TensorRT needed)")
    g.add_argument("--precision", choices=("fp16", "bf16", "fp32"), default="fp16", help="TensorRT engine precision")
    g.add_argument("--max-batch", type=_positive, default=8, help="TensorRT optimization profile: largest batch")
    g.add_argument("--opt-seq", type=_positive, default=512, help="TensorRT optimization profile: typical prompt length")
    g.add_argument("--max-seq", type=_positive, default=4096, help="TensorRT optimization profile: longest prompt / cache")
    _add_validation_arguments(p)


def _add_validation_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("validation")
    g.add_argument("--validate-prompts", type=_positive, default=3, help="prompts for the graph and generation checks")
    g.add_argument("--validate-tokens", type=_positive, default=320, help="tokens per validation prompt")
    g.add_argument("--validate-new-tokens", type=_positive, default=32, help="greedy tokens compared per prompt")
    g.add_argument("--quality-samples", type=int, default=4, help="evaluation samples for PPL / ROUGE-L (0: skip)")
    g.add_argument("--max-ppl-increase", type=float, help="fail when the PPL rises more than this (0.1 = 10%%)")
    g.add_argument("--min-rouge-l", type=float, help="fail when ROUGE-L vs the full cache is lower")
    g.add_argument("--json", dest="json_out", help="also write the validation report here")
    g.add_argument("--providers", help="ONNX Runtime providers, comma-separated: cpu, cuda, tensorrt")
    g.add_argument("--threads", type=_positive, help="ONNX Runtime intra-op threads")


def _validate_options(args) -> dict:
    checks = ("graph", "generation") + (("quality",) if args.quality_samples > 0 else ())
    return dict(checks=checks, providers=args.providers, threads=args.threads, n_prompts=args.validate_prompts,
                prompt_tokens=args.validate_tokens, max_new_tokens=args.validate_new_tokens,
                quality_samples=max(args.quality_samples, 1), max_ppl_increase=args.max_ppl_increase,
                min_rouge_l=args.min_rouge_l, json_path=args.json_out)


def register(subparsers) -> None:
    p = subparsers.add_parser("build", help="calibrate (or load) a profile, export, build and validate an engine")
    add_build_arguments(p)
    p.set_defaults(func=run_build)

    p = subparsers.add_parser("generate", help="generate text with an engine")
    p.add_argument("engine", help="engine folder (from `prefixkv build`)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument("--prompt-file", help="read the prompt from this UTF-8 text file ('-': standard input)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=_positive, default=64)
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--backend", default="auto",
                   help="auto (the engine's own: onnxruntime or tensorrt), onnxruntime, tensorrt, or torch (the PyTorch reference)")
    p.add_argument("--providers", help="ONNX Runtime providers, comma-separated: cpu, cuda, tensorrt")
    p.add_argument("--threads", type=_positive, help="intra-op threads")
    p.set_defaults(func=run_generate)

    p = subparsers.add_parser("validate", help="check an engine against the PyTorch reference")
    p.add_argument("engine", help="engine folder")
    p.add_argument("--model", help="reference model (default: the source recorded in the engine's manifest)")
    p.add_argument("--backend", default="auto", help="runner under test: auto (the engine's own), onnxruntime or tensorrt")
    _add_validation_arguments(p)
    p.set_defaults(func=run_validate)


def run_build(args) -> int:
    from .build import build_engine

    if args.profile and (args.blend is not None or args.min_layer_keep):
        raise ValueError("--blend and --min-layer-keep shape a new calibration; with --profile PATH the profile's own "
                         "allocation is used (calibrate another with `prefixkv calibrate --blend ...`)")

    result = build_engine(
        args.model, args.output, args.keep, profile=args.profile, calibrate_samples=args.samples,
        calibrate_tokens=args.tokens, scorer=args.scorer, sink=args.sink, force=args.force,
        validate=not args.no_validate, validate_options=_validate_options(args),
        evict_distance=args.evict_distance, max_context=args.max_context, backend=args.backend,
        blend=args.blend, min_layer_keep=args.min_layer_keep,
        onnx_only=args.onnx_only,
        tensorrt_options=dict(precision=args.precision, max_batch=args.max_batch, opt_seq=args.opt_seq,
                              max_seq=args.max_seq),
    )
    return build_exit_code(result)


def build_exit_code(result) -> int:
    """Report a ``BuildResult`` on stderr: 0, or 1 when its validation failed."""
    print(f"engine: {result.path} ({result.seconds:.0f} s)", file=sys.stderr)
    if result.validation is not None and not result.validation["passed"]:
        print(f"error: validation failed; see {result.path / 'validation.json'}", file=sys.stderr)
        return 1
    return 0


def run_generate(args) -> int:
    from ..engines import load_runner

    start = time.perf_counter()
    kwargs = {"providers": args.providers} if args.providers else {}
    runner = load_runner(args.engine, backend=args.backend, threads=args.threads, **kwargs)
    return print_generation(runner, prompt_text(args), args, args.chat, start)


def print_generation(runner, prompt: str, args, chat: bool, start: float, describe=None, **generate_kwargs) -> int:
    """Generate with the CLI's sampling arguments: only the text on stdout (streamed with
    ``--stream``), a one-line summary on stderr.  describe(result): extra summary text."""
    from ..engines.base import GenerationConfig

    config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))
    config.validate()
    loaded = time.perf_counter()

    def stream(row: int, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    (result,) = runner.generate(prompt, config, chat=chat, callback=stream if args.stream else None, **generate_kwargs)
    if not args.stream:
        sys.stdout.write(result.text)
    sys.stdout.write("\n")
    sys.stdout.flush()
    extra = describe(result) if describe else ""
    print(f"[{runner.name}] {result.prompt_tokens} prompt tokens{extra}, {len(result.token_ids)} new tokens "
          f"({result.finish_reason}) in {time.perf_counter() - loaded:.2f} s; load {loaded - start:.1f} s", file=sys.stderr)
    return 0


def prompt_text(args) -> str:
    """The prompt of ``--prompt`` or ``--prompt-file`` ('-': standard input)."""
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file == "-":
        return sys.stdin.read()
    path = Path(args.prompt_file)
    if not path.is_file():
        raise FileNotFoundError(f"no prompt file at {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from err


def run_validate(args) -> int:
    from ..engines.validate import validate_engine

    model = None
    if args.model:
        from ..models import load_model

        model, _ = load_model(args.model)
    report = validate_engine(args.engine, model=model, backend=args.backend, **_validate_options(args))
    print(json.dumps({"passed": report["passed"], **{k: v["passed"] for k, v in report["checks"].items()}}))
    return 0 if report["passed"] else 1
