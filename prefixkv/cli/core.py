"""``prefixkv calibrate``, ``eval`` and ``profile import``: parsing, then one library call each."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .. import defaults
from ..engine_folder import atomic_write_text
from ..evaluation import EvalSettings, MethodConfig, evaluate
from ..models import DEFAULT_MODEL, load_model
from ..pipeline import calibrate_model, check_chat, describe_rule
from ..profile import Fingerprint, RetentionProfile
from ..released import import_profiles, model_config
from ..report import plot_calibration
from ..vision import is_vision_model
from ..vision.calibration import plot_image_share
from . import args as a

SUMMARY = ("method", "keep_fraction", "samples", "images", "ppl", "ppl_full", "rouge_l", "kv_fraction")


def register(subparsers) -> None:
    p = subparsers.add_parser("calibrate", help="calibrate a PrefixKV retention profile")
    a.add_model(p, default=DEFAULT_MODEL)
    a.add_keep(p, many=True)
    a.add_data(p, samples=defaults.CALIBRATION_SAMPLES, what="calibration prompts (default: the built-in calibration split)")
    a.add_scoring(p)
    a.add_rule(p)
    a.add_output(p, "profile.json", "profile path (more scorers: NAME.SCORER.json)")
    p.add_argument("--plots", help="folder for the PNG plots (default: OUTPUT_report/)")
    a.add_force(p, "profile")
    p.set_defaults(func=run_calibrate)

    p = subparsers.add_parser("eval", help="PPL and ROUGE-L of a method against the full cache")
    a.add_model(p, default=DEFAULT_MODEL)
    a.add_method(p)
    a.add_keep(p)
    a.add_profile(p)
    a.add_scoring(p)
    a.add_data(p, samples=defaults.EVAL_SAMPLES, what="evaluation prompts (default: the built-in evaluation split)")
    a.add_max_new_tokens(p, defaults.EVAL_NEW_TOKENS, zero=True)
    a.add_json(p, "the full result")
    p.set_defaults(func=run_eval)

    p = subparsers.add_parser("profile", help="retention profile tools: import the released PrefixKV profiles")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    p.set_defaults(func=lambda args, p=p: p.print_help(sys.stderr) or 2)
    p = actions.add_parser(
        "import", help="convert released PrefixKV confs (per-layer evicted fractions) into a retention profile",
        description="Convert the released PrefixKV lists (THU-MIG/PrefixKV confs/prefixkv_<model>_<ratio>.json: one "
                    "evicted fraction per layer) into a retention profile for eval, build and validate. The released "
                    "--ratio r is the share EVICTED: it becomes keep 1 - r (the paper's tables are by share kept, so "
                    "its 20% is the released --ratio 0.8 and prefixkv's --keep 0.2). Each layer keeps 1 - r_l, "
                    "rescaled so the layers' mean is exactly 1 - r.")
    p.add_argument("confs", nargs="+", metavar="CONF.json",
                   help="released lists, one budget each; the ratio comes from the name's _<ratio>.json suffix")
    a.add_model(p, required=True, help="the model the lists are for (its config is fingerprinted; "
                                       "HF folder, .gguf file, hub id or built-in name)")
    a.add_output(p, None, "profile path")
    p.add_argument("--ratio", type=a.released_ratio,
                   help="the released --ratio of a single CONF.json whose name has no _<ratio>.json suffix: "
                        "the share evicted (0.8 keeps 20%%)")
    a.add_force(p, "profile")
    p.set_defaults(func=run_profile_import)


def run_calibrate(args) -> int:
    config = a.calibration_config(args, args.keep)
    output = Path(args.output)
    outputs = {}
    for name in config.scorers:
        key = config.scorer(name).key
        outputs[key] = output if len(config.scorers) == 1 else output.with_name(f"{output.stem}.{name}{output.suffix}")
    existing = [str(p) for p in outputs.values() if p.exists()]
    if existing and not args.force:
        raise FileExistsError(f"{existing[0]} exists; pass --force to overwrite it or choose another --output")
    for path in outputs.values():
        a.check_writable(path, "the profile")
    model, tokenizer = load_model(args.model)
    a.stderr(describe_rule(config) + " (recorded in the profile)")
    run = calibrate_model(model, tokenizer, config)
    for key, path in outputs.items():
        a.stderr(f"profile ({key}): {run.profiles[key].save(path)}")
    plots = Path(args.plots) if args.plots else output.with_name(f"{output.stem}_report")
    paths = list(plot_calibration(run, config.keep_fractions, plots))
    if is_vision_model(model):
        paths += plot_image_share(run, plots)
        for key, shares in run.image_share.items():
            for kf, per_layer in sorted(shares.items()):
                a.stderr(f"image share of kept entries ({key}, keep {kf:g}): " + " ".join(f"{x:.2f}" for x in per_layer)
                         + f"  (prompts: {run.prompt_image_share:.2f})")
    for path in paths:
        a.stderr(f"plot: {path}")
    return 0


def run_eval(args) -> int:
    if args.profile and not Path(args.profile).is_file():
        raise FileNotFoundError(f"no profile at {args.profile}; make one with `prefixkv calibrate --output {args.profile}`")
    a.check_writable(args.json_out, "the result")
    names = a.scorer_names(args)
    if names is not None and len(names) != 1:
        raise a.UserError(f"eval takes one --scorer, got {args.scorer!r}")
    method = MethodConfig(args.method, scorer=names[0] if names else None, allocation=args.allocation,
                          scorer_params={"window": args.window} if names == ("window",) and args.window != defaults.WINDOW else None,
                          search=a.search_settings(args), sink=args.sink, force_scorer=args.force_scorer)
    settings = EvalSettings(max_new_tokens=max(args.max_new_tokens, 1), generate=args.max_new_tokens > 0,
                            chat=args.chat)
    model, tokenizer = load_model(args.model)
    check_chat(args.chat, is_vision_model(model))
    profile = RetentionProfile.load(args.profile, Fingerprint.of(model.config)) if args.profile else None
    samples, _ = a.data_config(args).load(tokenizer, "evaluation", is_vision_model(model),
                                          reference_tokens=defaults.EVAL_REFERENCE_TOKENS)
    result = evaluate(model, tokenizer, samples, method, args.keep, settings, profile=profile)
    print(json.dumps({k: result[k] for k in SUMMARY if k in result}))
    if args.json_out:
        atomic_write_text(args.json_out, json.dumps(result, indent=2) + "\n")
        print(f"written: {args.json_out}", file=sys.stderr)
    return 0


def run_profile_import(args) -> int:
    output = Path(args.output)
    if output.exists() and not args.force:
        raise FileExistsError(f"{output} exists; pass --force to overwrite it or choose another --output")
    a.check_writable(output, "the profile")
    profile = import_profiles(args.confs, Fingerprint.of(model_config(args.model)), ratio=args.ratio)
    ratios = profile.calibration["released_ratio"]
    for kf in profile.keep_fractions:
        layers = profile.layer_fractions(kf)
        a.stderr(f"keep {kf:g} (released ratio {ratios[repr(kf)]:g}): {len(layers)} layers keep "
                 f"{min(layers):.3f}..{max(layers):.3f}, raw mean {profile.calibration['raw_mean_keep'][repr(kf)]:.4f}")
    a.stderr(f"profile: {profile.save(output)}")
    return 0
