"""The quality benchmark: every method and (scorer, allocation) pair at several keep fractions.

    python -m prefixkv.bench.quality --output results/quality          (prefixkv bench quality)

1. Calibrate retention profiles on the built-in calibration split (one pass, every scorer
   a profile pair needs); plot per-layer keep fractions and Lorenz curves.
2. Optionally (``--sweep-floor-blend``) sweep the per-layer floor (``min_layer_keep``) and
   the uniform/PrefixKV blend on calibration-split prompts and report the best setting.
3. Tasks on the evaluation split: ``continuation`` (PPL of the next tokens, ROUGE-L of
   greedy text against the full cache) and ``retrieval`` (facts planted at random depths,
   answer accuracy and answer PPL, at each ``--lengths``).  One prefill per batch serves
   every method and keep fraction (``evaluation.evaluate_many``).
4. Paired per-prompt comparisons with bootstrap intervals; the targets of issues 2 and 7
   are checked and stated, met or not.

Writes ``results.json``, ``quality.md`` and PNGs into ``--output`` and prints where.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .. import report
from ..calibration import average, calibrate, score_sample
from ..data import builtin_samples
from ..defaults import MEASURED_BLEND, MEASURED_SINK, METHOD_SINKS
from ..engine_folder import atomic_write_text
from ..evaluation import EvalSettings, MethodConfig, evaluate_many, pad_token_id
from ..models import load_model
from ..policies import METHODS
from ..profile import Fingerprint, RetentionProfile
from ..scoring import make_scorer
from ..search import PAPER, SearchSettings
from ..sensitivity import calibrate_sensitivity
from . import stats
from .tasks import retrieval_samples, score

NAMED = {  # method -> (scorer, allocation) it is made of
    "streaming": ("recency", "uniform"),
    "h2o": ("accumulated", "uniform"),
    "snapkv": ("window", "uniform"),
    "tova": ("last-query", "uniform"),
    "pyramidkv": ("window", "pyramid"),
    "prefixkv": ("accumulated", "profile"),
    "prefixkv-online": ("accumulated", "online"),
}
DEFAULT_METHODS = "full,streaming,h2o,snapkv,tova,pyramidkv,prefixkv,prefixkv-online"
DEFAULT_PAIRS = "window+profile,window+online,last-query+profile,last-query+online"
PAIR_SCORERS = ("accumulated", "window", "last-query", "key-norm")
PAIR_ALLOCATIONS = ("uniform", "pyramid", "online", "profile", "sensitivity")  # sensitivity: a profile by that rule
PREFIXKV_ALLOCATIONS = ("profile", "online")
# Search-setting variants beside the paper's: name -> (scorer, allocations, settings, the paper's
# config of the same scorer and allocation, by label, compared with it pair by pair).
VARIANTS = {
    # the rule before the fidelity issue: curves over the unprotected entries, 4 sinks
    "unprotected": ("accumulated", ("profile", "online"), SearchSettings(curve="unprotected", sink=4),
                    {"profile": "prefixkv", "online": "prefixkv-online"}),
    # `make demo`'s engine: the window score, 4 sinks, blend 0.5
    "demo": ("window", ("profile",), SearchSettings(sink=MEASURED_SINK, blend=MEASURED_BLEND),
             {"profile": "window+profile"}),
}
DEFAULT_VARIANTS = "unprotected,demo"
# each family: primary metric, secondary metric; True where higher is better
FAMILIES = {"continuation": (("ppl", False), ("rouge_l", True)), "retrieval": (("accuracy", True), ("answer_ppl", False))}


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _log(message: str, started: float) -> None:
    print(f"[{time.time() - started:7.1f}s] {message}", file=sys.stderr, flush=True)


def configs_from(methods: str, pairs: str) -> list[MethodConfig]:
    """Named methods, then pairs not already covered by a named method with the same sink (a
    pair keeps ``METHOD_SINKS['custom']``, 1: so ``window+uniform`` runs beside SnapKV's 0
    sinks, and compares with ``window+sensitivity`` at equal sinks)."""
    out, seen = [], set()
    for name in [m.strip() for m in methods.split(",") if m.strip()]:
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
        out.append(MethodConfig(name))
        seen.add((*NAMED.get(name, ("full", "full")), METHOD_SINKS.get(name, 0)))
    if pairs.strip() == "all":
        wanted = [(s, a) for s in PAIR_SCORERS for a in PAIR_ALLOCATIONS]
    elif pairs.strip() in ("", "none"):
        wanted = []
    else:
        wanted = []
        for item in pairs.split(","):
            if "+" not in item:
                raise ValueError(f"a pair is scorer+allocation (e.g. window+profile), got {item!r}")
            wanted.append(tuple(x.strip() for x in item.split("+", 1)))
    for scorer, allocation in wanted:
        if allocation not in PAIR_ALLOCATIONS:
            raise ValueError(f"unknown allocation {allocation!r}; choose {', '.join(PAIR_ALLOCATIONS)}")
        if (scorer, allocation, METHOD_SINKS["custom"]) not in seen:
            if allocation == "sensitivity":  # a profile of that rule, calibrated by _run
                out.append(MethodConfig(scorer=scorer, allocation="profile", label=f"{scorer}+sensitivity",
                                        extra={"rule": "sensitivity"}))
            else:
                out.append(MethodConfig(scorer=scorer, allocation=allocation))
            seen.add((scorer, allocation, METHOD_SINKS["custom"]))
    return out


def _scorer_key(config: MethodConfig, profiles: dict) -> str:
    name = config.scorer or NAMED.get(config.method, ("accumulated", ""))[0]
    return make_scorer(name, **(config.scorer_params or {})).key


def attach_profiles(configs: list[MethodConfig], profiles: dict) -> list[MethodConfig]:
    """Give every profile-allocated config the profile of its own scorer (sensitivity
    pairs: calibrated by that rule in ``_run``)."""
    for c in configs:
        allocation = c.allocation or NAMED.get(c.method, ("", ""))[1]
        if allocation == "profile" and c.profile is None and c.extra.get("rule") != "sensitivity":
            c.profile = profiles[_scorer_key(c, profiles)]
    return configs


def grid_profiles(model, samples, keep_fractions, scorers, grid, search: SearchSettings = PAPER,
                  base=None) -> dict:
    """Profiles for every (min_layer_keep, blend) in ``grid`` from ONE scoring pass.

    ``calibration.calibrate``'s own steps (``SearchSettings.fractions``, ``average``), with
    the scoring pass shared across the grid; ``search`` gives the curve and protected entries.
    Returns {(scorer key, floor, blend): RetentionProfile}.  ``base``: {scorer key: profile}
    whose metadata the new profiles copy.
    """
    kfs = sorted({float(k) for k in keep_fractions})
    scorer_objs = [make_scorer(s) for s in scorers]
    settings = {(f, b): replace(search, min_layer_keep=f, blend=b) for f, b in grid}
    acc = {(sc.key, f, b): [] for sc in scorer_objs for f, b in grid}
    for ids in samples:
        scores = score_sample(model, ids, scorer_objs)
        for sc in scorer_objs:
            for (f, b), setting in settings.items():
                acc[(sc.key, f, b)].append(setting.fractions(scores[sc.key], kfs))
    fingerprint = Fingerprint.of(model.config)
    out = {}
    for (key, f, b), rows in acc.items():
        sc = next(s for s in scorer_objs if s.key == key)
        meta = dict(base[key].calibration) if base and key in base else {}
        out[(key, f, b)] = RetentionProfile(fingerprint=fingerprint, sink=search.sink, protect_last=search.protect_last,
                                            calibrated=average(rows, kfs), scorer=sc.name, scorer_params=dict(sc.params),
                                            min_layer_keep=f, blend=b, curve=search.curve, calibration=meta)
    return out


def variant_label(scorer: str, allocation: str, search: SearchSettings) -> str:
    return f"{scorer}+{allocation} [{', '.join(search.departures()) or 'the paper'}]"


def variant_names(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip() and v.strip() != "none"]
    for name in names:
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)} or none")
    return names


def variant_configs(model, calib_ids, keeps, names, progress, seed, data_name) -> tuple[list[MethodConfig], dict]:
    """The configs of each named variant (profiles calibrated with its own search settings),
    and {label: (variant, the paper's label)} for the comparisons."""
    configs, paired = [], {}
    for name in names:
        scorer, allocations, search, paper = VARIANTS[name]
        profile = None
        if "profile" in allocations:
            profile = calibrate(model, calib_ids, keeps, scorers=[scorer], search=search, progress=progress, seed=seed,
                                data_name=data_name).profiles[make_scorer(scorer).key]
        for allocation in allocations:
            label = variant_label(scorer, allocation, search)
            configs.append(MethodConfig(scorer=scorer, allocation=allocation, search=search, sink=search.sink,
                                        profile=profile if allocation == "profile" else None, label=label))
            paired[label] = (name, paper[allocation])
    return configs, paired


def rule_comparisons(task_results: dict, paired: dict, resamples: int, seed: int) -> list[dict]:
    """Each variant against the paper's settings of the same scorer and allocation, at every
    keep fraction and on every metric of each family (A = the paper's, B = the variant)."""
    rows = []
    for task, results in task_results.items():
        groups = _group(results)
        keeps = sorted({k for (_, k) in groups})
        for label, (variant, paper) in paired.items():
            for keep in keeps:
                a, b = groups.get((paper, keep)), groups.get((label, keep))
                if a is None or b is None:
                    continue
                for metric, higher in FAMILIES[task]:
                    row = comparison_row(task, keep, paper, label, a, b, metric, higher, resamples, seed)
                    row["variant"] = variant
                    rows.append(row)
    return rows


# -- comparisons ----------------------------------------------------------------------------------------
def _figures(results: list[dict], metric: str) -> np.ndarray:
    """Per-prompt figures of one config, concatenated over result groups (e.g. lengths)."""
    rows = [row for r in results for row in r["per_sample"]]
    if metric in ("ppl", "answer_ppl"):
        return np.array([[row["nll_sum"], row["reference_tokens"]] for row in rows], dtype=np.float64)
    if metric == "accuracy":
        return np.array([float(row["correct"]) for row in rows])
    return np.array([row[metric] for row in rows], dtype=np.float64)


def _value(results: list[dict], metric: str) -> float:
    x = _figures(results, metric)
    return stats.pooled_ppl(x) if metric in ("ppl", "answer_ppl") else float(x.mean())


def compare(a: list[dict], b: list[dict], metric: str, resamples: int, seed: int) -> stats.PairedComparison:
    """Paired bootstrap of metric(A) - metric(B) over the same prompts."""
    statistic = stats.pooled_ppl if metric in ("ppl", "answer_ppl") else stats.mean
    return stats.paired_bootstrap(_figures(a, metric), _figures(b, metric), statistic=statistic,
                                  resamples=resamples, seed=seed)


def _group(results: list[dict]) -> dict:
    """(label, keep) -> results over every facet (retrieval lengths), in facet order."""
    out: dict = {}
    for r in sorted(results, key=lambda r: r.get("length") or 0):
        out.setdefault((r["label"], r["keep_fraction"]), []).append(r)
    return out


def _better(diff: float, higher: bool) -> int:
    if abs(diff) < 1e-12:
        return 0
    return 1 if (diff > 0) == higher else -1


def comparison_row(task, keep, a_label, b_label, a, b, metric, higher, resamples, seed) -> dict:
    c = compare(a, b, metric, resamples, seed)
    sign = _better(c.diff, higher)
    sure = c.significant
    verdict = {1: "A better", 0: "tie", -1: "B better"}[sign] + (" (CI excludes 0)" if sure and sign else "")
    wins = losses = None
    if c.wins is not None:  # 1-D figures: count prompts where A is better, direction-aware
        wins, losses = (c.wins, c.losses) if higher else (c.losses, c.wins)
    elif metric in ("ppl", "answer_ppl"):
        fa, fb = _figures(a, metric), _figures(b, metric)
        pa, pb = fa[:, 0] / fa[:, 1], fb[:, 0] / fb[:, 1]
        wins, losses = int((pa < pb).sum()), int((pa > pb).sum())
    return {"task": task, "keep": keep, "a": a_label, "b": b_label, "metric": metric, "a_value": c.a,
            "b_value": c.b, "diff": c.diff, "low": c.low, "high": c.high, "share_positive": c.share_positive,
            "n": c.n, "wins": wins, "losses": losses, "sign": sign, "significant": sure, "verdict": verdict}


def best_prefixkv_pair(task_results: dict, keeps=(0.1, 0.2)) -> str | None:
    """The PrefixKV-allocated label with the best mean rank on each family's primary metric."""
    ranks: dict[str, list[float]] = {}
    for task, results in task_results.items():
        (primary, higher), _ = FAMILIES[task]
        groups = _group(results)
        for keep in keeps:
            cands = {label: _value(rs, primary) for (label, k), rs in groups.items()
                     if math.isclose(k, keep) and rs[0].get("allocation") in PREFIXKV_ALLOCATIONS}
            ordered = sorted(cands, key=lambda label: -cands[label] if higher else cands[label])
            for rank, label in enumerate(ordered):
                ranks.setdefault(label, []).append(rank)
    complete = {label: sum(r) / len(r) for label, r in ranks.items() if len(r) == max(map(len, ranks.values()))}
    return min(complete, key=complete.get) if complete else None


def targets(task_results: dict, resamples: int, seed: int, keeps=(0.1, 0.2)) -> dict:
    """Issue 2 (prefixkv vs h2o/streaming/snapkv on continuation) and issue 7 (best
    PrefixKV-allocated pair vs every uniform method on every family) at ``keeps``."""
    out: dict = {"issue2": {"rows": []}, "issue7": {"rows": []}}
    if "continuation" in task_results:
        groups = _group(task_results["continuation"])
        full = next((rs for (label, _), rs in groups.items() if rs[0]["method"] == "full"), None)
        rows, met = [], True
        for keep in keeps:
            a = groups.get(("prefixkv", keep))
            if a is None:
                met = None
                break
            for other in ("h2o", "streaming", "snapkv"):
                b = groups.get((other, keep))
                if b is None:
                    continue
                ppl = comparison_row("continuation", keep, "prefixkv", other, a, b, "ppl", False, resamples, seed)
                rouge = comparison_row("continuation", keep, "prefixkv", other, a, b, "rouge_l", True, resamples, seed)
                rows += [ppl, rouge]
                met = met and ppl["sign"] > 0 and rouge["sign"] > 0
        out["issue2"] = {"rows": rows, "met": met}
        if full is not None and ("prefixkv", 0.2) in groups:
            c = compare(groups[("prefixkv", 0.2)], full, "ppl", resamples, seed)
            out["issue2"]["ppl_increase_at_0.2"] = {"full": c.b, "prefixkv": c.a, "increase": c.diff,
                                                    "low": c.low, "high": c.high, "paper": 0.49}
    best = best_prefixkv_pair(task_results, keeps)
    out["issue7"]["best_pair"] = best
    if best is None:
        return out
    rows, verdicts = [], []
    for task, results in task_results.items():
        groups = _group(results)
        uniform = sorted({label for (label, _), rs in groups.items() if rs[0].get("allocation") == "uniform"})
        for keep in keeps:
            a = groups.get((best, keep))
            for other in uniform:
                b = groups.get((other, keep))
                if a is None or b is None:
                    continue
                pair_rows = [comparison_row(task, keep, best, other, a, b, m, h, resamples, seed) for m, h in FAMILIES[task]]
                rows += pair_rows
                verdicts.append([r["sign"] for r in pair_rows])
    flat = [s for v in verdicts for s in v]
    out["issue7"].update({
        "rows": rows,
        "at_least_as_good_everywhere": all(s >= 0 for s in flat),
        "strictly_better_somewhere": any(s > 0 for s in flat),
        "worse_cells": sum(s < 0 for s in flat),
        "cells": len(flat),
    })
    out["issue7"]["met"] = out["issue7"]["at_least_as_good_everywhere"] and out["issue7"]["strictly_better_somewhere"]
    return out


def tune_targets(task_results: dict, resamples: int, seed: int) -> dict:
    """Issue 15, at every keep fraction measured: the ``tuned`` row against every uniform
    method on every metric of each family (met: no loss whose interval excludes 0), and each
    sensitivity-allocated row (``S+sensitivity``) against uniform lengths with the same
    scorer: the uniform row of that scorer with the nearest sink (``window+uniform`` is run
    as SnapKV, 0 sinks), the sinks recorded (met: a win whose interval excludes 0 on some
    family, for some scorer)."""
    tuned_rows, rule_rows = [], []
    for task, results in task_results.items():
        groups = _group(results)
        keeps = sorted({k for (_, k) in groups})
        first = {label: rs[0] for (label, _), rs in groups.items()}
        uniform = sorted(label for label, r in first.items() if r.get("allocation") == "uniform")
        sensitive = sorted(label for label, r in first.items() if r.get("allocation") == "sensitivity" and label != "tuned")
        partner = {}
        for label in sensitive:
            same = [u for u in uniform if first[u].get("scorer") == first[label].get("scorer")]
            if same:
                partner[label] = min(same, key=lambda u: abs((first[u].get("sink") or 0) - (first[label].get("sink") or 0)))
        for keep in keeps:
            a = groups.get(("tuned", keep))
            for other in uniform if a is not None else ():
                b = groups.get((other, keep))
                if b is not None:
                    tuned_rows += [comparison_row(task, keep, "tuned", other, a, b, m, h, resamples, seed) for m, h in FAMILIES[task]]
            for label, other in partner.items():
                a, b = groups.get((label, keep)), groups.get((other, keep))
                if a is not None and b is not None:
                    for m, h in FAMILIES[task]:
                        row = comparison_row(task, keep, label, other, a, b, m, h, resamples, seed)
                        row["sinks"] = [first[label].get("sink"), first[other].get("sink")]
                        rule_rows.append(row)
    losses = [r for r in tuned_rows if r["sign"] < 0 and r["significant"]]
    wins = sorted({(r["a"], r["task"]) for r in rule_rows if r["sign"] > 0 and r["significant"]})
    return {
        "tuned": {"rows": tuned_rows, "significant_losses": len(losses), "cells": len(tuned_rows),
                  "met": (not losses) if tuned_rows else None},
        "sensitivity": {"rows": rule_rows, "significant_wins": [list(w) for w in wins],
                        "met": bool(wins) if rule_rows else None},
    }


# -- the run -------------------------------------------------------------------------------------------
def _slim(results: list[dict]) -> list[dict]:
    """Results for the JSON file: without the generated token ids."""
    out = []
    for r in results:
        r = dict(r)
        r["per_sample"] = [{k: v for k, v in row.items() if k != "generation_ids"} for row in r["per_sample"]]
        out.append(r)
    return out


def run_sweep(model, tokenizer, args, keeps, profiles_grid, started) -> list[dict]:
    """Each (scorer, floor, blend) profile at keeps 0.1/0.2 on calibration-split prompts."""
    sweep_keeps = [k for k in keeps if k <= 0.2 + 1e-9] or keeps[:1]
    configs = []
    for (key, floor, blend), profile in profiles_grid.items():
        label = f"{profile.scorer}+profile floor={floor:g} blend={blend:g}"
        configs.append(MethodConfig(scorer=profile.scorer, scorer_params=dict(profile.scorer_params), allocation="profile",
                              profile=profile, label=label, extra={"floor": floor, "blend_setting": blend,
                                                                   "sweep_scorer": profile.scorer}))
    rows = []
    cont = builtin_samples(tokenizer, "calibration", n=args.sweep_samples, tokens=args.prompt_tokens,
                           reference_tokens=args.reference_tokens)
    _log(f"sweep: continuation, {len(configs)} profiles x keep {sweep_keeps}", started)
    res_c = evaluate_many(model, tokenizer, cont, configs, sweep_keeps, EvalSettings(generate=False, batch_size=args.batch_size, progress=not args.quiet))
    length = 1024 if 1024 in _lengths(args) else _lengths(args)[0]
    retr = retrieval_samples(tokenizer, n=args.sweep_samples, length=length, seed=args.seed + 1000,
                             split="calibration", facts=args.facts, chat=args.chat)
    _log(f"sweep: retrieval at {length} tokens", started)
    res_r = evaluate_many(model, tokenizer, retr, configs, sweep_keeps, EvalSettings(max_new_tokens=8, batch_size=_batch(args.batch_size, length), progress=not args.quiet))
    for r in res_r:
        score(r, retr)
    for c_res, r_res in zip(res_c, res_r):
        rows.append({"scorer": c_res["sweep_scorer"], "min_layer_keep": c_res["floor"], "blend": c_res["blend_setting"],
                     "keep_fraction": c_res["keep_fraction"], "ppl": c_res["ppl"], "accuracy": r_res["accuracy"],
                     "answer_ppl": r_res["answer_ppl"], "retrieval_length": length})
    return rows


def sweep_summary(rows: list[dict]) -> dict:
    """Mean rank of each (floor, blend) over scorers x keeps x (PPL, accuracy, answer PPL); lowest wins."""
    settings = sorted({(r["min_layer_keep"], r["blend"]) for r in rows})
    ranks = {s: [] for s in settings}
    cells = sorted({(r["scorer"], r["keep_fraction"]) for r in rows})
    for cell in cells:
        subset = [r for r in rows if (r["scorer"], r["keep_fraction"]) == cell]
        for metric, higher in (("ppl", False), ("accuracy", True), ("answer_ppl", False)):
            values = sorted({r[metric] for r in subset}, reverse=higher)
            for r in subset:
                ranks[(r["min_layer_keep"], r["blend"])].append(values.index(r[metric]))  # ties share a rank
    mean_rank = {s: sum(v) / len(v) for s, v in ranks.items() if v}
    best = min(mean_rank, key=lambda s: (mean_rank[s], s != (0.0, 1.0)))
    per_scorer = {}
    for scorer in sorted({r["scorer"] for r in rows}):
        sub = [r for r in rows if r["scorer"] == scorer]
        score_of = {}
        for s in settings:
            mine = [r for r in sub if (r["min_layer_keep"], r["blend"]) == s]
            score_of[s] = (np.mean([math.log(r["ppl"]) for r in mine]), -np.mean([r["accuracy"] for r in mine]))
        per_scorer[scorer] = min(score_of, key=lambda s: score_of[s])
    return {"best": {"min_layer_keep": best[0], "blend": best[1]},
            "mean_rank": [{"min_layer_keep": s[0], "blend": s[1], "mean_rank": round(r, 3)} for s, r in sorted(mean_rank.items())],
            "best_per_scorer_by_log_ppl": {k: {"min_layer_keep": v[0], "blend": v[1]} for k, v in per_scorer.items()}}


def _lengths(args) -> list[int]:
    return list(args.lengths)


def _batch(batch_size: int, length: int) -> int:
    """Fewer prompts per batch for long prompts (about 8k prompt tokens per batch)."""
    return max(1, min(batch_size, 8192 // max(length, 1)))


def run(args) -> int:
    """The benchmark ``args`` (the namespace of ``prefixkv bench quality``, ``cli.bench``) describe."""
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, list(getattr(args, "argv", [])))
    finally:
        torch.set_num_threads(threads)


def _run(args, argv: list[str]) -> int:
    started = time.time()
    tasks = list(args.tasks)
    for t in tasks:
        if t not in FAMILIES:
            raise ValueError(f"unknown task {t!r}; choose continuation and/or retrieval")
    keeps = sorted(args.keep)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model)
    configs = configs_from(args.methods, args.pairs)
    if getattr(args, "tuned", None):
        tuned = RetentionProfile.load(args.tuned, Fingerprint.of(model.config))
        missing = [k for k in keeps if not any(math.isclose(k, t) for t in tuned.keep_fractions)]
        if missing:
            raise ValueError(f"{args.tuned} was tuned for keep {', '.join(f'{k:g}' for k in tuned.keep_fractions)}, not "
                             f"{missing[0]:g}; pass --keep among those")
        configs.append(MethodConfig(scorer=tuned.scorer, scorer_params=dict(tuned.scorer_params), allocation="profile",
                                    profile=tuned, label="tuned", extra={"tuned": tuned.calibration.get("tune", {}).get("winner")}))
    _log(f"model {args.model}; {len(configs)} configs x keep {keeps}; tasks {tasks}", started)

    # 1. calibration: every scorer a profile-allocated config (or the sweep) needs
    sweep_scorers = [s.strip() for s in args.sweep_scorers.split(",") if s.strip()] if args.sweep_floor_blend else []
    profile_scorers = sorted({_scorer_key_name(c) for c in configs if _allocation(c) == "profile"
                              and c.extra.get("rule") != "sensitivity"} | set(sweep_scorers))
    calib_samples = builtin_samples(tokenizer, "calibration", n=args.calibration_samples, tokens=args.calibration_tokens,
                                    reference_tokens=0)
    calib_ids = [list(tokenizer.encode(s["prompt"], add_special_tokens=False)) for s in calib_samples]
    calibration, profiles, plots = None, {}, []
    if profile_scorers:
        _log(f"calibrating {profile_scorers} on {len(calib_ids)} calibration prompts", started)
        calibration = calibrate(model, calib_ids, keeps, scorers=profile_scorers, progress=not args.quiet,
                                seed=args.seed, data_name=f"builtin:calibration:{args.calibration_tokens}")
        profiles = calibration.profiles
        for key, prof in profiles.items():
            prof.save(out / "profiles" / f"{report.slug(key)}.json")
        plots += report.plot_calibration(calibration, keeps, out / "calibration")
    attach_profiles(configs, profiles)
    for c in configs:
        if c.extra.get("rule") == "sensitivity":
            _log(f"{c.label}: measuring each layer's harm on {len(calib_ids)} calibration prompts", started)
            run = calibrate_sensitivity(model, calib_ids, keeps, c.scorer, pad_id=pad_token_id(model, tokenizer),
                                        progress=not args.quiet, seed=args.seed,
                                        data_name=f"builtin:calibration:{args.calibration_tokens}")
            (c.profile,) = run.profiles.values()
            c.profile.save(out / "profiles" / f"{report.slug(c.label)}.json")
            plots += report.plot_calibration(run, keeps, out / "calibration" / report.slug(c.label))
    variants = variant_names(args.variants)
    paired = {}
    if variants:
        _log(f"variants {variants}: calibrating with their own search settings", started)
        extra, paired = variant_configs(model, calib_ids, keeps, variants, not args.quiet, args.seed,
                                        f"builtin:calibration:{args.calibration_tokens}")
        configs += extra

    # 2. floor / blend sweep on calibration-split prompts
    sweep_rows, sweep = [], None
    if args.sweep_floor_blend:
        grid = [(f, b) for f in _floats(args.floors) for b in _floats(args.blends)]
        _log(f"sweep: {len(grid)} (floor, blend) settings x {sweep_scorers}", started)
        profiles_grid = grid_profiles(model, calib_ids, keeps, sweep_scorers, grid, base=profiles)
        sweep_rows = run_sweep(model, tokenizer, args, keeps, profiles_grid, started)
        sweep = sweep_summary(sweep_rows)
        best = sweep["best"]
        if (best["min_layer_keep"], best["blend"]) != (0.0, 1.0):  # the tuned setting joins the main tables
            for key in profiles:
                tuned = profiles_grid.get((key, best["min_layer_keep"], best["blend"]))
                if tuned is not None:
                    label = f"{tuned.scorer}+profile (floor {best['min_layer_keep']:g}, blend {best['blend']:g})"
                    configs.append(MethodConfig(scorer=tuned.scorer, scorer_params=dict(tuned.scorer_params),
                                          allocation="profile", profile=tuned, label=label))

    # 3. tasks
    task_results: dict[str, list[dict]] = {}
    task_samples: dict[str, list] = {}
    if "continuation" in tasks:
        samples = builtin_samples(tokenizer, "evaluation", n=args.samples, tokens=args.prompt_tokens,
                                  reference_tokens=args.reference_tokens)
        _log(f"continuation: {len(samples)} prompts of {args.prompt_tokens} tokens", started)
        results = evaluate_many(model, tokenizer, samples, configs, keeps, EvalSettings(max_new_tokens=args.max_new_tokens, batch_size=_batch(args.batch_size, args.prompt_tokens), progress=not args.quiet))
        for r in results:
            r["task"], r["length"] = "continuation", args.prompt_tokens
        task_results["continuation"] = results
        task_samples["continuation"] = samples
    if "retrieval" in tasks:
        task_results["retrieval"] = []
        task_samples["retrieval"] = {}
        for length in _lengths(args):
            samples = retrieval_samples(tokenizer, n=args.retrieval_samples, length=length, seed=args.seed,
                                        facts=args.facts, chat=args.chat)
            _log(f"retrieval: {len(samples)} prompts of {length} tokens", started)
            results = evaluate_many(model, tokenizer, samples, configs, keeps, EvalSettings(max_new_tokens=8, batch_size=_batch(args.batch_size, length), progress=not args.quiet))
            for r in results:
                score(r, samples)
                r["task"], r["length"] = "retrieval", length
            task_results["retrieval"] += results
            task_samples["retrieval"][length] = [{k: s[k] for k in ("answer", "subject", "depth", "prompt_tokens")}
                                                 for s in samples]

    # 4. comparisons, tables, plots
    _log("comparisons", started)
    checked = targets(task_results, args.resamples, args.seed, keeps=[k for k in (0.1, 0.2) if k in keeps])
    checked["issue15"] = tune_targets(task_results, args.resamples, args.seed)
    rules = rule_comparisons(task_results, paired, args.resamples, args.seed)
    for task, results in task_results.items():
        facet = "length" if task == "retrieval" else None
        plots.append(report.plot_quality(results, out / f"{task}.png", facet=facet,
                                         title=f"{task} ({args.model})"))
    if task_results.get("retrieval"):
        pooled = pool_lengths(task_results["retrieval"])
        plots.append(report.plot_quality(pooled, out / "retrieval_pooled.png", title="retrieval, all lengths pooled"))
    elapsed = round(time.time() - started, 1)
    settings = {k: v for k, v in vars(args).items()}
    command = "prefixkv " + " ".join(argv)
    document = {
        "command": command.strip(), "argv": argv, "settings": settings, "seconds": elapsed,
        "torch_threads": torch.get_num_threads(),
        "calibration": ({"samples": len(calib_ids), "tokens": args.calibration_tokens, "gini": calibration.gini,
                         "profiles": {k: str(out / "profiles" / f"{report.slug(k)}.json") for k in profiles}}
                        if calibration else None),
        "sweep": {"rows": sweep_rows, **(sweep or {})} if sweep is not None else None,
        "targets": checked,
        "rules": rules,
        "results": {task: _slim(results) for task, results in task_results.items()},
        "samples": {"retrieval": task_samples.get("retrieval")},
        "plots": [str(p) for p in plots],
    }
    atomic_write_text(out / "results.json", json.dumps(document, indent=1, default=_json_default) + "\n")
    markdown = render_markdown(document, task_results, args)
    atomic_write_text(out / "quality.md", markdown)
    print(markdown)
    print(f"wrote {out / 'results.json'}, {out / 'quality.md'} and {len(plots)} plots in {out}/ ({elapsed:.0f} s)")
    return 0


def _allocation(c: MethodConfig) -> str:
    return c.allocation or NAMED.get(c.method, ("", ""))[1]


def _scorer_key_name(c: MethodConfig) -> str:
    return c.scorer or NAMED.get(c.method, ("accumulated", ""))[0]


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    return str(o)


def pool_lengths(results: list[dict]) -> list[dict]:
    """Retrieval results of every length merged per (label, keep): pooled accuracy and answer PPL."""
    pooled = []
    for (label, keep), rs in _group(results).items():
        p = {k: v for k, v in rs[0].items() if k not in ("per_sample", "length")}
        p["per_sample"] = [row for r in rs for row in r["per_sample"]]
        p["samples"] = len(p["per_sample"])
        p["accuracy"] = _value(rs, "accuracy")
        p["correct"] = int(sum(r["correct"] for r in rs))
        p["answer_ppl"] = p["ppl"] = _value(rs, "answer_ppl")
        p["rouge_l"] = _value(rs, "rouge_l") if all(r.get("rouge_l") is not None for r in rs) else None
        p["kv_fraction"] = float(np.mean([r["kv_fraction"] for r in rs]))
        pooled.append(p)
    return pooled


def render_markdown(document: dict, task_results: dict, args) -> str:
    lines = ["# Quality benchmark", "",
             f"Command: `{document['command']}`  ",
             f"Model {args.model}; keep fractions {args.keep}; {document['seconds']:.0f} s on "
             f"{document['torch_threads']} torch threads.", ""]
    if "continuation" in task_results:
        n = task_results["continuation"][0]["samples"]
        lines += [f"## Continuation ({n} evaluation-split prompts of {args.prompt_tokens} tokens)", "",
                  f"PPL of the next {args.reference_tokens} reference tokens, teacher-forced one token per step with "
                  "the compressed cache (compressed after prefill, per-layer budget kept at every step).", "",
                  report.quality_table(task_results["continuation"], "ppl"), "",
                  f"ROUGE-L F1 of {args.max_new_tokens} greedy tokens against the full cache's greedy text:", "",
                  report.quality_table(task_results["continuation"], "rouge_l"), ""]
    if task_results.get("retrieval"):
        results = task_results["retrieval"]
        n = results[0]["samples"]
        lines += [f"## Retrieval ({n} prompts per length, {args.facts} planted fact(s) at random depths)", "",
                  "Answer accuracy (first number of the greedy answer equals the planted value):", "",
                  report.quality_table(results, "accuracy", facet="length"), "",
                  "Answer PPL (teacher-forced PPL of the value):", "",
                  report.quality_table(results, "answer_ppl", facet="length"), "",
                  "All lengths pooled:", "",
                  report.quality_table(pool_lengths(results), "accuracy"), "",
                  report.quality_table(pool_lengths(results), "answer_ppl"), ""]
    sweep = document.get("sweep")
    if sweep:
        rows = sweep["rows"]
        lines += ["## Floor / blend sweep (calibration-split prompts)", "",
                  f"Profiles re-calibrated with each per-layer floor (`min_layer_keep`, share of the uniform share) "
                  f"and blend (1 = PrefixKV lengths, 0 = uniform); continuation PPL ({args.sweep_samples} prompts) and "
                  f"retrieval accuracy / answer PPL ({args.sweep_samples} prompts of {rows[0]['retrieval_length']} tokens).", "",
                  report.markdown_table(["scorer", "floor", "blend", "keep", "PPL", "accuracy", "answer PPL"],
                                        [[r["scorer"], f"{r['min_layer_keep']:g}", f"{r['blend']:g}", f"{r['keep_fraction']:g}",
                                          report.fmt(r["ppl"]), report.fmt(r["accuracy"], "accuracy"),
                                          report.fmt(r["answer_ppl"])] for r in rows]), "",
                  report.markdown_table(["floor", "blend", "mean rank (lower is better)"],
                                        [[f"{r['min_layer_keep']:g}", f"{r['blend']:g}", r["mean_rank"]] for r in sweep["mean_rank"]]),
                  "",
                  f"Best setting by mean rank: floor {sweep['best']['min_layer_keep']:g}, blend {sweep['best']['blend']:g}.", ""]
    if document.get("rules"):
        lines += ["## The paper's search settings against the variants", "",
                  "A = the paper's settings (curve over all positions, 1 sink, blend 1), B = the variant named in "
                  "brackets, same scorer and allocation; paired bootstrap over the same prompts.", "",
                  report.comparison_table(document["rules"]), ""]
    checked = document["targets"]
    i2 = checked.get("issue2", {})
    if i2.get("rows"):
        lines += ["## Target (issue 2): prefixkv vs h2o, streaming, snapkv on continuation", "",
                  report.comparison_table(i2["rows"]), "",
                  f"Met (lower PPL and higher ROUGE-L than all three at every keep checked): **{_yes(i2.get('met'))}**.", ""]
        inc = i2.get("ppl_increase_at_0.2")
        if inc:
            lines += [f"PPL increase over the full cache at keep 0.2: {inc['full']:.2f} → {inc['prefixkv']:.2f} "
                      f"(**{inc['increase']:+.2f}**, 95% CI [{inc['low']:+.2f}, {inc['high']:+.2f}]); the paper reports "
                      f"+0.49 on its model.", ""]
    i7 = checked.get("issue7", {})
    if i7.get("rows"):
        lines += ["## Target (issue 7): best PrefixKV-allocated pair vs every uniform method", "",
                  f"Best PrefixKV-allocated pair (mean rank of PPL / accuracy at keep 0.1 and 0.2): **{i7['best_pair']}**.", "",
                  report.comparison_table(i7["rows"]), "",
                  f"At least as good everywhere: **{_yes(i7['at_least_as_good_everywhere'])}** "
                  f"({i7['worse_cells']} of {i7['cells']} metric cells worse); strictly better somewhere: "
                  f"**{_yes(i7['strictly_better_somewhere'])}**; target met: **{_yes(i7['met'])}**.", ""]
    i15 = checked.get("issue15", {})
    tuned, rule = i15.get("tuned", {}), i15.get("sensitivity", {})
    if tuned.get("rows"):
        lines += ["## Target (issue 15): the tuned row against every uniform method", "",
                  "A = tuned, B = the uniform method; every keep fraction and metric; paired bootstrap over the same prompts.", "",
                  report.comparison_table(tuned["rows"]), "",
                  f"Losses whose interval excludes 0: **{tuned['significant_losses']}** of {tuned['cells']} cells; "
                  f"target met: **{_yes(tuned['met'])}**.", ""]
    if rule.get("rows"):
        won = ", ".join(f"{a} on {t}" for a, t in rule["significant_wins"]) or "none"
        sinks = sorted({(r["a"], r["b"], *r["sinks"]) for r in rule["rows"]})
        lines += ["## Target (issue 15): the sensitivity rule against uniform lengths, same scorer", "",
                  "Pairs (A, B, sinks of A and B): " + "; ".join(f"{a} vs {b} ({sa}, {sb})" for a, b, sa, sb in sinks) + ".", "",
                  report.comparison_table(rule["rows"]), "",
                  f"Wins whose interval excludes 0: {won}; target met: **{_yes(rule['met'])}**.", ""]
    return "\n".join(lines) + "\n"


def _yes(v) -> str:
    return {True: "yes", False: "no", None: "not measured"}[v if v in (True, False) else None]

