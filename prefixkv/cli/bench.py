"""``prefixkv bench quality|speed|scoring``: the benchmarks' flags, then one call to ``prefixkv.bench``."""
from __future__ import annotations

from .. import defaults
from ..bench import quality, scoring, speed
from ..models import DEFAULT_MODEL
from . import args as a


def register(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks: quality (PPL, ROUGE-L, retrieval), speed, scoring "
                                                "(calibration prefill overhead); JSON, markdown and PNG")
    kinds = bench.add_subparsers(dest="kind", metavar="KIND", required=True)

    p = kinds.add_parser("quality", help=quality.__doc__.splitlines()[0], description=quality.__doc__.splitlines()[0])
    a.add_model(p, default=DEFAULT_MODEL)
    a.add_tasks(p)
    a.add_keep(p, many=True, default=(0.1, 0.2, 0.3, 0.5, 0.8))
    p.add_argument("--methods", default=quality.DEFAULT_METHODS, help=f"named methods (default {quality.DEFAULT_METHODS})")
    p.add_argument("--pairs", default=quality.DEFAULT_PAIRS,
                   help=f"extra scorer+allocation pairs, 'all' for every pair, 'none' for none (default {quality.DEFAULT_PAIRS})")
    p.add_argument("--tuned", metavar="PROFILE", help="a profile from `prefixkv tune`: one more row, labelled tuned")
    p.add_argument("--variants", default=quality.DEFAULT_VARIANTS,
                   help="search-setting variants beside the paper's, compared with it pair by pair: "
                        f"{', '.join(quality.VARIANTS)}, or none (default {quality.DEFAULT_VARIANTS})")
    p.add_argument("--samples", type=a.positive_int, default=16, help="continuation prompts (default 16)")
    p.add_argument("--prompt-tokens", type=a.positive_int, default=512, help="continuation prompt tokens (default 512)")
    p.add_argument("--reference-tokens", type=a.positive_int, default=32, help="continuation reference tokens for PPL (default 32)")
    a.add_max_new_tokens(p, defaults.EVAL_NEW_TOKENS)
    p.add_argument("--retrieval-samples", type=a.positive_int, default=12, help="retrieval prompts per length (default 12)")
    a.add_lengths(p, (512, 1024, 2048), "retrieval prompt lengths in tokens")
    p.add_argument("--facts", type=a.positive_int, default=1, help="facts planted per retrieval prompt (default 1)")
    a.add_chat(p)
    p.add_argument("--calibration-samples", type=a.positive_int, default=defaults.CALIBRATION_SAMPLES,
                   help="calibration prompts (default %(default)s)")
    p.add_argument("--calibration-tokens", type=a.positive_int, default=defaults.CALIBRATION_TOKENS,
                   help="calibration prompt tokens (default %(default)s)")
    p.add_argument("--sweep-floor-blend", action="store_true",
                   help="sweep min_layer_keep x blend on calibration-split prompts and report the best default")
    p.add_argument("--floors", default="0,0.25,0.5", help="min_layer_keep values (fraction of the uniform share)")
    p.add_argument("--blends", default="1,0.75,0.5", help="blend values (1 = PrefixKV lengths, 0 = uniform)")
    p.add_argument("--sweep-scorers", default="accumulated,window,last-query", help="scorers whose profiles are swept")
    p.add_argument("--sweep-samples", type=a.positive_int, default=8, help="calibration-split prompts per sweep task (default %(default)s)")
    p.add_argument("--batch-size", type=a.positive_int, default=16, help="prompts per batch (fewer for long prompts)")
    p.add_argument("--resamples", type=a.positive_int, default=2000, help="bootstrap resamples (default 2000)")
    a.add_seed(p, default=0)
    a.add_threads(p, "torch threads")
    a.add_output(p, "results/quality", "output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=quality.run)

    p = kinds.add_parser("speed", help=speed.__doc__.splitlines()[0], description=speed.__doc__.splitlines()[0])
    a.add_model(p, default=DEFAULT_MODEL)
    a.add_profile(p)
    a.add_keep(p, many=True, default=(1.0, 0.5, 0.2))
    p.add_argument("--contexts", type=a.lengths, default=(512, 2048, 4096), help="prompt lengths in tokens")
    p.add_argument("--steps", type=a.positive_int, default=64, help="timed decode steps per point (the mean includes the "
                   "steps where the ONNX Runtime runner compacted a full cache buffer)")
    p.add_argument("--warmup", type=a.count, default=2, help="untimed decode steps first")
    a.add_threads(p, "intra-op threads for ONNX Runtime and PyTorch")
    p.add_argument("--batch", type=a.positive_int, default=1,
                   help="rows decoded at once by the ONNX Runtime engines (> 1: the PyTorch reference and "
                        "onnxruntime-genai are skipped)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    p.add_argument("--engines", help="comma-separated engine folders to use for their keep fractions (the others are built)")
    p.add_argument("--engines-dir", help="where built engines are cached (default: CACHE/bench-engines)")
    p.add_argument("--prefill-contexts", type=a.lengths, default=(2048, 4096, 8192),
                   help="prompt lengths of the prefill points, a fresh process each, PyTorch SDPA alongside "
                        "(default 2048,4096,8192)")
    p.add_argument("--no-prefill", action="store_true", help="skip the prefill points (and the folder-size targets)")
    p.add_argument("--prefill-scorers", type=a.names, default=("window", "accumulated"),
                   help="scores of the prefill-point engines, at the smallest --keep (default window,accumulated)")
    a.add_prefill_chunk(p)
    p.add_argument("--prefill-rounds", type=a.positive_int, default=3,
                   help="rounds of the prefill points: every engine and PyTorch SDPA at one length in turn, a fresh "
                        "process each; each target reads the median of its rounds' ratios to SDPA (default 3)")
    p.add_argument("--weight-rounds", type=a.count, default=6,
                   help="rounds of the weight-precision decode points: the smallest --keep's window engine with fp32 "
                        "and int4 weights, in turn, a fresh process each (0: none; default 6)")
    p.add_argument("--context-rounds", type=a.count, default=3,
                   help="rounds of the decode points at every --contexts length: each keep's engine and "
                        "onnxruntime-genai's full-cache model in turn, a fresh process each (0: none; default 3)")
    p.add_argument("--paired-blocks", type=a.count, default=12,
                   help="blocks of the paired decode points: each keep's engine against onnxruntime-genai's at every "
                        "--contexts length, and int4 against fp32 where the weight rounds run, their steps "
                        "interleaved in each of --paired-processes fresh processes (0: none; default 12)")
    p.add_argument("--paired-processes", type=a.paired_processes, default=2,
                   help="fresh processes per paired point, the second decoder loaded first in every other one; the "
                        "point's figure is the median of their ratios (one process's ratio moved by up to 5%% with "
                        "the load order; 1 or an even count, so that both orders weigh the same; default 2)")
    p.add_argument("--block-steps", type=a.block_steps, default=8,
                   help="decode steps per block of a paired point, the first one untimed (default 8)")
    p.add_argument("--weight-context", type=a.positive_int, default=1024,
                   help="prompt tokens of the weight-precision decode points (default 1024)")
    a.add_output(p, "results/bench_speed", "writes OUTPUT.json and OUTPUT.png")
    p.set_defaults(func=speed.run)

    p = kinds.add_parser("scoring", help=scoring.__doc__.splitlines()[0], description=scoring.__doc__.splitlines()[0])
    a.add_model(p, default=DEFAULT_MODEL)
    a.add_lengths(p, (512, 1024, 2048))
    p.add_argument("--scorers", type=a.names, default=("accumulated", "window", "last-query", "key-norm"),
                   help="importance scores to time")
    p.add_argument("--repeat", type=a.positive_int, default=3, help="timed runs per point (the median is reported)")
    a.add_threads(p, "torch threads")
    a.add_output(p, "results/scoring", "output folder")
    p.set_defaults(func=scoring.run)
