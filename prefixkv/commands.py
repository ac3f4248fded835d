"""Core subcommands: ``calibrate``, ``eval`` and ``bench``.  Parsing and delegation only."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .models import DEFAULT_MODEL
from .search import DEFAULT_BLEND


def _fractions(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"keep fractions are comma-separated numbers in (0, 1], got {text!r}") from err
    if not values or any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"keep fractions must be in (0, 1] (0.2 keeps 20%), got {text!r}")
    return values


def _fraction(text: str) -> float:
    values = _fractions(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"give one keep fraction, got {text!r}")
    return values[0]


def register(subparsers) -> None:
    p = subparsers.add_parser("calibrate", help="calibrate a PrefixKV retention profile")
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF folder, .gguf file, hub id or built-in name")
    p.add_argument("--keep", type=_fractions, default=_fractions("0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9"),
                   help="keep fractions to calibrate, comma-separated (0.2 keeps 20%% of the entries)")
    p.add_argument("--samples", type=int, default=16, help="calibration samples")
    p.add_argument("--tokens", type=int, default=512, help="tokens per built-in sample")
    p.add_argument("--data", help="JSONL file ({\"prompt\": ...} per line); default: the built-in calibration split")
    p.add_argument("--scorer", default="accumulated",
                   help="importance score(s), comma-separated: accumulated, window, last-query, key-norm")
    p.add_argument("--window", type=int, default=8, help="query rows of the window scorer")
    p.add_argument("--sink", type=int, default=4, help="first tokens always kept")
    p.add_argument("--min-layer-keep", type=float, default=0.0, help="per-layer floor, a fraction of the uniform share")
    p.add_argument("--blend", type=float, default=DEFAULT_BLEND,
                   help="1 = PrefixKV lengths (the paper), 0 = uniform lengths (default %(default)s: measured best)")
    p.add_argument("--output", default="profile.json", help="profile path (more scorers: NAME.SCORER.json)")
    p.add_argument("--plots", help="folder for the PNG plots (default: OUTPUT_report/)")
    p.add_argument("--force", action="store_true", help="overwrite an existing profile")
    p.set_defaults(func=run_calibrate)

    p = subparsers.add_parser("eval", help="PPL and ROUGE-L of a method against the full cache")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--method", default="prefixkv", help="full, streaming, h2o, snapkv, tova, pyramidkv, prefixkv, prefixkv-online, custom")
    p.add_argument("--keep", type=_fraction, default=0.2, help="keep fraction (0.2 keeps 20%% of the entries)")
    p.add_argument("--profile", help="retention profile (method prefixkv)")
    p.add_argument("--scorer", help="override the method's importance score")
    p.add_argument("--allocation", help="override the method's allocation: uniform, pyramid, online, profile")
    p.add_argument("--force-scorer", action="store_true", help="apply a profile with another scorer")
    p.add_argument("--data", help="JSONL file; default: the built-in evaluation split")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--json", dest="json_out", help="write the full result here")
    p.set_defaults(func=run_eval)

    p = subparsers.add_parser("bench", help="benchmarks: quality (PPL, ROUGE-L, retrieval), speed, scoring (calibration prefill overhead)")
    p.add_argument("kind", choices=["quality", "speed", "scoring"])
    p.add_argument("args", nargs=argparse.REMAINDER, help="options of the benchmark (see `prefixkv bench KIND --help`)")
    p.set_defaults(func=run_bench)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def run_calibrate(args) -> int:
    from .vision import is_vision_source

    if is_vision_source(args.model):  # LLaVA-style folder: image-aware calibration
        from .vision.commands import run_calibrate as run_vision_calibrate

        return run_vision_calibrate(args)
    from .calibration import calibrate
    from .data import builtin_samples, load_jsonl
    from .models import load_model
    from .scoring import make_scorer

    names = [s.strip() for s in args.scorer.split(",") if s.strip()]
    scorers = [make_scorer(n, window=args.window) if n == "window" else make_scorer(n) for n in names]
    output = Path(args.output)
    outputs = {sc.key: output if len(scorers) == 1 else output.with_name(f"{output.stem}.{sc.name}{output.suffix}")
               for sc in scorers}
    existing = [str(p) for p in outputs.values() if p.exists()]
    if existing and not args.force:
        raise FileExistsError(f"{existing[0]} exists; pass --force to overwrite it or choose another --output")
    model, tokenizer = load_model(args.model)
    if args.data:
        rows = load_jsonl(args.data)[: args.samples]
        data_name = str(args.data)
    else:
        rows = builtin_samples(tokenizer, "calibration", n=args.samples, tokens=args.tokens, reference_tokens=0)
        data_name = f"builtin:calibration:{args.samples}x{args.tokens}"
    samples = [_encode(tokenizer, r["prompt"]) for r in rows]
    run = calibrate(model, samples, args.keep, scorers, sink=args.sink, min_layer_keep=args.min_layer_keep,
                    blend=args.blend, data_name=data_name)
    plots_dir = Path(args.plots) if args.plots else output.with_name(f"{output.stem}_report")
    for sc in scorers:
        path = run.profiles[sc.key].save(outputs[sc.key])
        print(f"profile ({sc.key}): {path}", file=sys.stderr)
    try:
        from .report import plot_calibration

        for path in plot_calibration(run, args.keep, plots_dir):
            print(f"plot: {path}", file=sys.stderr)
    except ImportError as err:  # plotting is optional
        print(f"plots skipped ({err})", file=sys.stderr)
    return 0


def run_eval(args) -> int:
    from .vision import is_vision_source

    if is_vision_source(args.model):
        from .vision.commands import run_eval as run_vision_eval

        return run_vision_eval(args)
    if args.profile and not Path(args.profile).is_file():
        raise FileNotFoundError(f"no profile at {args.profile}; make one with `prefixkv calibrate --output {args.profile}`")
    from .data import builtin_samples, load_jsonl
    from .evaluation import evaluate
    from .models import load_model
    from .profile import Fingerprint, RetentionProfile

    model, tokenizer = load_model(args.model)
    profile = RetentionProfile.load(args.profile, Fingerprint.of(model.config)) if args.profile else None
    if args.data:
        samples = load_jsonl(args.data)[: args.samples]
    else:
        samples = builtin_samples(tokenizer, "evaluation", n=args.samples, tokens=args.tokens)
    result = evaluate(model, tokenizer, samples, args.method, args.keep, profile=profile, scorer=args.scorer,
                      allocation=args.allocation, max_new_tokens=args.max_new_tokens,
                      force_scorer=args.force_scorer)
    summary = {k: result[k] for k in ("method", "keep_fraction", "samples", "ppl", "rouge_l") if k in result}
    print(json.dumps(summary))
    if args.json_out:
        from .profile import atomic_write_text

        atomic_write_text(args.json_out, json.dumps(result, indent=2) + "\n")
        print(f"written: {args.json_out}", file=sys.stderr)
    return 0


def run_bench(args) -> int:
    rest = [a for a in args.args if a != "--"]
    if args.kind == "quality":
        from .bench.quality import main
    elif args.kind == "scoring":
        from .bench.scoring import main
    else:
        from .bench.speed import main
    return int(main(rest) or 0)
