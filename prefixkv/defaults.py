"""Every default setting of prefixkv, in one place (no imports, no I/O).

The library, the CLI and the docs take their defaults from here; a literal default
restated anywhere else is a bug.
"""
from __future__ import annotations

from dataclasses import dataclass

# -- the cache ---------------------------------------------------------------------------------
# First tokens always kept (attention sinks).  PrefixKV's released evaluation uses one
# (`--start-size 1`); the other methods keep their own papers' settings (METHOD_SINKS).
SINK = 1
PROTECT_LAST = True      # the last prompt token is always kept
EVICT_DISTANCE = 25      # decode: the entry this many slots before the end of the compacted prompt is evicted
OLDEST = 1 << 30         # the evict distance of "evict the oldest entry after the sinks" (StreamingLLM's rule)


def check_evict_distance(value) -> int:
    """``value`` if it is an evict distance (an integer in [1, OLDEST]), else a one-line ValueError;
    the one check of the library's entry points (the file schemas declare the same bounds)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= OLDEST:
        raise ValueError(f"the evict distance must be an integer in [1, {OLDEST}] ({OLDEST}: the oldest entry), got {value!r}")
    return value


KEEP_FRACTION = 0.2      # the global keep fraction of `build`, `eval` and `generate` (0.2 keeps 20% of the entries)

# Each method's sink, from its own paper or released code.  StreamingLLM keeps 4 initial tokens;
# H2O (heavy hitters + recent), SnapKV and PyramidKV (observation window + pooled selection) and
# TOVA (last query) keep no fixed sinks; PrefixKV's evaluation scripts pass `--start-size 1`.
METHOD_SINKS = {"full": 0, "streaming": 4, "h2o": 0, "snapkv": 0, "tova": 0, "pyramidkv": 0,
                "prefixkv": SINK, "prefixkv-online": SINK, "custom": SINK}

# -- calibration: the prefix search (defaults: the paper's, as its released code runs them) ----
SCORER = "accumulated"   # the paper's importance: attention mass received, summed over query rows
WINDOW = 8               # query rows of the `window` scorer
# how a profile's per-layer lengths are chosen: the paper's prefix search on attention mass,
# ``sensitivity`` (beyond the paper): measured harm of compressing each layer (prefixkv.sensitivity),
# or written out by `prefixkv tune` when a uniform or pyramid configuration won
ALLOCATION_RULES = ("prefix-search", "sensitivity", "uniform", "pyramid")
CALIBRATED_RULES = ("prefix-search", "sensitivity")  # the ones `calibrate --rule` runs
RULE = "prefix-search"
CURVE = "all"            # the cumulative-priority curve spans every position, protected ones included
MIN_LAYER_KEEP = 0.0     # per-layer floor, a fraction of the uniform share (the paper: none)
BLEND = 1.0              # 1 = PrefixKV's lengths (the paper), 0 = uniform lengths
# Beyond the paper, measured on SmolLM2-135M and asked for by name (`make demo` does): blend 0.5
# ranked first at every floor in `prefixkv bench quality --sweep-floor-blend` (calibration-split
# prompts, scorers accumulated / window / last-query, keep 0.1 and 0.2), and 4 sinks.
MEASURED_BLEND = 0.5
MEASURED_SINK = 4
# the search settings above, by name: what `SearchSettings` and a profile's departures are measured against
PAPER_SEARCH = {"curve": CURVE, "sink": SINK, "protect_last": PROTECT_LAST, "min_layer_keep": MIN_LAYER_KEEP,
                "blend": BLEND}


def departures(settings) -> list[str]:
    """The search settings of ``settings`` (any object with those attributes) that differ from
    the paper's, as ``name=value``; None shows as "not recorded"."""
    return [f"{name}={'not recorded' if getattr(settings, name) is None else repr(getattr(settings, name))}"
            for name, value in PAPER_SEARCH.items() if getattr(settings, name) != value]
CALIBRATION_KEEP_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
CALIBRATION_SAMPLES = 16
CALIBRATION_TOKENS = 512

# -- evaluation and validation -----------------------------------------------------------------
EVAL_SAMPLES = 8
EVAL_TOKENS = 512
EVAL_NEW_TOKENS = 32
EVAL_REFERENCE_TOKENS = 64   # continuation tokens of a built-in evaluation sample (its PPL reference)
VALIDATE_PROMPTS = 3
VALIDATE_TOKENS = 320
VALIDATE_NEW_TOKENS = 32
QUALITY_SAMPLES = 4
# The quality tolerances `validate` and `build` check by default, against the full cache on
# QUALITY_SAMPLES evaluation-split samples.  Measured on SmolLM2-135M at keep 0.2 (validation.json of
# `prefixkv build --calibrate --keep 0.2`): scorer window PPL +23.6%, ROUGE-L 0.573 (passes);
# scorer accumulated (the paper's) PPL +102.7%, ROUGE-L 0.212 (fails: the README's Quality section).
MAX_PPL_INCREASE = 0.5   # the engine's PPL at most 1.5 x the full cache's on the same tokens
MIN_ROUGE_L = 0.3        # ROUGE-L of the engine's greedy text against the full cache's, at least this
# ROUGE-L everywhere (eval, validate, bench): F1 of the longest common subsequence of tokens,
# with the Porter stemmer, as rouge-score's own examples and the summarisation literature use it
# (inflections of one word count as the same word).
ROUGE_STEMMER = True

# -- generation --------------------------------------------------------------------------------
MAX_NEW_TOKENS = 64

# -- weight precision of the ONNX Runtime engine (build --weights) -----------------------------
WEIGHT_PRECISIONS = ("fp32", "int8", "int4")
WEIGHTS = "fp32"
WEIGHT_BLOCK = 32            # input channels per quantization scale (MatMulNBits block_size)
WEIGHT_ACCURACY_LEVEL = 4    # MatMulNBits compute type on CPU: 4 = int8 (the fastest)
# A quantized engine's greedy tokens against the fp32 reference fed the same tokens (validate's
# lockstep): at least this share of the steps must agree (fp32 engines: every step).
MIN_TOKEN_AGREEMENT = {"int8": 0.9, "int4": 0.75}

# -- the ONNX Runtime runner -------------------------------------------------------------------
PREFILL_CHUNK = 256      # prompt tokens per decoder-graph run (ONNX Runtime engines)
CACHE_SLACK = 64         # free slots a layer's buffer gets when it is (re)allocated


@dataclass(frozen=True)
class TensorRTProfile:
    """A TensorRT build: precision and the optimization profile's batch and sequence ranges."""

    precision: str = "fp16"
    max_batch: int = 8
    opt_seq: int = 512
    max_seq: int = 4096

    def __post_init__(self):
        if self.precision not in TENSORRT_PRECISIONS:
            raise ValueError(f"TensorRT precision must be one of {', '.join(TENSORRT_PRECISIONS)}, got {self.precision!r}")
        for name in ("max_batch", "opt_seq", "max_seq"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TensorRT {name} must be a positive integer, got {value!r}")
        if self.opt_seq > self.max_seq:
            raise ValueError(f"TensorRT opt_seq ({self.opt_seq}) must not exceed max_seq ({self.max_seq})")


TENSORRT_PRECISIONS = ("fp16", "bf16", "fp32")
TENSORRT = TensorRTProfile()
