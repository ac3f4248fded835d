"""``prefixkv tune``: the best compression for a model and its data, chosen by measurement.

1. Candidates (``Candidate``): every scorer with uniform and pyramid lengths (the plain
   baselines H2O, SnapKV, TOVA, PyramidKV and StreamingLLM among them: StreamingLLM is
   ``recency+uniform`` with 4 sinks and its own decode rule, the oldest entry after the sinks
   evicted), with PrefixKV profiles under the
   paper's curve (all positions, one sink) and the earlier one (unprotected, 4 sinks), with
   blend and floor settings, and with the ``sensitivity`` rule.
2. The data: the calibration split (or the user's rows) in two disjoint parts, one that
   calibrates the profiles and one that tunes: continuation prompts (PPL of the text's own
   continuation, ROUGE-L of the greedy text against the full cache's) and retrieval
   questions planted in that text (accuracy, answer PPL).  One prefill per batch serves
   every candidate (``evaluation.evaluate_many``).
3. The winner (``choose``): per keep fraction and metric, candidates are ranked (ties share
   the mean rank); the lowest mean rank over every (keep, metric) wins; equal mean ranks go
   to the higher mean ROUGE-L against the full cache (agreement), then to the earlier
   candidate in the list.
4. The profile (``winner_profile``): the winner as a retention profile (its scorer, sink
   and per-layer lengths at each keep fraction; uniform and pyramid lengths are written
   out; its decode rule as ``evict_distance``), recording every candidate's scores and the
   data in ``calibration.tune``, so ``eval --profile`` and ``build --profile`` apply it as
   recorded.

No files here.
"""
from __future__ import annotations

import fnmatch
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from . import __version__
from .bench.tasks import retrieval_samples, score
from .calibration import calibrate
from .data import builtin_samples, builtin_text, samples_hash
from .defaults import (
    EVICT_DISTANCE,
    MEASURED_BLEND,
    MEASURED_SINK,
    METHOD_SINKS,
    OLDEST,
    check_evict_distance,
)
from .evaluation import EvalSettings, MethodConfig, evaluate_many, pad_token_id
from .policies import ALLOCATIONS
from .profile import Fingerprint, LayerKeep, RetentionProfile
from .scoring import make_scorer
from .search import SearchSettings
from .sensitivity import calibrate_sensitivity

TASKS = ("continuation", "retrieval")
# per task: (metric, higher is better)
METRICS = {"continuation": (("ppl", False), ("rouge_l", True)), "retrieval": (("accuracy", True), ("answer_ppl", False))}
SCORERS = ("accumulated", "window", "last-query", "key-norm")
RULES = ("uniform", "pyramid", "prefix-search", "sensitivity")


@dataclass(frozen=True)
class Candidate:
    """One configuration: a scorer, how the lengths are chosen (``rule``), and its settings."""

    scorer: str
    rule: str
    sink: int = 0
    curve: str = "all"            # prefix-search only
    blend: float = 1.0            # prefix-search only
    min_layer_keep: float = 0.0   # prefix-search only
    evict_distance: int = EVICT_DISTANCE  # the decode rule (OLDEST: the oldest entry after the sinks)

    def __post_init__(self):
        make_scorer(self.scorer)  # ValueError naming the scorers
        check_evict_distance(self.evict_distance)
        if self.rule not in RULES:
            raise ValueError(f"unknown rule {self.rule!r}; choose {', '.join(RULES)}")
        if self.rule != "prefix-search" and (self.curve, self.blend, self.min_layer_keep) != ("all", 1.0, 0.0):
            raise ValueError(f"curve, blend and floor shape the prefix search, not the {self.rule} rule")
        SearchSettings(curve=self.curve, sink=self.sink, blend=self.blend, min_layer_keep=self.min_layer_keep)

    @property
    def label(self) -> str:
        name = {"prefix-search": "profile"}.get(self.rule, self.rule)
        parts = [f"{self.scorer}+{name}", f"sink={self.sink}"]
        if self.rule == "prefix-search":
            parts.append(f"curve={self.curve}")
            parts += [f"blend={self.blend:g}"] if self.blend != 1 else []
            parts += [f"floor={self.min_layer_keep:g}"] if self.min_layer_keep else []
        if self.evict_distance != EVICT_DISTANCE:
            parts.append("evict=oldest" if self.evict_distance == OLDEST else f"evict={self.evict_distance}")
        return " ".join(parts)

    @property
    def search(self) -> SearchSettings:
        return SearchSettings(curve=self.curve, sink=self.sink, blend=self.blend, min_layer_keep=self.min_layer_keep)


def default_candidates() -> list[Candidate]:
    """The default search: 17 candidates (15 minutes for SmolLM2 at three keep fractions on 2 cores, measured)."""
    out = [Candidate(s, "uniform") for s in SCORERS]            # H2O, SnapKV, TOVA, key-norm
    out.append(Candidate("recency", "uniform", sink=METHOD_SINKS["streaming"], evict_distance=OLDEST))  # StreamingLLM
    out += [Candidate(s, "pyramid") for s in ("window", "last-query")]  # PyramidKV, and TOVA's score
    for s in ("accumulated", "window", "last-query"):
        out.append(Candidate(s, "prefix-search", sink=1))                        # the paper's
        out.append(Candidate(s, "prefix-search", sink=4, curve="unprotected"))   # the earlier rule
    out += [Candidate(s, "prefix-search", sink=MEASURED_SINK, blend=MEASURED_BLEND) for s in ("window", "last-query")]
    out.append(Candidate("window", "prefix-search", sink=MEASURED_SINK, min_layer_keep=0.5))
    out.append(Candidate("window", "sensitivity", sink=MEASURED_SINK))
    return out


def narrow(candidates: Sequence[Candidate], patterns: str | None) -> list[Candidate]:
    """The candidates whose label matches one of the comma-separated shell patterns
    (``window+*``, ``*+uniform*``); None or empty keeps all."""
    if not patterns or not patterns.strip():
        return list(candidates)
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = [c for c in candidates if any(fnmatch.fnmatchcase(c.label, p) or fnmatch.fnmatchcase(c.label, p + " *")
                                           for p in wanted)]
    if not chosen:
        raise ValueError(f"no candidate matches {patterns!r}; candidates are: " + "; ".join(c.label for c in candidates))
    return chosen


# -- the winner rule (pure) --------------------------------------------------------------------
def _ranks(values: list[float], higher: bool) -> list[float]:
    """1 = best; ties share their mean rank; NaN ranks last."""
    keyed = [(-v if higher else v) if not math.isnan(v) else math.inf for v in values]
    order = sorted(range(len(values)), key=lambda i: keyed[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and keyed[order[j + 1]] == keyed[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def choose(scores: dict[str, dict[tuple, float]], higher: dict[str, bool], agreement: dict[str, float]) -> tuple[str, dict]:
    """The winner among candidates' ``scores`` (label -> {(keep, metric): value}, every label
    the same keys); ``higher[metric]``: True where higher is better; ``agreement`` (label ->
    mean ROUGE-L against the full cache) breaks ties, then the order of ``scores``.
    Returns (label, {label: mean rank})."""
    labels = list(scores)
    if not labels:
        raise ValueError("no candidates to choose from")
    keys = sorted(scores[labels[0]])
    if any(sorted(scores[label]) != keys for label in labels):
        raise ValueError("every candidate needs a score for every (keep, metric)")
    total = dict.fromkeys(labels, 0.0)
    for key in keys:
        for label, rank in zip(labels, _ranks([scores[label][key] for label in labels], higher[key[1]])):
            total[label] += rank
    mean = {label: total[label] / len(keys) for label in labels}
    best = min(range(len(labels)), key=lambda i: (mean[labels[i]], -agreement.get(labels[i], 0.0), i))
    return labels[best], mean


# -- the run ------------------------------------------------------------------------------------
@dataclass
class TuneConfig:
    """What ``tune`` measures: keep fractions, tasks, candidates and the sizes of the data."""

    keep_fractions: tuple[float, ...] = (0.1, 0.2, 0.3)
    tasks: tuple[str, ...] = TASKS
    candidates: tuple[Candidate, ...] = field(default_factory=lambda: tuple(default_candidates()))
    data_rows: list | None = None        # the user's rows ({"prompt", "reference"?}); None: the built-in text
    data_name: str = "builtin:calibration"
    calibration_samples: int = 8
    sensitivity_samples: int = 4
    tune_samples: int = 8
    tokens: int = 512
    reference_tokens: int = 32
    new_tokens: int = 32
    retrieval_samples: int = 8
    retrieval_length: int = 1024
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        self.keep_fractions = tuple(sorted({float(k) for k in self.keep_fractions}))
        if not self.keep_fractions or any(not 0 < k < 1 for k in self.keep_fractions):
            raise ValueError(f"keep fractions must be in (0, 1), got {list(self.keep_fractions)}")
        self.tasks = tuple(self.tasks)
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"unknown task {unknown[0]!r}; choose continuation and/or retrieval" if unknown
                             else "give at least one task")
        self.candidates = tuple(self.candidates)
        if not self.candidates:
            raise ValueError("no candidates")
        for name in ("calibration_samples", "sensitivity_samples", "tune_samples", "tokens", "reference_tokens",
                     "new_tokens", "retrieval_samples", "retrieval_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name.replace('_', ' ')} must be a positive integer, got {value!r}")


@dataclass
class TuneResult:
    profile: RetentionProfile
    winner: Candidate
    results: list[dict]          # every candidate's evaluation results (continuation, retrieval)
    mean_rank: dict[str, float]


def _split_data(tokenizer, config: TuneConfig):
    """(calibration token lists, continuation samples, retrieval prose): disjoint parts."""
    from .pipeline import encode

    if config.data_rows is None:
        calib = builtin_samples(tokenizer, "calibration", n=config.calibration_samples, tokens=config.tokens,
                                reference_tokens=0)
        tune = builtin_samples(tokenizer, "calibration", n=config.tune_samples, tokens=config.tokens,
                               reference_tokens=config.reference_tokens, phase=0.5)
        return [encode(tokenizer, s["prompt"]) for s in calib], tune, builtin_text("calibration")
    rows = list(config.data_rows)
    if len(rows) < 2:
        raise ValueError(f"tune needs at least 2 rows of data (one to calibrate, one to tune), got {len(rows)}")
    calib_rows, tune_rows = rows[0::2], rows[1::2]
    tune = []
    for row in tune_rows[: config.tune_samples]:
        if row.get("reference"):
            tune.append({"prompt": row["prompt"], "reference": row["reference"]})
            continue
        ids = encode(tokenizer, row["prompt"])  # no reference: the prompt's own end is the continuation
        if len(ids) < config.reference_tokens + 16:
            raise ValueError(f"a tuning row of {len(ids)} tokens is too short to hold out {config.reference_tokens} "
                             "continuation tokens; give it a \"reference\" or use longer rows")
        tune.append({"prompt": tokenizer.decode(ids[: -config.reference_tokens]),
                     "reference": tokenizer.decode(ids[-config.reference_tokens :])})
    prose = "\n\n".join(r["prompt"] for r in tune_rows)
    return [encode(tokenizer, r["prompt"]) for r in calib_rows[: config.calibration_samples]], tune, prose


def _profiles(model, tokenizer, candidates, calib_ids, keeps, config: TuneConfig, log) -> dict[Candidate, RetentionProfile]:
    """The profile of every prefix-search or sensitivity candidate: one calibration pass per
    search setting (all its scorers at once), one harm measurement per sensitivity scorer."""
    out = {}
    by_search: dict[SearchSettings, list[Candidate]] = {}
    for c in candidates:
        if c.rule == "prefix-search":
            by_search.setdefault(c.search, []).append(c)
    for search, group in by_search.items():
        scorers = sorted({c.scorer for c in group})
        log(f"calibrating {', '.join(scorers)} ({search.departures() or 'the paper’s settings'}) on {len(calib_ids)} prompts")
        run = calibrate(model, calib_ids, keeps, scorers=scorers, search=search, progress=config.progress,
                        seed=config.seed, data_name=config.data_name)
        for c in group:
            out[c] = run.profiles[make_scorer(c.scorer).key]
    for c in candidates:
        if c.rule == "sensitivity":
            log(f"{c.label}: measuring each layer's harm on {min(len(calib_ids), config.sensitivity_samples)} prompts")
            run = calibrate_sensitivity(model, calib_ids[: config.sensitivity_samples], keeps, c.scorer,
                                        search=SearchSettings(sink=c.sink), pad_id=pad_token_id(model, tokenizer),
                                        progress=config.progress, seed=config.seed, data_name=config.data_name)
            (out[c],) = run.profiles.values()
    return out


def _method(c: Candidate, profile) -> MethodConfig:
    if c.rule in ("uniform", "pyramid"):
        return MethodConfig(scorer=c.scorer, allocation=c.rule, sink=c.sink, label=c.label, evict_distance=c.evict_distance)
    return MethodConfig(scorer=c.scorer, allocation="profile", profile=profile, sink=c.sink, label=c.label,
                        evict_distance=c.evict_distance)


def winner_profile(model, c: Candidate, profile: RetentionProfile | None, keeps: Sequence[float]) -> RetentionProfile:
    """The winner as a profile: its own (a calibrated one), or its lengths written out."""
    if profile is not None:
        return replace(profile, calibrated={k: profile.calibrated[k] for k in keeps}, calibration=dict(profile.calibration),
                       evict_distance=c.evict_distance)
    layers = model.config.get_text_config().num_hidden_layers if hasattr(model.config, "get_text_config") else model.config.num_hidden_layers
    allocation = ALLOCATIONS[c.rule]()
    calibrated = {k: LayerKeep([float(x) for x in allocation.fractions(k, layers)], [0.0] * layers) for k in keeps}
    sc = make_scorer(c.scorer)
    return RetentionProfile(fingerprint=Fingerprint.of(model.config), sink=c.sink, calibrated=calibrated, scorer=sc.name,
                            scorer_params=dict(sc.params), rule=c.rule, calibration={}, evict_distance=c.evict_distance)


def tune(model, tokenizer, config: TuneConfig, log=print) -> TuneResult:
    """Evaluate every candidate on the tuning part of the data; the winner as a profile."""
    started = time.time()
    keeps = list(config.keep_fractions)
    calib_ids, tune_samples, prose = _split_data(tokenizer, config)
    profiles = _profiles(model, tokenizer, config.candidates, calib_ids, keeps, config, log)
    methods = [MethodConfig("full")] + [_method(c, profiles.get(c)) for c in config.candidates]
    results: list[dict] = []
    if "continuation" in config.tasks:
        log(f"continuation: {len(tune_samples)} tuning prompts x {len(config.candidates)} candidates x keep {keeps}")
        for r in evaluate_many(model, tokenizer, tune_samples, methods, keeps,
                               EvalSettings(max_new_tokens=config.new_tokens, progress=config.progress)):
            r["task"] = "continuation"
            results.append(r)
    if "retrieval" in config.tasks:
        questions = retrieval_samples(tokenizer, n=config.retrieval_samples, length=config.retrieval_length,
                                      seed=config.seed, text=prose)
        log(f"retrieval: {len(questions)} questions of {config.retrieval_length} tokens x {len(config.candidates)} candidates")
        for r in evaluate_many(model, tokenizer, questions, methods, keeps, EvalSettings(max_new_tokens=8, progress=config.progress)):
            score(r, questions)
            r["task"] = "retrieval"
            results.append(r)
    scores: dict[str, dict[tuple, float]] = {c.label: {} for c in config.candidates}
    higher: dict[str, bool] = {}
    agreement = {c.label: 0.0 for c in config.candidates}
    for r in results:
        if r["label"] not in scores:  # the full cache: the reference, not a candidate
            continue
        for metric, up in METRICS[r["task"]]:
            name = f"{r['task']}.{metric}"
            scores[r["label"]][(r["keep_fraction"], name)] = float(r[metric]) if r[metric] is not None else math.nan
            higher[name] = up
        if r["task"] == "continuation" and r.get("rouge_l") is not None:
            agreement[r["label"]] += r["rouge_l"] / len(keeps)
    label, mean_rank = choose(scores, higher, agreement)
    winner = next(c for c in config.candidates if c.label == label)
    profile = winner_profile(model, winner, profiles.get(winner), keeps)
    profile.calibration = {**profile.calibration, "tool": f"prefixkv {__version__}", "tune": {
        "winner": label,
        "rule": "lowest mean rank over every (keep fraction, task metric); ties: higher mean ROUGE-L vs the full cache",
        "keep_fractions": keeps,
        "tasks": list(config.tasks),
        "data": {"name": config.data_name, "calibration_prompts": len(calib_ids), "calibration_hash": samples_hash(calib_ids),
                 "tuning_prompts": len(tune_samples), "tokens": config.tokens, "reference_tokens": config.reference_tokens,
                 "retrieval_questions": config.retrieval_samples if "retrieval" in config.tasks else 0,
                 "retrieval_length": config.retrieval_length, "seed": config.seed},
        "candidates": [{"label": c.label, "scorer": c.scorer, "rule": c.rule, "sink": c.sink, "curve": c.curve,
                        "blend": c.blend, "min_layer_keep": c.min_layer_keep, "evict_distance": c.evict_distance,
                        "mean_rank": round(mean_rank[c.label], 4),
                        "agreement": round(agreement[c.label], 4),
                        "scores": {f"{k:g} {m}": (round(v, 6) if math.isfinite(v) else None)
                                   for (k, m), v in sorted(scores[c.label].items())}}
                       for c in config.candidates],
        "seconds": round(time.time() - started, 1),
    }}
    return TuneResult(profile, winner, results, mean_rank)
