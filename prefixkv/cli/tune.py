"""``prefixkv tune``: parsing, then one library call (``prefixkv.tune``)."""
from __future__ import annotations

import json
from pathlib import Path

from ..data import load_jsonl
from ..engine_folder import atomic_write_text
from ..models import DEFAULT_MODEL, load_model
from ..report import plot_quality
from ..tune import TuneConfig, TuneResult, default_candidates, narrow, tune
from ..vision import is_vision_model
from . import args as a


def register(subparsers) -> None:
    p = subparsers.add_parser("tune", help="the best compression for a model and its data, written as a profile")
    a.add_model(p, default=DEFAULT_MODEL)
    a.add_keep(p, many=True, default=(0.1, 0.2, 0.3))
    a.add_data(p, samples=8, what="text to tune on: every other row calibrates, the rest tunes (default: the built-in "
                                  "calibration split, in two disjoint sets of windows)")
    a.add_tasks(p)
    a.add_candidates(p)
    a.add_output(p, None, "profile path (the plots and every candidate's results go next to it)")
    a.add_force(p, "profile")
    p.set_defaults(func=run_tune)


def tune_config(args, keep: tuple[float, ...]) -> TuneConfig:
    rows = load_jsonl(args.data) if args.data else None
    return TuneConfig(keep_fractions=keep, tasks=tuple(args.tasks), candidates=tuple(narrow(default_candidates(), args.candidates)),
                      data_rows=rows, data_name=str(args.data) if args.data else f"builtin:calibration:{args.tokens}",
                      calibration_samples=args.samples, tune_samples=args.samples, tokens=args.tokens)


def run_tuning(model, tokenizer, config: TuneConfig) -> TuneResult:
    if is_vision_model(model):
        raise ValueError("tune works on text models for now; calibrate a vision model with `prefixkv calibrate --data`")
    return tune(model, tokenizer, config, log=a.stderr)


def write_outputs(result: TuneResult, output: Path) -> list[Path]:
    """The profile, every candidate's results (JSON) and one plot per task, next to each other."""
    paths = [result.profile.save(output)]
    rows = [{k: v for k, v in r.items() if k != "per_sample"} for r in result.results]
    results = output.with_name(f"{output.stem}_tune.json")
    atomic_write_text(results, json.dumps({"winner": result.winner.label, "mean_rank": result.mean_rank, "results": rows},
                                          indent=1, default=str) + "\n")
    paths.append(results)
    for task in sorted({r["task"] for r in result.results}):
        subset = [r for r in result.results if r["task"] == task]
        paths.append(plot_quality(subset, output.with_name(f"{output.stem}_tune_{task}.png"),
                                  title=f"tune: {task} (winner {result.winner.label})"))
    return paths


def run_tune(args) -> int:
    output = Path(args.output)
    if output.exists() and not args.force:
        raise FileExistsError(f"{output} exists; pass --force to overwrite it or choose another --output")
    a.check_writable(output, "the profile")
    config = tune_config(args, args.keep)
    a.stderr(f"tuning {len(config.candidates)} candidates at keep {', '.join(f'{k:g}' for k in config.keep_fractions)} "
             f"on {', '.join(config.tasks)}")
    model, tokenizer = load_model(args.model)
    result = run_tuning(model, tokenizer, config)
    ranked = sorted(result.mean_rank.items(), key=lambda kv: kv[1])
    for label, rank in ranked[:5]:
        a.stderr(f"  mean rank {rank:5.2f}  {label}")
    a.stderr(f"winner: {result.winner.label} (of {len(ranked)}; {result.profile.calibration['tune']['seconds']:.0f} s)")
    for path in write_outputs(result, output):
        a.stderr(f"wrote {path}")
    return 0


