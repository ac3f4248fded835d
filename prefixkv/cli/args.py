"""Every flag of the ``prefixkv`` command, defined once, and the config objects built from them.

A command adds the groups it takes (``add_*``) and builds its configs from the parsed
namespace (``*_config``).  Values are checked as they are parsed, one validator per kind of
value, so a bad number stops the command before any work with one line naming the rule.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

from .. import defaults
from ..defaults import TensorRTProfile
from ..engine_folder import ALLOW_FAILED
from ..engines.validate import ValidationConfig
from ..pipeline import CalibrationConfig, DataConfig
from ..search import SEARCH_CURVES, SearchSettings


class UserError(Exception):
    """An error the user can fix; printed as one line."""


# -- one validator per kind of value ---------------------------------------------------------
def _number(text: str, kind, what: str, low=None, high=None):
    """``kind(text)``, finite and within [low, high] (either may be None), or an argparse error saying ``what``."""
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{what}, got {text!r}") from None
    if (kind is float and not math.isfinite(value)) or (low is not None and value < low) or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"{what}, got {text!r}")
    return value


def keep_fractions(text: str) -> tuple[float, ...]:
    """Comma-separated keep fractions, each in (0, 1]."""
    what = "keep fractions are comma-separated numbers in (0, 1] (0.2 keeps 20% of the entries)"
    values = tuple(_number(x, float, what) for x in text.split(",") if x.strip())
    if not values or any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"keep fractions must be in (0, 1] (0.2 keeps 20% of the entries), got {text!r}")
    return values


def keep_fraction(text: str) -> float:
    """One keep fraction in (0, 1]."""
    values = keep_fractions(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"give one keep fraction, got {text!r}")
    return values[0]


def positive_int(text: str) -> int:
    return _number(text, int, "expected a positive integer", low=1)


def paired_processes(text: str) -> int:
    """Fresh processes per paired point: 1, or an even count (half load the second decoder first)."""
    from ..bench.paired import PlanError, check_processes

    value = _number(text, int, "expected 1 or an even positive integer", low=1)
    try:
        check_processes(value)
    except PlanError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def block_steps(text: str) -> int:
    """Decode steps per block of a paired point: the first is untimed, so at least 2."""
    return _number(text, int, "expected an integer >= 2 (the first step of a block is not timed)", low=2)


def count(text: str) -> int:
    """An integer >= 0."""
    return _number(text, int, "expected an integer >= 0", low=0)


def unit_interval(text: str) -> float:
    """A number in [0, 1]."""
    return _number(text, float, "expected a number in [0, 1]", low=0.0, high=1.0)


def non_negative(text: str) -> float:
    """A finite number >= 0."""
    return _number(text, float, "expected a finite number >= 0", low=0.0)


def positive(text: str) -> float:
    """A finite number > 0."""
    value = _number(text, float, "expected a finite number > 0", low=0.0)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def lengths(text: str) -> tuple[int, ...]:
    """Comma-separated token counts, each >= 2."""
    what = "lengths are comma-separated integers >= 2"
    values = tuple(_number(x, int, what, low=2) for x in text.split(",") if x.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"{what}, got {text!r}")
    return values


def names(text: str) -> tuple[str, ...]:
    """Comma-separated names (at least one)."""
    values = tuple(x.strip() for x in text.split(",") if x.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return values


def released_ratio(text: str) -> float:
    """A finite number: the released PrefixKV ``--ratio`` (the share evicted; ``released`` checks it is in (0, 1))."""
    return _number(text, float, "the released ratio is a number in (0, 1), the share evicted (keep = 1 - ratio)")


def threshold(kind):
    """A validator for a quality threshold: ``kind``'s value, or "off" (None: reported, not checked)."""
    def parse(text: str):
        return None if text.strip().lower() == "off" else kind(text)

    parse.__name__ = kind.__name__
    return parse


def port(text: str) -> int:
    return _number(text, int, "a port is an integer in [1, 65535]", low=1, high=65535)


def check_writable(path: str | Path | None, what: str) -> None:
    """Refuse an output path whose folder cannot be written, before any work (not after it)."""
    if path is None:
        return
    folder = Path(path).expanduser().absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {what} {path}: {folder} is not a writable folder; choose another path")
    try:  # access() can say yes where writing fails (read-only mounts, /proc): try it
        fd, probe = tempfile.mkstemp(prefix=".prefixkv-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UserError(f"cannot write {what} {path}: {folder} is not writable ({err.strerror}); choose another path") from None


# -- the groups ---------------------------------------------------------------------------------
def add_model(p, required: bool = False, default: str | None = None, help: str | None = None) -> None:
    p.add_argument("--model", required=required, default=default,
                   help=help or "HF folder, .gguf file, hub id or built-in name; a vision-language model folder "
                                "(LLaVA) takes images" + (" (default %(default)s)" if default else ""))


def add_keep(p, many: bool = False, default: tuple[float, ...] = defaults.CALIBRATION_KEEP_FRACTIONS) -> None:
    if many:
        p.add_argument("--keep", type=keep_fractions, default=tuple(default),
                       help="keep fractions, comma-separated (0.2 keeps 20%% of the entries; 1.0 = the full cache; "
                            f"default {','.join(f'{k:g}' for k in default)})")
    else:
        p.add_argument("--keep", type=keep_fraction, default=defaults.KEEP_FRACTION,
                       help="keep fraction (0.2 keeps 20%% of the entries; default %(default)s)")


def add_data(p, samples: int | None, tokens: bool = True, what: str = "prompts") -> None:
    """The prompts a command runs on: a data file or the built-in text, and the image data options.
    samples None: no ``--samples`` (the command counts its prompts with another flag)."""
    g = p.add_argument_group("data")
    g.add_argument("--data", help=f"{what}: JSONL ({{\"prompt\", \"reference\"?, \"image\"?}} per line) or, for a "
                                  "vision-language model, LLaVA conversations (JSON/JSONL); default: the built-in text")
    if samples is not None:
        g.add_argument("--samples", type=positive_int, default=samples, help="how many (default %(default)s)")
    if tokens:
        g.add_argument("--tokens", type=positive_int, default=defaults.CALIBRATION_TOKENS,
                       help="prompt tokens of a built-in sample (default %(default)s)")
    g.add_argument("--image-folder", help="folder of the data's relative image paths (default: the data file's folder)")
    g.add_argument("--first-turn-only", action="store_true", help="LLaVA data: one sample per conversation, its first exchange")
    add_chat(g)


def add_allow_failed(p) -> None:
    p.add_argument(ALLOW_FAILED, dest="allow_failed_validation", action="store_true",
                   help="use an engine whose validation failed (its manifest says so)")


def add_chat(p) -> None:
    p.add_argument("--chat", action="store_true",
                   help="wrap prompts in the model's chat template (images before the text)")


def add_scoring(p) -> None:
    g = p.add_argument_group("importance score and allocation")
    g.add_argument("--scorer", help="importance score(s), comma-separated: accumulated, window, last-query, key-norm "
                                    f"(default: the method's own; when calibrating, {defaults.SCORER})")
    g.add_argument("--window", type=positive_int, default=defaults.WINDOW, help="query rows of the window scorer (default %(default)s)")
    g.add_argument("--sink", type=count,
                   help=f"first tokens always kept (default: the profile's, else the method's own: {defaults.SINK} for "
                        "PrefixKV as its released code, 4 for streaming, 0 for h2o, snapkv, tova and pyramidkv)")
    g.add_argument("--blend", type=unit_interval,
                   help=f"the search: 1 = PrefixKV lengths (the paper), 0 = uniform lengths (default {defaults.BLEND:g}; "
                        f"{defaults.MEASURED_BLEND:g} measured best on SmolLM2, see README)")
    g.add_argument("--min-layer-keep", type=unit_interval,
                   help=f"the search: per-layer floor, a fraction of the uniform share (default {defaults.MIN_LAYER_KEEP:g}, "
                        "the paper's: none)")
    g.add_argument("--curve", choices=SEARCH_CURVES,
                   help=f"the search's cumulative-priority curve: all = over every position, protected ones included "
                        f"(the released code's), unprotected = over the unprotected entries only (default {defaults.CURVE})")


def add_rule(p) -> None:
    p.add_argument("--rule", choices=defaults.CALIBRATED_RULES, default=defaults.RULE,
                   help="how the per-layer lengths are chosen: prefix-search = the paper's search on attention mass; "
                        "sensitivity = the measured harm of compressing each layer alone (KL from the full cache; "
                        "beyond the paper, see README) (default %(default)s)")


def add_method(p) -> None:
    g = p.add_argument_group("method")
    g.add_argument("--method", default="prefixkv",
                   help="full, streaming, h2o, snapkv, tova, pyramidkv, prefixkv, prefixkv-online, custom (default %(default)s)")
    g.add_argument("--allocation", help="override the method's allocation: uniform, pyramid, online, profile")
    g.add_argument("--force-scorer", action="store_true", help="apply a profile with another scorer")


def add_profile(p, calibrate: bool = False) -> None:
    """``--profile PATH``; with ``calibrate``, or ``--calibrate`` (one of them is required)."""
    if not calibrate:
        p.add_argument("--profile", metavar="PATH", help="retention profile (from `prefixkv calibrate`)")
        return
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--profile", metavar="PATH", help="retention profile (from `prefixkv calibrate` or `prefixkv tune`)")
    g.add_argument("--calibrate", action="store_true",
                   help="calibrate a profile for --keep first (on --data, or the built-in calibration split)")
    g.add_argument("--tune", action="store_true",
                   help="tune first: the best candidate for --keep on the calibration data (`prefixkv tune`), then build it")


def add_tasks(p) -> None:
    p.add_argument("--tasks", type=names, default=("continuation", "retrieval"), help="comma list: continuation, retrieval")


def add_candidates(p) -> None:
    p.add_argument("--candidates", metavar="PATTERNS",
                   help="tune only the candidates whose label matches one of these comma-separated shell patterns, "
                        "e.g. 'window+*,*+uniform*' (default: every candidate; the labels are listed in the result)")


def add_force(p, what: str) -> None:
    p.add_argument("--force", action="store_true", help=f"replace an existing {what}")


def add_json(p, what: str) -> None:
    p.add_argument("--json", dest="json_out", metavar="PATH", help=f"also write {what} here")


def add_max_new_tokens(p, default: int, zero: bool = False) -> None:
    p.add_argument("--max-new-tokens", type=count if zero else positive_int, default=default,
                   help="greedy tokens generated" + (" (0: PPL only)" if zero else "") + " (default %(default)s)")


def add_sampling(p) -> None:
    g = p.add_argument_group("sampling")
    add_max_new_tokens(g, defaults.MAX_NEW_TOKENS)
    g.add_argument("--stream", action="store_true", help="print text as it is generated")
    g.add_argument("--temperature", type=non_negative, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=unit_interval, default=1.0, help="nucleus sampling (default 1: off)")
    g.add_argument("--top-k", type=count, default=0, help="0 = off (default)")
    add_seed(g)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def add_backend(p, choices: tuple[str, ...], default: str, help: str) -> None:
    p.add_argument("--backend", choices=choices, default=default, help=f"{help} (default %(default)s)")


def add_threads(p, help: str = "intra-op threads") -> None:
    p.add_argument("--threads", type=positive_int, help=f"{help} (default: the runtime's)")


def add_runtime(p) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--providers", help="ONNX Runtime providers, comma-separated: cpu, cuda, tensorrt")
    add_threads(g)
    add_prefill_chunk(g)


def add_prefill_chunk(p) -> None:
    p.add_argument("--prefill-chunk", type=positive_int, default=None,
                   help=f"prompt tokens per decoder-graph run of an ONNX Runtime engine (default {defaults.PREFILL_CHUNK}); "
                        "prefill memory grows with chunk x prompt length")


def add_output(p, default: str | None, help: str, dest: str = "output") -> None:
    """The command's output (a profile, an engine folder, a results folder): one flag, its meaning per command."""
    p.add_argument("--output", dest=dest, default=default, required=default is None,
                   help=help + (" (default %(default)s)" if default else ""))


def add_lengths(p, default: tuple[int, ...], help: str = "prompt lengths in tokens") -> None:
    p.add_argument("--lengths", type=lengths, default=default, help=f"{help} (default {','.join(map(str, default))})")


def add_seed(p, default: int | None = None) -> None:
    p.add_argument("--seed", type=count, default=default, help="random seed" + (" (default %(default)s)" if default is not None else ""))


def add_validation(p) -> None:
    g = p.add_argument_group("validation")
    g.add_argument("--validate-prompts", type=positive_int, default=defaults.VALIDATE_PROMPTS,
                   help="prompts for the graph and generation checks (vision: the first of --data, else synthetic images)")
    g.add_argument("--validate-tokens", type=positive_int, default=defaults.VALIDATE_TOKENS, help="tokens per validation prompt (text)")
    g.add_argument("--validate-new-tokens", type=positive_int, default=defaults.VALIDATE_NEW_TOKENS,
                   help="greedy tokens compared per prompt")
    g.add_argument("--quality-samples", type=count, default=defaults.QUALITY_SAMPLES,
                   help="evaluation samples for PPL / ROUGE-L (0: skip; text engines)")
    g.add_argument("--max-ppl-increase", type=threshold(non_negative), default=defaults.MAX_PPL_INCREASE,
                   help="fail when the PPL rises more than this over the full cache's (1.0 = doubles; default %(default)s; "
                        "off: reported, not checked)")
    g.add_argument("--min-rouge-l", type=threshold(unit_interval), default=defaults.MIN_ROUGE_L,
                   help="fail when ROUGE-L vs the full cache's text is lower (default %(default)s; off: reported, not checked)")
    g.add_argument("--min-token-agreement", type=unit_interval,
                   help="int8 / int4 engines: the share of greedy steps that must choose the fp32 reference's token "
                        f"(default {', '.join(f'{k} {v:g}' for k, v in defaults.MIN_TOKEN_AGREEMENT.items())})")
    add_json(g, "the validation report")


def add_tensorrt(p) -> None:
    g = p.add_argument_group("TensorRT (--backend tensorrt)")
    g.add_argument("--onnx-only", action="store_true", help="write the plugin-mode ONNX graphs only (no TensorRT needed)")
    g.add_argument("--precision", choices=defaults.TENSORRT_PRECISIONS, default=defaults.TENSORRT.precision,
                   help="engine precision (default %(default)s)")
    g.add_argument("--max-batch", type=positive_int, default=defaults.TENSORRT.max_batch,
                   help="optimization profile: largest batch (default %(default)s)")
    g.add_argument("--opt-seq", type=positive_int, default=defaults.TENSORRT.opt_seq,
                   help="optimization profile: typical prompt length (default %(default)s)")
    g.add_argument("--max-seq", type=positive_int, default=defaults.TENSORRT.max_seq,
                   help="optimization profile: longest prompt / cache (default %(default)s)")


# -- the configs built from them -------------------------------------------------------------
def scorer_names(args) -> tuple[str, ...] | None:
    if args.scorer is None:
        return None
    names = tuple(s.strip() for s in args.scorer.split(",") if s.strip())
    if not names:
        raise UserError(f"--scorer needs at least one name, got {args.scorer!r}")
    return names


def data_config(args, samples: int | None = None):
    return DataConfig(path=args.data, samples=samples or args.samples, tokens=getattr(args, "tokens", defaults.CALIBRATION_TOKENS),
                      image_folder=args.image_folder, first_turn_only=args.first_turn_only, chat=args.chat)


def search_settings(args) -> SearchSettings:
    """The search's settings from --curve, --sink, --min-layer-keep and --blend (the paper's where not given)."""
    given = {name: getattr(args, name) for name in ("curve", "sink", "min_layer_keep", "blend")
             if getattr(args, name, None) is not None}
    return SearchSettings(**given)


def calibration_config(args, keep: tuple[float, ...]):
    return CalibrationConfig(keep_fractions=keep, scorers=scorer_names(args) or (defaults.SCORER,), window=args.window,
                             search=search_settings(args), data=data_config(args), rule=getattr(args, "rule", defaults.RULE))


def validation_config(args, samples=None):
    return ValidationConfig(quality=args.quality_samples > 0, samples=samples, n_prompts=args.validate_prompts, prompt_tokens=args.validate_tokens,
                            max_new_tokens=args.validate_new_tokens, quality_samples=max(args.quality_samples, 1),
                            max_ppl_increase=args.max_ppl_increase, min_rouge_l=args.min_rouge_l,
                            min_token_agreement=args.min_token_agreement,
                            chat=getattr(args, "chat", False), providers=args.providers, threads=args.threads,
                            prefill_chunk=args.prefill_chunk,
                            json_path=args.json_out, **({"backend": args.backend} if hasattr(args, "engine") else {}))


def tensorrt_profile(args) -> TensorRTProfile:
    return TensorRTProfile(precision=args.precision, max_batch=args.max_batch, opt_seq=args.opt_seq, max_seq=args.max_seq)


def stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
