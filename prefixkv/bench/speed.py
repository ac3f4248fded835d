"""Speed benchmark: one engine family (keep 1.0 / 0.5 / 0.2) against the PyTorch reference.

    prefixkv bench speed --model smollm2-135m --contexts 512,2048,4096 --keep 1.0,0.5,0.2

For every keep fraction and context length, in the same run: prefill ms (the keep 1.0
engine's prefill has no scoring, no TopK: "without scoring"; the others score and
compact), decode ms/token (median and mean over ``--steps`` greedy steps after ``--warmup``), and
the KV bytes held per layer and in total after the prefill.  Then, at ``--prefill-contexts``,
each ``--prefill-scorers`` engine at the smallest keep fraction and PyTorch's plain SDPA
prefill (``model(ids)``) in a fresh process per point (``prefixkv.bench.point``), in turn
for ``--prefill-rounds`` rounds (``prefill_points``): prefill seconds, peak RSS, RSS after
loading; the engine folders' sizes against the model's safetensors; the decode step of that keep's ``window`` engine with fp32 and with int4
weights at ``--weight-context`` tokens, the two in turn for ``--weight-rounds`` rounds, a fresh
process each (``weight_points``; not when every keep is 1); each keep's decode step and
onnxruntime-genai's at every context, in turn in fresh processes for ``--context-rounds``
rounds (``decode_rounds``: the figure the "no slower than onnxruntime-genai" target reads);
the same two comparisons paired, each pair's decode steps interleaved in ``--paired-blocks``
blocks in each of ``--paired-processes`` fresh processes, the other decoder loaded first in
every other one, the figure their median (``prefixkv.bench.paired``; ``paired`` and
``weights.paired``, each a second target row beside the rounds'), and the smallest keep's
engine against itself (``paired_noise``: the spread the pairing leaves), and at every context
onnxruntime-genai's own graph run from Python as the engine runner runs its decoder
(``genai-graph``, ``prefixkv.bench.genai_graph``) against genai's C++ loop and against the
keep 1 engine (``paired_genai_graph``: what a Python loop costs genai's graph, and the two
full-cache graphs under the same kind of loop; figures, not targets);
and each target of the engine with its measured value (``targets``).  The same decode through the
PyTorch reference (``TorchRunner`` + ``PrefixKVCache``), and onnxruntime-genai's full-cache
model if ``onnxruntime-genai`` is installed.  Writes ``OUTPUT.json`` and ``OUTPUT.png``.

Engines are built once (export only, no validation) and cached under
``prefixkv.models.cache_dir()/bench-engines``, keyed by model, profile and exporter version.
Timings are what this machine measured; nothing here asserts them.
"""
from __future__ import annotations

import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..calibration import calibrate_profile
from ..data import builtin_samples, builtin_text
from ..defaults import PREFILL_CHUNK, SINK, WEIGHT_ACCURACY_LEVEL, WEIGHT_BLOCK
from ..engine_folder import atomic_write_text, is_engine, read_manifest
from ..engines.onnxruntime import OnnxRuntimeRunner
from ..engines.torch import TorchRunner
from ..exporter.onnx import exporter_version
from ..models import cache_dir, load_model, model_folder
from ..optional import optional_import
from ..pipeline import BuildConfig, build_engine
from ..profile import Fingerprint, LayerKeep, RetentionProfile
from .point import genai_generate, load_genai
from .paired import PairPlan, combine, reversed_pair


# -- the engine family ----------------------------------------------------------------------------
def family_profile(model, tokenizer, keeps, profile_path, folder: Path, log):
    """A profile with every keep fraction of ``keeps`` (1.0: all layers 1.0)."""
    fingerprint = Fingerprint.of(model.config)
    partial = sorted(k for k in keeps if k < 1)
    if profile_path:
        profile = RetentionProfile.load(profile_path, fingerprint)
    else:
        cached = folder / f"profile-{fingerprint.config_hash}-{'-'.join(f'{k:g}' for k in partial) or 'full'}.json"
        if cached.is_file():
            profile = RetentionProfile.load(cached, fingerprint)
        elif partial:
            log(f"calibrating a profile for keep {partial} (cached at {cached})")
            rows = builtin_samples(tokenizer, "calibration", n=8, tokens=512, reference_tokens=0)
            samples = [list(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]) for r in rows]
            profile = calibrate_profile(model, samples, partial, progress=False)
            profile.save(cached)
        else:
            profile = RetentionProfile(fingerprint, sink=SINK, calibrated={})
    if any(k >= 1 for k in keeps):
        profile.calibrated[1.0] = LayerKeep([1.0] * fingerprint.layers, [0.0] * fingerprint.layers)
    for k in keeps:
        profile.layer_fractions(k)
    return profile


def engine_family(model, tokenizer, source: str, keeps, profile, folder: Path, log, weights: str = "fp32") -> dict[float, Path]:
    """keep fraction -> engine folder (``weights``: its weight precision), built (export only)
    when not cached."""
    engines = {}
    for keep in keeps:
        fractions = json.dumps([keep, profile.layer_fractions(keep), profile.sink, profile.scorer, profile.protect_last])
        key = hashlib.sha256(f"{profile.fingerprint}|{fractions}|{exporter_version()}".encode()).hexdigest()[:12]
        path = folder / f"{Path(source).name}-k{round(keep * 100)}-{key}{'' if weights == 'fp32' else '-' + weights}"
        if not is_engine(path):
            log(f"building the keep {keep:g} engine (export only, {weights} weights) -> {path}")
            build_engine(BuildConfig(source, path, keep, profile=profile, force=True, validate=False, weights=weights),
                         model=model, tokenizer=tokenizer, log=log)
        engines[keep] = path
    return engines


def given_engines(text: str | None, keeps) -> dict[float, Path]:
    """keep fraction -> folder for the engines named on the command line (manifests checked)."""
    out = {}
    for item in (text or "").split(","):
        if item.strip():
            path = Path(item.strip())
            keep = float(read_manifest(path, verify=False)["keep_fraction"])
            if not any(abs(keep - k) < 1e-9 for k in keeps):
                raise ValueError(f"{path} is a keep {keep:g} engine, not one of --keep {', '.join(f'{k:g}' for k in keeps)}")
            out[next(k for k in keeps if abs(keep - k) < 1e-9)] = path
    return out


# -- timing --------------------------------------------------------------------------------------
def time_runner(runner, prompt_ids: list[int], steps: int, warmup: int, batch: int = 1) -> dict:
    """Prefill once, then ``warmup`` + ``steps`` greedy decode steps; times in ms.

    batch > 1 (ONNX Runtime engines): the prefill's cache is copied into ``batch`` identical
    rows and the decode steps run on all of them (the prefill time is that of one row)."""
    ids, mask = runner.pad([prompt_ids])
    start = time.perf_counter()
    logits, state = runner.prefill(ids, mask)
    prefill_ms = (time.perf_counter() - start) * 1e3
    if batch > 1:
        # the one row as ``batch`` identical rows (the runner's merge of row 0, ``batch`` times)
        logits, state = np.repeat(logits, batch, 0), runner.merge([(state, [0] * batch)], free_slots=False)
    kv = kv_layout(runner, state)
    times = []
    for step in range(warmup + steps):
        token = logits.argmax(-1)
        start = time.perf_counter()
        logits, state = runner.decode(state, token)
        if step >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return {"prefill_ms": prefill_ms, "decode_ms_per_token": statistics.median(times),
            "decode_ms_mean": statistics.fmean(times), "decode_ms_min": min(times), **kv}


def kv_layout(runner, state) -> dict:
    """KV bytes per layer and in total, and entries per layer (batch row 0)."""
    if hasattr(state, "kv"):  # OnnxRuntimeRunner
        itemsize = np.dtype(runner.manifest.get("dtype", "float32")).itemsize
        per_layer = [2 * int(_prod(state.kv[2 * l].shape())) * itemsize for l in range(runner.layers)]
        entries = [int(n) for n in runner.layer_lengths(state)[:, 0]]
    else:  # TorchRunner
        layers = state.cache.layers
        per_layer = [2 * layer.keys.numel() * layer.keys.element_size() for layer in layers]
        entries = [int(n) for n in state.cache.layer_lengths()[:, 0]]
    return {"kv_bytes_per_layer": per_layer, "kv_bytes": sum(per_layer), "entries_per_layer": entries}


def _prod(shape) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


def genai_model(model_folder: Path, folder: Path, precision: str, log) -> Path:
    """onnxruntime-genai's model builder's CPU model of ``model_folder`` (full cache) with
    ``precision`` "fp32" or "int4" weights, built when not cached; int4 with this project's
    weight settings (``defaults.WEIGHT_BLOCK``, ``WEIGHT_ACCURACY_LEVEL``), so the two int4
    stacks run the same kernels on the same blocks."""
    optional_import("onnxruntime_genai", "pip install onnxruntime-genai")
    out = folder / f"genai-{model_folder.name}{'' if precision == 'fp32' else '-' + precision}"
    if not (out / "genai_config.json").is_file():
        import subprocess

        log(f"building the onnxruntime-genai full-cache model ({precision}) -> {out}")
        extra = ([] if precision == "fp32" else
                 ["--extra_options", f"accuracy_level={WEIGHT_ACCURACY_LEVEL}", f"block_size={WEIGHT_BLOCK}"])
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_folder), "-o", str(out),
                        "-p", precision, "-e", "cpu", *extra], check=True)
    return out


def genai_full_cache(model_folder: Path, folder: Path, prompt_ids: list[int], steps: int, warmup: int, log,
                     threads: int | None = None) -> dict:
    """onnxruntime-genai's model builder (fp32, CPU) full-cache model on ``threads`` intra-op
    threads (the engines' count): decode ms/token."""
    og, model = load_genai(genai_model(model_folder, folder, "fp32", log), threads)
    prefill, times = genai_generate(og, model, prompt_ids, steps, warmup)
    times = [t * 1e3 for t in times]
    return {"prefill_ms": prefill * 1e3, "decode_ms_per_token": statistics.median(times), "decode_ms_mean": statistics.fmean(times)}


def one_line(err: Exception) -> str:
    """An error as one line for the results: its type and the first 200 characters of its first line."""
    return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"


def prompt_tokens(tokenizer, length: int) -> list[int]:

    text = builtin_text("evaluation") + "\n\n" + builtin_text("calibration")
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(ids) < length:
        raise ValueError(f"the built-in text has {len(ids)} tokens, fewer than the context {length}")
    return ids[:length]


def genai_points(model, folder: Path, tokenizer, args, log) -> dict:
    """onnxruntime-genai's full-cache decode at every context, or why it was not measured."""

    try:
        return {str(c): genai_full_cache(model_folder(model), folder, prompt_tokens(tokenizer, c), args.steps, args.warmup, log,
                                         args.threads or torch.get_num_threads())
                for c in args.contexts}
    except ImportError:
        return {"skipped": "onnxruntime-genai is not installed (pip install onnxruntime-genai)"}
    except Exception as err:  # an optional comparison: report, never fail the benchmark
        return {"error": one_line(err)}


# -- prefill in a fresh process per point, sizes, targets ----------------------------------------
def point(target, context: int, threads: int, chunk: int | None = None, steps: int | None = None) -> dict:
    """``prefixkv.bench.point``'s measurement of ``target`` (an engine folder, torch:MODEL or genai:FOLDER) in
    a fresh process (its peak RSS is the point's, and no other engine's threads or caches
    share it), or {"error": its last line}."""
    arguments = [str(target), str(context), "--threads", str(threads)]
    arguments += ["--chunk", str(chunk)] if chunk else []
    arguments += ["--steps", str(steps)] if steps is not None else []
    return fresh_process("point", arguments)


def paired(a, b, context: int, plan: PairPlan, run=None) -> dict:
    """``a``'s decode step against ``b``'s (engine folders, genai:FOLDER or genai-graph:FOLDER)
    by ``prefixkv.bench.paired`` in ``plan.processes`` fresh processes, ``b`` loaded first in
    every other one: ``combine``'s figure over the processes (each reversed one told as
    (a, b)), or {"error": ...} where none ran.  ``run``: how a process is run (tests)."""
    run = run or (lambda first, second: fresh_process("paired", [str(first), str(second), str(context), *plan.arguments()]))
    processes = []
    for index in range(plan.processes):
        swapped = index % 2 == 1
        measured = run(b, a) if swapped else run(a, b)
        if swapped and "ratio" in measured:
            measured = reversed_pair(measured)
        processes.append({**measured, "swapped": swapped})
    return combine(processes)


def fresh_process(module: str, arguments: list[str]) -> dict:
    """``python -m prefixkv.bench.MODULE ARGUMENTS``' JSON line, or {"error": its last line}."""
    import subprocess

    proc = subprocess.run([sys.executable, "-m", f"prefixkv.bench.{module}", *arguments], capture_output=True, text=True)
    if proc.returncode:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return {"error": lines[-1][:300] if lines else f"exit status {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def prefill_points(targets: dict[str, str], contexts, chunk: int | None, threads: int, log, rounds: int = 1,
                   measure=point) -> dict:
    """label -> context -> the first round's measurement (``point``'s, a fresh process each,
    or {"error": ...}), with every round's ``prefill_s_rounds`` and ``peak_rss_rounds``.

    ``rounds`` rounds, each running every target at one context in turn before the next
    context (an engine and PyTorch SDPA at the same length run a minute or two apart, so a
    slow spell of the machine falls on both), the targets in reverse order every other round.
    Each engine's round against the ``torch-sdpa`` target of the same round is one ratio
    (``vs_sdpa_rounds``), and their median is its figure (``median_vs_sdpa``): single runs of
    an 8192-token prefill on this project's machine gave 1.07x to 1.50x SDPA for one engine."""
    out = {label: {} for label in targets}
    for r in range(rounds):
        for context in contexts:
            order = list(targets) if r % 2 == 0 else list(reversed(targets))
            row = {label: measure(targets[label], context, threads, chunk) for label in order}
            base = row.get("torch-sdpa", {})
            for label in targets:
                measured = row[label]
                if "error" in measured:
                    log(f"prefill {label} at {context}, round {r + 1}: {measured['error']}")
                else:
                    log(f"prefill {label} at {context}, round {r + 1}: {measured['prefill_s']:.2f} s, "
                        f"peak RSS {measured['peak_rss'] / 2**30:.2f} GiB")
                ratio = None
                if label != "torch-sdpa" and "prefill_s" in measured and "prefill_s" in base:
                    ratio = measured["prefill_s"] / base["prefill_s"]
                out[label].setdefault(str(context), []).append((measured, ratio))
    return {label: {context: summarised(measured) for context, measured in points.items()} for label, points in out.items()}


def summarised(rounds: list[tuple[dict, float | None]]) -> dict:
    """One prefill point from its rounds' (measurement, ratio to SDPA or None): the first round
    that measured it (else the first error), every round's seconds and peak RSS (None where it
    failed), and the ratios with their median."""
    first = next((m for m, _ in rounds if "error" not in m), rounds[0][0])
    entry = {**first, "prefill_s_rounds": [m.get("prefill_s") for m, _ in rounds],
             "peak_rss_rounds": [m.get("peak_rss") for m, _ in rounds]}
    ratios = [r for _, r in rounds if r is not None]
    if ratios:
        entry["vs_sdpa_rounds"], entry["median_vs_sdpa"] = ratios, statistics.median(ratios)
    return entry


def weight_points(engines: dict[str, Path | str], context: int, rounds: int, steps: int, threads: int, log,
                  measure=point) -> dict:
    """The decode step of each weight precision's engine at ``context`` tokens.

    ``engines``: name -> target, names "PRECISION" for this project's engines ("fp32" among
    them) and "genai PRECISION" for onnxruntime-genai's (targets "genai:FOLDER"; optional).
    ``rounds`` rounds, each running every target in turn in a fresh process (``measure``,
    ``point`` by default), so that a slow spell of the machine falls on all of them.  A
    round's step against its own stack's fp32 step is one ratio (``vs_fp32``), and this
    engine's step against onnxruntime-genai's at the same precision another (``vs_genai``).
    The median of a name's ratios is its figure (``median_vs_fp32``, ``median_vs_genai``), and
    ``vs_fp32_rounds`` / ``vs_genai_rounds`` say how many rounds gave one (a failed point
    gives none)."""
    out = {"context": context, "steps": steps, "rounds": []}
    for r in range(rounds):
        row = in_turn(engines, context, threads, steps, measure)
        for name, measured in row.items():
            family, _, precision = name.rpartition(" ")
            set_ratio(measured, row.get(f"{family} fp32".strip(), {}), "vs_fp32")
            if not family:
                set_ratio(measured, row.get(f"genai {precision}", {}), "vs_genai")
        log(f"weights round {r + 1}: {described(row)}")
        out["rounds"].append(row)
    medians(out, engines, "vs_fp32", skip=lambda name: name.endswith("fp32"))  # fp32 against itself
    medians(out, engines, "vs_genai")
    return out


def decode_rounds(engines: dict[str, Path | str], contexts, rounds: int, steps: int, threads: int, log,
                  measure=point) -> dict:
    """The decode step of each engine against onnxruntime-genai's full-cache model, at every
    context: ``rounds`` rounds, each running every target in turn in a fresh process
    (``measure``, ``point`` by default), as ``weight_points`` does.  ``engines``: name ->
    target, with "genai" -> "genai:FOLDER" among them.  A round's step against genai's step of
    the same round is one ratio (``vs_genai``); per context, the median of a name's ratios is
    its figure (``median_vs_genai``) and ``vs_genai_rounds`` says how many rounds gave one."""
    out = {}
    for context in contexts:
        entry = {"rounds": []}
        for r in range(rounds):
            row = in_turn(engines, context, threads, steps, measure)
            for name, measured in row.items():
                if name != "genai":
                    set_ratio(measured, row.get("genai", {}), "vs_genai")
            log(f"decode at {context}, round {r + 1}: {described(row)}")
            entry["rounds"].append(row)
        medians(entry, engines, "vs_genai")
        out[str(context)] = entry
    return out


def paired_points(pairs: dict[str, tuple], context: int, plan: PairPlan, log, measure=paired) -> dict:
    """name -> ``paired``'s measurement of the pair (A, B) at ``context`` tokens: A's decode
    step against B's, interleaved in each of ``plan.processes`` processes, or {"error": ...}."""
    out = {}
    for name, (a, b) in pairs.items():
        measured = measure(a, b, context, plan)
        if "ratio" in measured:
            run = f"; {run_figure(measured)}" if "run_ratio" in measured else ""
            log(f"paired at {context}: {name} {measured['a_ms_per_token']:.2f} against {measured['b_ms_per_token']:.2f} "
                f"ms/token, {measured['ratio']:.3f}x ({process_figures(measured)}{run})")
        else:
            log(f"paired at {context}: {name} {measured.get('error')}")
        out[name] = measured
    return out


def process_figures(measured: dict) -> str:
    """A combined pair's processes in words: how many, of how many blocks, and each one's ratio
    (marked where the second decoder was loaded first)."""
    each = ", ".join(f"{r:.3f}{' B first' if s else ''}" for r, s in zip(measured["process_ratios"], measured["swapped"]))
    errors = measured.get("errors", [])
    failed = f"; {len(errors)} more failed: {errors[0]}" if errors else ""
    within = ""
    if "balanced_ratio" in measured:
        interval = measured.get("balanced_interval")
        within = f"; balanced over the orders {measured['balanced_ratio']:.3f}" + (
            f" (95 % interval {interval[0]:.3f} to {interval[1]:.3f})" if interval else "")
    return f"median of {len(measured['process_ratios'])} processes of {measured['blocks']} blocks: {each}{within}{failed}"


def run_figure(measured: dict) -> str:
    """A combined pair's run ratio in words, saying so where it comes from one load order only
    (against ``genai:``, whose loop gives no runs, the processes that loaded A first)."""
    orders = set(measured["run_ratio_swapped"])
    if len(orders) == 2 or len(measured["run_ratio_swapped"]) == len(measured["process_ratios"]):
        return f"its run alone {measured['run_ratio']:.3f}x"
    first = "B" if orders == {True} else "A"
    return (f"its run alone {measured['run_ratio']:.3f}x (median of the {measured['run_ratio_processes']} "
            f"processes that loaded {first} first only)")


def genai_graph_pairs(engines: dict, genai: str) -> dict[str, tuple]:
    """The ``paired_genai_graph`` pairs: onnxruntime-genai's graph run from Python
    (``genai-graph:FOLDER``) against genai itself (``genai``: ``genai:FOLDER``), and the keep
    1 engine, if there is one, against that graph."""
    graph = "genai-graph:" + genai.split(":", 1)[1]
    pairs = {"genai-graph against genai": (graph, genai)}
    if 1.0 in engines:
        pairs["keep 1 against genai-graph"] = (str(engines[1.0]), graph)
    return pairs


# the rounds' shared steps (``weight_points``, ``decode_rounds``)
STEP = "decode_ms_per_token"


def in_turn(engines: dict, context: int, threads: int, steps: int, measure) -> dict:
    """One round: every target measured in turn, name -> its measurement."""
    return {name: measure(target, context, threads, steps=steps) for name, target in engines.items()}


def set_ratio(measured: dict, base: dict, key: str) -> None:
    """``measured[key]``: its step over ``base``'s, where both were measured."""
    if base.get(STEP) and measured.get(STEP):
        measured[key] = measured[STEP] / base[STEP]


def medians(out: dict, names, key: str, skip=lambda name: False) -> None:
    """``out["median_" + key]`` and ``out[key + "_rounds"]`` per name from ``out["rounds"]``."""
    for name in names:
        ratios = [row[name][key] for row in out["rounds"] if key in row[name]]
        if ratios and not skip(name):
            out.setdefault(f"median_{key}", {})[name] = statistics.median(ratios)
            out.setdefault(f"{key}_rounds", {})[name] = len(ratios)


def described(row: dict) -> str:
    """A round as one log line."""
    return ", ".join(f"{name} {m[STEP]:.2f} ms/token" if STEP in m else f"{name} {m.get('error')}" for name, m in row.items())


def folder_bytes(folder: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob(pattern) if p.is_file())


def sizes(engines: dict[str, Path], model) -> dict:
    """Engine folder bytes and weight bytes (the decoder graph's data file) per engine, and the
    model's safetensors."""
    folder = model_folder(model)
    out = {"safetensors": folder_bytes(folder, "*.safetensors") if folder else None, "engines": {}}
    for label, path in engines.items():
        out["engines"][label] = {"folder": folder_bytes(path), "weights": folder_bytes(path, "*.onnx.data")}
    return out


# the targets: (what, limit)
PREFILL_VS_SDPA = {"accumulated": 1.4}  # every other score: 1.1
TARGETS = {"peak_rss_gib_at_8192": 2.0, "folder_vs_safetensors": 1.1, "rss_after_load_vs_weights": 1.3}
TARGETS_VS_FP32 = {"int4": 0.4}  # a weight precision's decode step against the fp32 engine's, batch 1


def paired_label(measured: dict) -> str:
    return f"paired, {process_figures(measured)}"


def targets(results: dict) -> list[dict]:
    """Each target that was measured: its value, its limit and whether it was met."""

    def row(target: str, value: float, limit: float) -> dict:
        value = round(value, 3)  # as reported: 4.2 s / 3.0 s is 1.4x, within a 1.4x limit
        return {"target": target, "value": value, "limit": limit, "met": value <= limit}

    rows, prefill, sdpa = [], results.get("prefill") or {}, (results.get("prefill") or {}).get("torch-sdpa", {})
    size = results.get("sizes") or {}
    for label, points in prefill.items():
        if label == "torch-sdpa":
            continue
        scorer = label.split(":", 1)[0]
        limit = PREFILL_VS_SDPA.get(scorer, 1.1)
        for context, point in points.items():
            base = sdpa.get(context, {})
            if "median_vs_sdpa" in point:  # the rounds' figure
                rows.append(row(f"{label} prefill at {context} <= {limit}x PyTorch SDPA (median of "
                                f"{len(point['vs_sdpa_rounds'])} rounds)", point["median_vs_sdpa"], limit))
            elif "prefill_s" in point and "prefill_s" in base:
                rows.append(row(f"{label} prefill at {context} <= {limit}x PyTorch SDPA",
                                point["prefill_s"] / base["prefill_s"], limit))
        point = points.get("8192", {})
        peaks = [p for p in point.get("peak_rss_rounds") or [point.get("peak_rss")] if p]
        if peaks:  # the highest round's: the target is a bound
            limit = TARGETS["peak_rss_gib_at_8192"]
            rows.append(row(f"{label} peak RSS at 8192 <= {limit} GiB", max(peaks) / 2**30, limit))
        engine = size.get("engines", {}).get(label)
        if engine and size.get("safetensors"):
            limit = TARGETS["folder_vs_safetensors"]
            rows.append(row(f"{label} folder <= {limit}x safetensors", engine["folder"] / size["safetensors"], limit))
        loaded = [p["rss_after_load"] for p in points.values() if "rss_after_load" in p]
        if engine and loaded:
            limit = TARGETS["rss_after_load_vs_weights"]
            rows.append(row(f"{label} RSS after load <= {limit}x weights", max(loaded) / engine["weights"], limit))
            anonymous = [p["rss_anon_after_load"] for p in points.values() if p.get("rss_anon_after_load")]
            if anonymous:  # beside the target, not instead of it: the file-backed pages are the mapped weights
                rows.append(row(f"{label} anonymous RSS after load <= {limit}x weights (file-backed pages aside)",
                                max(anonymous) / engine["weights"], limit))
    weights = results.get("weights") or {}
    for name, ratio in (weights.get("median_vs_fp32") or {}).items():
        if name in TARGETS_VS_FP32:
            rows.append(row(f"{name} decode at {weights['context']} <= {TARGETS_VS_FP32[name]}x fp32 (median of "
                            f"{weights['vs_fp32_rounds'][name]} rounds)", ratio, TARGETS_VS_FP32[name]))
    for name, ratio in (weights.get("median_vs_genai") or {}).items():
        rows.append(row(f"{name} decode at {weights['context']} <= onnxruntime-genai's {name} (median of "
                        f"{weights['vs_genai_rounds'][name]} rounds)", ratio, 1.0))
    for name, measured in (weights.get("paired") or {}).items():
        if name in TARGETS_VS_FP32 and "ratio" in measured:
            rows.append(row(f"{name} decode at {weights['context']} <= {TARGETS_VS_FP32[name]}x fp32 ({paired_label(measured)})",
                            measured["ratio"], TARGETS_VS_FP32[name]))
    for context, entries in (results.get("paired") or {}).items():
        for name, measured in (entries if isinstance(entries, dict) else {}).items():
            if isinstance(measured, dict) and "ratio" in measured:
                rows.append(row(f"{name} decode at {context} <= onnxruntime-genai's ({paired_label(measured)})",
                                measured["ratio"], 1.0))
    rounds = {c: e for c, e in (results.get("decode_rounds") or {}).items() if isinstance(e, dict)}  # not "skipped"
    for context, entry in rounds.items():
        for name, ratio in (entry.get("median_vs_genai") or {}).items():
            rows.append(row(f"{name} decode at {context} <= onnxruntime-genai's (median of {entry['vs_genai_rounds'][name]} "
                            "rounds)", ratio, 1.0))
    genai, paired = results.get("genai") or {}, results.get("paired") or {}
    for keep, points in results.get("onnxruntime", {}).items():
        if float(keep) < 1:
            continue
        for context, point in points.items():
            other = genai.get(context)
            # the rounds' or the paired figure stands for this context: the one-shot points share the bench's
            # process, genai's model loaded after the engine, and a decoder loaded first ran slower
            # (genai's graph at 7936 tokens: 75 to 86 ms loaded first, 65 to 74 ms second; ``docs/engine_v2.md``,
            # 2026-12-06, 17:15)
            if (rounds.get(context) or {}).get("median_vs_genai") or "ratio" in ((paired.get(context) or {})
                                                                                  .get(f"keep {keep}") or {}):
                continue
            if isinstance(other, dict) and "decode_ms_per_token" in other:
                rows.append(row(f"keep {keep} decode at {context} <= onnxruntime-genai's (one point each in the "
                                "bench's process, genai loaded second)",
                                point["decode_ms_per_token"] / other["decode_ms_per_token"], 1.0))
    return rows


def prefill_engines(model, tokenizer, source: str, keep: float, scorers, folder: Path, log,
                    weights: str = "fp32") -> dict[str, Path]:
    """"SCORER:keep K" -> an engine of that score at ``keep`` (its own calibrated profile;
    ``weights``: its weight precision), built when not cached."""
    out = {}
    for scorer in scorers:
        fingerprint = Fingerprint.of(model.config)
        cached = folder / f"profile-{fingerprint.config_hash}-{scorer}-{keep:g}.json"
        if cached.is_file():
            profile = RetentionProfile.load(cached, fingerprint)
        else:
            log(f"calibrating a {scorer} profile for keep {keep:g} (cached at {cached})")
            rows = builtin_samples(tokenizer, "calibration", n=8, tokens=512, reference_tokens=0)
            samples = [list(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]) for r in rows]
            profile = calibrate_profile(model, samples, [keep], scorer=scorer, progress=False)
            profile.save(cached)
        out[f"{scorer}:keep {keep:g}"] = engine_family(model, tokenizer, source, [keep], profile, folder, log, weights)[keep]
    return out


# -- main ----------------------------------------------------------------------------------------
def run(args) -> int:
    """The benchmark ``args`` (the namespace of ``prefixkv bench speed``, ``cli.bench``) describe."""

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)



    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    limit = int(getattr(text, "max_position_embeddings", 2048))
    weighed = args.weight_rounds and min(args.keep) < 1  # the weight-precision points run (at the smallest keep < 1)
    paired_on = bool(args.paired_blocks) and args.batch == 1  # the paired points run (batch 1 only)
    plan = PairPlan(args.threads or 2, args.paired_blocks, args.block_steps, args.paired_processes) if paired_on else None
    steps = max(args.warmup + args.steps, args.paired_blocks * args.block_steps + 2 if paired_on else 0)
    too_long = [c for c in (*args.contexts, *([args.weight_context] if weighed else [])) if c + steps > limit]
    if too_long:
        raise ValueError(f"contexts {too_long} plus {steps} decode steps exceed the model's context of {limit}")
    folder = Path(args.engines_dir) if args.engines_dir else cache_dir() / "bench-engines"
    folder.mkdir(parents=True, exist_ok=True)
    keeps = sorted(set(args.keep), reverse=True)
    given = given_engines(args.engines, keeps)
    missing = [k for k in keeps if k not in given]
    engines = dict(given)
    if missing:
        profile = family_profile(model, tokenizer, missing, args.profile, folder, log)
        engines.update(engine_family(model, tokenizer, args.model, missing, profile, folder, log))

    results = {"model": args.model, "keep_fractions": keeps, "contexts": args.contexts, "steps": args.steps, "batch": args.batch,
               "threads": args.threads or torch.get_num_threads(), "engines": {f"{k:g}": str(p) for k, p in engines.items()},
               "onnxruntime": {}, "torch": {}, "genai": None}
    for keep in keeps:
        runner = OnnxRuntimeRunner(engines[keep], threads=args.threads, verify=False)
        profile = RetentionProfile.load(engines[keep] / "profile.json", Fingerprint.of(model.config))
        reference = None if args.no_torch or args.batch > 1 else (
            TorchRunner(model, engines[keep], keep_fraction=1.0) if keep >= 1 else
            TorchRunner(model, engines[keep], profile=profile, keep_fraction=keep, method="prefixkv"))
        for context in args.contexts:
            ids = prompt_tokens(tokenizer, context)
            timed = time_runner(runner, ids, args.steps, args.warmup, args.batch)
            results["onnxruntime"].setdefault(f"{keep:g}", {})[str(context)] = timed
            line = f"keep {keep:g} context {context}: onnxruntime prefill {timed['prefill_ms']:.0f} ms, decode {timed['decode_ms_per_token']:.2f} ms/token, KV {timed['kv_bytes'] / 2**20:.1f} MiB"
            if reference is not None:
                with torch.no_grad():
                    ref = time_runner(reference, ids, args.steps, args.warmup)
                results["torch"].setdefault(f"{keep:g}", {})[str(context)] = ref
                line += f"; torch prefill {ref['prefill_ms']:.0f} ms, decode {ref['decode_ms_per_token']:.2f} ms/token"
            log(line)
        del runner
    results["genai"] = genai_points(model, folder, tokenizer, args, log) if args.batch == 1 else {"skipped": "batch 1 only"}
    if args.context_rounds and args.batch == 1:
        try:  # the same steps in fresh processes, in turn with onnxruntime-genai's, round by round
            targets_ = {f"keep {k:g}": str(engines[k]) for k in keeps}
            targets_["genai"] = f"genai:{genai_model(model_folder(model), folder, 'fp32', log)}"
            results["decode_rounds"] = decode_rounds(targets_, args.contexts, args.context_rounds, args.steps,
                                                     args.threads or 2, log)
        except ImportError as err:
            results["decode_rounds"] = {"skipped": str(err)}
    if paired_on:
        smallest = str(engines[min(keeps)])  # the same engine against itself: what is left of the noise
        results["paired_noise"] = paired_points({f"keep {min(keeps):g} against itself": (smallest, smallest)},
                                                min(args.contexts), plan, log)
        try:  # each keep's engine and onnxruntime-genai's, their steps interleaved
            genai = f"genai:{genai_model(model_folder(model), folder, 'fp32', log)}"
            results["paired"] = {str(c): paired_points({f"keep {k:g}": (str(engines[k]), genai) for k in keeps}, c, plan, log)
                                 for c in args.contexts}
        except ImportError as err:
            results["paired"] = {"skipped": str(err)}
        except Exception as err:  # genai's model failed to build: the measurements above are still written
            results["paired"] = {"error": one_line(err)}
            log(f"paired points: {results['paired']['error']}")
        if not {"skipped", "error"} & set(results["paired"]):
            try:  # genai's graph under a Python loop, against genai's loop and against the keep 1 engine
                results["paired_genai_graph"] = {str(c): paired_points(genai_graph_pairs(engines, genai), c, plan, log)
                                                 for c in args.contexts}
            except Exception as err:  # the figures above are still written
                results["paired_genai_graph"] = {"error": one_line(err)}
                log(f"genai-graph points: {results['paired_genai_graph']['error']}")
    elif args.paired_blocks:
        results["paired"] = {"skipped": "batch 1 only"}
    if args.prefill_contexts and not args.no_prefill:
        smallest = min(keeps)
        prefill = prefill_engines(model, tokenizer, args.model, smallest, args.prefill_scorers, folder, log) if smallest < 1 else {}
        targets_ = {**prefill, "torch-sdpa": f"torch:{args.model}"}
        results["prefill_chunk"] = args.prefill_chunk or PREFILL_CHUNK
        results["prefill"] = prefill_points(targets_, args.prefill_contexts, args.prefill_chunk, args.threads or 2, log,
                                           args.prefill_rounds)
        results["sizes"] = sizes(prefill, model)
    if weighed:
        smallest = min(keeps)
        try:
            engines_ = {w: prefill_engines(model, tokenizer, args.model, smallest, ["window"], folder, log, w)[f"window:keep {smallest:g}"]
                        for w in ("fp32", "int4")}
            genai = None
            try:  # onnxruntime-genai's own fp32 and int4 models in the same rounds: the stack's own ratio
                engines_.update({f"genai {w}": f"genai:{genai_model(model_folder(model), folder, w, log)}" for w in ("fp32", "int4")})
            except ImportError as err:
                genai = {"skipped": str(err)}
            results["weights"] = weight_points(engines_, args.weight_context, args.weight_rounds, args.steps,
                                               args.threads or 2, log)
            if paired_on:  # int4 against fp32, interleaved (and genai's own pair)
                pairs = {name: (engines_[name], engines_[name.replace("int4", "fp32")])
                         for name in ("int4", "genai int4") if name in engines_}
                results["weights"]["paired"] = paired_points(pairs, args.weight_context, plan, log)
            if genai:
                results["weights"]["genai"] = genai
        except Exception as err:  # a failed build: the measurements above are still written
            results["weights"] = {"error": one_line(err)}
            log(f"weight-precision points: {results['weights']['error']}")
    if results.get("prefill") or results.get("weights") or results.get("decode_rounds") or results.get("paired"):
        results["targets"] = targets(results)
        for row in results["targets"]:
            log(f"target {row['target']}: {row['value']} ({'met' if row['met'] else 'NOT met'})")

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)

    atomic_write_text(output.with_suffix(".json"), json.dumps(results, indent=2) + "\n")
    log(f"written: {output.with_suffix('.json')}")
    try:
        log(f"written: {plot(results, output.with_suffix('.png'))}")
    except ImportError as err:
        log(f"plot skipped ({err})")
    print(json.dumps(summary(results)))
    return 0


def summary(results: dict) -> dict:
    """Decode ms/token per backend, keep fraction and context."""
    out = {}
    for backend in ("onnxruntime", "torch"):
        for keep, points in results[backend].items():
            out[f"{backend}:keep={keep}"] = {c: round(p["decode_ms_per_token"], 2) for c, p in points.items()}
    return out


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_decode, ax_prefill, ax_kv) = plt.subplots(1, 3, figsize=(15, 4.2))
    for backend, style in (("onnxruntime", "-o"), ("torch", "--s")):
        for keep, points in results[backend].items():
            contexts = [int(c) for c in points]
            ax_decode.plot(contexts, [p["decode_ms_per_token"] for p in points.values()], style, label=f"{backend} keep {keep}")
            ax_prefill.plot(contexts, [p["prefill_ms"] for p in points.values()], style, label=f"{backend} keep {keep}")
            if backend == "onnxruntime":
                ax_kv.plot(contexts, [p["kv_bytes"] / 2**20 for p in points.values()], style, label=f"keep {keep}")
    genai = results.get("genai") or {}
    if genai and all(isinstance(v, dict) and "decode_ms_per_token" in v for v in genai.values()):
        ax_decode.plot([int(c) for c in genai], [v["decode_ms_per_token"] for v in genai.values()], ":^", label="onnxruntime-genai full")
    ax_decode.set(title="decode (ms / token)", xlabel="context (tokens)", ylabel="ms")
    ax_prefill.set(title="prefill (ms; keep 1.0 = no scoring)", xlabel="context (tokens)", ylabel="ms")
    ax_kv.set(title="KV cache after prefill (MiB)", xlabel="context (tokens)", ylabel="MiB")
    for ax in (ax_decode, ax_prefill, ax_kv):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{Path(results['model']).name}: PrefixKV engines vs PyTorch reference ({results['threads']} threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

