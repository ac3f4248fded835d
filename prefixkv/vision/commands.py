"""``prefixkv vision ...``: every stage for LLaVA-style models, with images.  Parsing and delegation only.

    prefixkv vision calibrate --model MODEL --data llava.json --keep 0.1,0.2,0.5 --chat --output profile.json
    prefixkv vision eval      --model MODEL --data llava_eval.json --method prefixkv --profile profile.json --keep 0.2 --chat
    prefixkv vision build     --model MODEL --profile profile.json --keep 0.2 --output engines/llava-k20
    prefixkv vision generate  engines/llava-k20 --image cat.png --prompt "What is shown?" --chat
    prefixkv vision validate  engines/llava-k20 --data llava_eval.json --chat

Data files: LLaVA conversation JSON / JSONL, or the project's JSONL with an ``image`` field
(see ``prefixkv.vision.data``).  Errors are ``ValueError``s printed as one line by the CLI.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..exporter.commands import _positive, build_exit_code
from ..search import DEFAULT_BLEND




def _data_arguments(p, required: bool = True) -> None:
    p.add_argument("--data", required=required, help="LLaVA conversations (JSON/JSONL) or prefixkv JSONL with \"image\"")
    p.add_argument("--image-folder", help="folder of the data's relative image paths (default: the data file's folder)")
    p.add_argument("--first-turn-only", action="store_true", help="one sample per conversation: its first exchange")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template (images before the text)")


def register(subparsers) -> None:
    from ..commands import _fraction, _fractions
    from ..models import DEFAULT_MODEL

    vision = subparsers.add_parser("vision", help="LLaVA-style models with images: calibrate, eval, build, generate, validate")
    sub = vision.add_subparsers(dest="vision_command", metavar="STAGE")
    vision.set_defaults(func=lambda args: vision.print_help(sys.stderr) or 2)

    p = sub.add_parser("calibrate", help="calibrate a retention profile on image prompts (+ image/text share plot)")
    p.add_argument("--model", required=True, help="a LLaVA model folder (LlavaForConditionalGeneration + processor)")
    _data_arguments(p)
    p.add_argument("--keep", type=_fractions, default=_fractions("0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9"),
                   help="keep fractions to calibrate, comma-separated (0.2 keeps 20%% of the entries)")
    p.add_argument("--samples", type=_positive, default=16, help="calibration samples (the first N)")
    p.add_argument("--scorer", default="accumulated", help="importance score(s), comma-separated")
    p.add_argument("--window", type=int, default=8, help="query rows of the window scorer")
    p.add_argument("--sink", type=int, default=4, help="first tokens always kept")
    p.add_argument("--min-layer-keep", type=float, default=0.0, help="per-layer floor, a fraction of the uniform share")
    p.add_argument("--blend", type=float, default=DEFAULT_BLEND,
                   help="1 = PrefixKV lengths (the paper), 0 = uniform lengths (default %(default)s: measured best on text)")
    p.add_argument("--output", default="profile.json", help="profile path (more scorers: NAME.SCORER.json)")
    p.add_argument("--plots", help="folder for the PNG plots (default: OUTPUT_report/)")
    p.add_argument("--force", action="store_true", help="overwrite an existing profile")
    p.set_defaults(func=run_calibrate)

    p = sub.add_parser("eval", help="PPL of reference answers and ROUGE-L vs the full cache, on image prompts")
    p.add_argument("--model", required=True)
    _data_arguments(p)
    p.add_argument("--method", default="prefixkv", help="full, streaming, h2o, snapkv, tova, pyramidkv, prefixkv, prefixkv-online, custom")
    p.add_argument("--keep", type=_fraction, default=0.2, help="keep fraction (0.2 keeps 20%% of the entries)")
    p.add_argument("--profile", help="retention profile (method prefixkv)")
    p.add_argument("--scorer", help="override the method's importance score")
    p.add_argument("--allocation", help="override the method's allocation: uniform, pyramid, online, profile")
    p.add_argument("--force-scorer", action="store_true", help="apply a profile with another scorer")
    p.add_argument("--samples", type=_positive, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens for ROUGE-L (0: PPL only)")
    p.add_argument("--json", dest="json_out", help="write the full result here")
    p.set_defaults(func=run_eval)

    p = sub.add_parser("build", help="export vision + prefill + decode graphs, write and validate a vision engine")
    p.add_argument("--model", default=DEFAULT_MODEL, help="a LLaVA model folder")
    p.add_argument("--profile", help="retention profile (from `prefixkv vision calibrate`); without it, --data calibrates one")
    p.add_argument("--keep", type=_fraction, default=0.2, help="keep fraction (0.2 keeps 20%% of the entries)")
    p.add_argument("--output", required=True, help="engine folder to write")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    _data_arguments(p, required=False)
    p.add_argument("--samples", type=_positive, default=16, help="calibration samples from --data")
    p.add_argument("--scorer", default="accumulated", help="importance score when calibrating")
    p.add_argument("--sink", type=int, default=4, help="first tokens always kept (when calibrating)")
    p.add_argument("--evict-distance", type=int, default=25, help="decode-phase eviction slot from the end of the compacted prompt")
    p.add_argument("--max-context", type=_positive, help="context limit recorded in the engine (default: the model's)")
    p.add_argument("--no-validate", action="store_true", help="skip validation against the PyTorch reference")
    p.add_argument("--validate-prompts", type=_positive, default=3, help="validation prompts (from --data, else synthetic images)")
    p.add_argument("--validate-new-tokens", type=_positive, default=16, help="greedy tokens compared per prompt")
    p.set_defaults(func=run_build)

    p = sub.add_parser("generate", help="generate text for a prompt with images")
    add_generate_arguments(p)
    p.set_defaults(func=run_generate)

    p = sub.add_parser("validate", help="check a vision engine against the PyTorch reference")
    p.add_argument("engine", help="vision engine folder")
    p.add_argument("--model", help="reference model (default: the source recorded in the engine's manifest)")
    _data_arguments(p, required=False)
    p.add_argument("--samples", type=_positive, default=3, help="prompts from --data (default: synthetic images)")
    p.add_argument("--max-new-tokens", type=_positive, default=16, help="greedy tokens compared per prompt")
    p.add_argument("--providers", help="ONNX Runtime providers, comma-separated: cpu, cuda, tensorrt")
    p.add_argument("--threads", type=_positive, help="ONNX Runtime intra-op threads")
    p.add_argument("--json", dest="json_out", help="also write the validation report here")
    p.set_defaults(func=run_validate)


def add_generate_arguments(p) -> None:
    """The text ``generate`` arguments plus ``--image`` (repeatable)."""
    p.add_argument("engine", help="engine folder (from `prefixkv vision build`)")
    p.add_argument("--prompt", required=True, help="the prompt; one <image> per --image unless --chat")
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="an image file (repeatable, in prompt order)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template (images before the text)")
    p.add_argument("--max-new-tokens", type=_positive, default=64)
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--backend", default="onnxruntime", help="onnxruntime (default) or torch (the PyTorch reference)")
    p.add_argument("--providers", help="ONNX Runtime providers, comma-separated: cpu, cuda, tensorrt")
    p.add_argument("--threads", type=_positive, help="intra-op threads")


# -- helpers ----------------------------------------------------------------------------------------
def _samples(args, limit: int) -> tuple[list[dict], str]:
    from .data import load_samples

    if not getattr(args, "data", None):
        raise ValueError("vision-language models need image data: pass --data with LLaVA conversations (JSON/JSONL) "
                         "or prefixkv JSONL with an \"image\" field")
    samples = load_samples(args.data, getattr(args, "image_folder", None), getattr(args, "first_turn_only", False))[:limit]
    return samples, f"{args.data} ({len(samples)} samples)"


def _vision_model(source: str):
    from ..models import load_model
    from .data import ImageError
    from . import is_vision_model

    model, processor = load_model(source)
    if not is_vision_model(model):
        raise ImageError(f"{source} is a text-only model; use `prefixkv calibrate/eval/build` (without `vision`)")
    return model, processor


def _chat(args) -> bool:
    return bool(getattr(args, "chat", False))


# -- the stages: each also takes the namespace of the matching text command (`prefixkv calibrate`, ...) --
def run_calibrate(args) -> int:
    from ..scoring import make_scorer
    from .calibration import calibrate_vision, plot_image_share

    names = [s.strip() for s in args.scorer.split(",") if s.strip()]
    scorers = [make_scorer(n, window=args.window) if n == "window" else make_scorer(n) for n in names]
    output = Path(args.output)
    outputs = {sc.key: output if len(scorers) == 1 else output.with_name(f"{output.stem}.{sc.name}{output.suffix}") for sc in scorers}
    existing = [str(p) for p in outputs.values() if p.exists()]
    if existing and not args.force:
        raise FileExistsError(f"{existing[0]} exists; pass --force to overwrite it or choose another --output")
    samples, name = _samples(args, args.samples)
    model, processor = _vision_model(args.model)
    run = calibrate_vision(model, processor, samples, args.keep, scorers, sink=args.sink, min_layer_keep=args.min_layer_keep,
                           blend=args.blend, chat=_chat(args), data_name=name)
    for sc in scorers:
        print(f"profile ({sc.key}): {run.profiles[sc.key].save(outputs[sc.key])}", file=sys.stderr)
    plots = Path(args.plots) if args.plots else output.with_name(f"{output.stem}_report")
    try:
        paths = plot_image_share(run, plots)
        try:
            from ..report import plot_calibration

            paths += list(plot_calibration(run, args.keep, plots))
        except ImportError:
            pass
        for path in paths:
            print(f"plot: {path}", file=sys.stderr)
    except ImportError as err:  # plotting is optional
        print(f"plots skipped ({err})", file=sys.stderr)
    for key, shares in run.image_share.items():
        for kf, per_layer in sorted(shares.items()):
            print(f"image share of kept entries ({key}, keep {kf:g}): " + " ".join(f"{x:.2f}" for x in per_layer)
                  + f"  (prompts: {run.prompt_image_share:.2f})", file=sys.stderr)
    return 0


def run_eval(args) -> int:
    from ..profile import Fingerprint, RetentionProfile
    from .evaluation import evaluate_vision

    samples, _ = _samples(args, args.samples)
    model, processor = _vision_model(args.model)
    profile = RetentionProfile.load(args.profile, Fingerprint.of(model.config)) if args.profile else None
    result = evaluate_vision(model, processor, samples, args.method, args.keep, profile=profile, scorer=args.scorer,
                             allocation=args.allocation, force_scorer=args.force_scorer,
                             max_new_tokens=args.max_new_tokens, chat=_chat(args))
    print(json.dumps({k: result[k] for k in ("method", "keep_fraction", "samples", "images", "ppl", "ppl_full", "rouge_l", "kv_fraction")}))
    if args.json_out:
        from ..profile import atomic_write_text

        atomic_write_text(args.json_out, json.dumps(result, indent=2) + "\n")
        print(f"written: {args.json_out}", file=sys.stderr)
    return 0


def run_build(args) -> int:
    from .export import build_vision_engine

    samples = _samples(args, args.samples)[0] if getattr(args, "data", None) else None
    model, processor = _vision_model(args.model)
    validate_samples = samples[: args.validate_prompts] if samples else None
    result = build_vision_engine(
        args.model, args.output, args.keep, profile=args.profile, calibration_samples=samples, scorer=args.scorer,
        sink=args.sink, chat=_chat(args), force=args.force, validate=not args.no_validate,
        validate_options={"samples": validate_samples, "n_prompts": args.validate_prompts,
                          "max_new_tokens": args.validate_new_tokens, "chat": _chat(args)},
        evict_distance=args.evict_distance, max_context=args.max_context, model=model, processor=processor)
    return build_exit_code(result)


def run_generate(args) -> int:
    """Also the target of the text ``prefixkv generate`` when given ``--image`` or a vision engine."""
    from ..exporter.commands import print_generation, prompt_text
    from .data import load_image
    from .runner import load_vision_runner

    start = time.perf_counter()
    pictures = [load_image(path) for path in getattr(args, "image", None) or []]  # fail before loading the engine
    runner = load_vision_runner(args.engine, backend=args.backend, threads=args.threads, providers=args.providers)
    prompt = prompt_text(args) if hasattr(args, "prompt_file") else args.prompt
    return print_generation(runner, prompt, args, _chat(args), start, images=[pictures],
                            describe=lambda r: f" ({len(pictures)} image(s) of {runner.vision['tokens_per_image']} tokens)")


def run_validate(args) -> int:
    from .validate import validate_vision_engine

    model = processor = None
    if args.model:
        model, processor = _vision_model(args.model)
    n = getattr(args, "samples", None) or getattr(args, "validate_prompts", 3)
    samples = _samples(args, n)[0] if getattr(args, "data", None) else None
    report = validate_vision_engine(args.engine, model=model, processor=processor, samples=samples, n_prompts=n,
                                    max_new_tokens=getattr(args, "max_new_tokens", None) or getattr(args, "validate_new_tokens", 16),
                                    chat=_chat(args), providers=args.providers, threads=args.threads, json_path=args.json_out)
    print(json.dumps({"passed": report["passed"], **{k: v["passed"] for k, v in report["checks"].items()}}))
    return 0 if report["passed"] else 1
