"""Validate an engine against the PyTorch reference (``TorchRunner`` + ``PrefixKVCache``), text or images.

    prefixkv validate engines/smollm2-k20 --json report.json
    validate_engine("engines/llava-k20", ValidationConfig(samples=load_samples("llava.json")))

The modality is chosen once, from the manifest: a vision engine's prompts carry images
(given samples, or synthetic pictures), its runners take them, and the same checks run.
The report passes when every check does:

    vision      (vision engines) the vision graph vs the model's own ``get_image_features``
    graph       Polygraphy's Comparator runs the engine's prefill (ONNX Runtime: the decoder
                graph chunk by chunk, then the compact graph) and the reference on the same
                feeds (a padded batch and a single prompt; vision engines: both sides get the reference's image embeddings): logits and
                compacted caches within atol/rtol, kept positions and validity identical
                in every layer.
    generation  greedy decoding in lockstep on N prompts: at every step the engine's and the
                reference's argmax agree (so free-running greedy outputs are identical) and
                every layer keeps the same original positions.
    quality     (text engines) against the full cache on the evaluation split: perplexity of
                the reference continuation (teacher forced) and ROUGE-L of greedy outputs,
                against ``max_ppl_increase`` / ``min_rouge_l`` (defaults in ``prefixkv.defaults``;
                with neither, the numbers are "reported", not judged).
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata
from polygraphy.comparator import Comparator, CompareFunc
from polygraphy.logger import G_LOGGER

from .. import defaults
from ..data import builtin_samples
from ..engine_folder import atomic_write_text, read_manifest
from ..metrics import rouge_l
from ..vision.data import default_samples
from . import backend_name, load_runner
from .base import GenerationConfig
from .onnxruntime import compact_entries
from .torch import TorchRunner, TorchVisionRunner, reference_settings

TEXT_CHECKS = ("graph", "generation", "quality")
VISION_CHECKS = ("vision", "graph", "generation")
CHECKS = ("vision", "graph", "generation", "quality")
CACHE_PARTS = ("key", "value", "positions", "valid")
LOGITS_ATOL, CACHE_ATOL, RTOL = 2e-3, 1e-3, 1e-3
# reference scores this close are a tie: a choice among them is as good by the reference's own
# scores (the same token's layer-0 keys differ only by rotation, so their norms tie up to rounding)
TIE_RTOL = 1e-5


@dataclass
class ValidationConfig:
    """What ``validate_engine`` checks, on what, and within which tolerances.

    checks: None = every check of the engine's modality (``TEXT_CHECKS`` / ``VISION_CHECKS``),
    without ``quality`` when ``quality`` is False.
    prompts: texts for the graph and generation checks (default: ``n_prompts`` windows of
    ``prompt_tokens`` tokens of the evaluation split).  samples: prompts with images, dicts
    ``{"prompt", "image"}`` (vision engines; default: ``n_prompts`` synthetic pictures, the
    last prompt text-only).  chat: wrap vision prompts in the chat template.
    max_ppl_increase / min_rouge_l: quality thresholds (``defaults.MAX_PPL_INCREASE`` /
    ``defaults.MIN_ROUGE_L``; None: reported, not checked).
    backend: the runner under test ("auto": the engine's own; "onnxruntime", "tensorrt").
    json_path: also write the report there.
    """

    checks: tuple[str, ...] | None = None
    quality: bool = True
    prompts: list[str] | None = None
    samples: list[dict] | None = None
    n_prompts: int = defaults.VALIDATE_PROMPTS
    prompt_tokens: int = defaults.VALIDATE_TOKENS
    max_new_tokens: int = defaults.VALIDATE_NEW_TOKENS
    quality_samples: int = defaults.QUALITY_SAMPLES
    quality_tokens: int = defaults.EVAL_TOKENS
    quality_new_tokens: int = defaults.EVAL_NEW_TOKENS
    logits_atol: float = LOGITS_ATOL
    cache_atol: float = CACHE_ATOL
    rtol: float = RTOL
    max_ppl_increase: float | None = defaults.MAX_PPL_INCREASE
    min_rouge_l: float | None = defaults.MIN_ROUGE_L
    min_token_agreement: float | None = None  # quantized engines: None = defaults.MIN_TOKEN_AGREEMENT[precision]
    chat: bool = False
    providers: str | list | None = None
    threads: int | None = None
    prefill_chunk: int | None = None  # ONNX Runtime engines: prompt tokens per decoder run (None: the default)
    backend: str = "auto"
    json_path: str | Path | None = None

    def __post_init__(self):
        if self.checks is not None:
            self.checks = tuple(self.checks)
            unknown = set(self.checks) - set(CHECKS)
            if unknown:
                raise ValueError(f"unknown checks {sorted(unknown)}; choose from {', '.join(CHECKS)}")
        for name in ("n_prompts", "prompt_tokens", "max_new_tokens", "quality_samples", "quality_tokens", "quality_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"validation {name} must be a positive integer, got {value!r}")
        for name in ("logits_atol", "cache_atol", "rtol"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"validation {name} must be a finite number >= 0, got {value!r}")
        if self.max_ppl_increase is not None and not math.isfinite(self.max_ppl_increase):
            raise ValueError(f"max_ppl_increase must be a finite number (0.1 = 10%), got {self.max_ppl_increase!r}")
        if self.min_rouge_l is not None and not 0 <= self.min_rouge_l <= 1:
            raise ValueError(f"min_rouge_l must be in [0, 1], got {self.min_rouge_l!r}")
        if self.min_token_agreement is not None and not 0 <= self.min_token_agreement <= 1:
            raise ValueError(f"min_token_agreement must be in [0, 1], got {self.min_token_agreement!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be a positive integer, got {self.threads!r}")
        if self.prefill_chunk is not None and (isinstance(self.prefill_chunk, bool) or not isinstance(self.prefill_chunk, int)
                                               or self.prefill_chunk < 1):
            raise ValueError(f"prefill_chunk must be a positive number of tokens, got {self.prefill_chunk!r}")
        if backend_name(self.backend) == "torch":
            raise ValueError("validate checks an engine against the PyTorch reference; choose --backend auto, onnxruntime or tensorrt")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prefill_runner_class():
    """A Polygraphy runner over any prefixkv ``Runner``'s prefill: the PyTorch reference
    (``PytRunner`` needs CUDA) or an engine of another backend (the TensorRT runner, say).

    Feeds input_ids/attention_mask (and image_embeds, for a vision runner: its
    ``prefill_embeds``); outputs named like the prefill graph's.  Engines with static output
    shapes give a layer more slots than it keeps, empty at the front
    (``plugins.reference.width_bound``); columns empty in every row are dropped so the
    outputs compare with the reference's, and the keys and values of empty slots (whatever
    a backend leaves there) are compared as zeros."""

    class PrefillRunner(BaseRunner):
        def __init__(self, runner, name=None):
            super().__init__(name=name or runner.name)
            self.runner = runner
            self.images = getattr(runner, "vision", None) is not None
            self.scores = []  # per run: the reference's per-layer prompt scores (``prompt_scores``), or None

        def get_input_metadata_impl(self):
            meta = TensorMetadata().add("input_ids", np.int64, (None, None)).add("attention_mask", np.int64, (None, None))
            return meta.add("image_embeds", np.float32, (None, None, None)) if self.images else meta

        def infer_impl(self, feed_dict):
            start = time.perf_counter()
            if self.images:
                logits, state = self.runner.prefill_embeds(feed_dict["input_ids"], feed_dict["attention_mask"],
                                                           feed_dict["image_embeds"])
            else:
                logits, state = self.runner.prefill(feed_dict["input_ids"], feed_dict["attention_mask"])
            self.scores.append(prompt_scores(state, feed_dict["attention_mask"]))
            out = OrderedDict(logits=np.asarray(logits))
            for l, parts in enumerate(_layer_caches(state)):
                parts = [_numpy(t) for t in parts]
                if not hasattr(state, "cache"):  # an engine's: each row's entries right-aligned, as the reference's are
                    positions, valid, key, value = compact_entries(parts[2], parts[3], parts[0], parts[1])
                    parts = [key, value, positions, valid]
                first = trim_empty_front(parts[3])
                held = parts[3].astype(bool)[:, None, :, None]  # an empty slot's key and value mean nothing: zeros
                parts[:2] = [np.where(held, array, 0).astype(array.dtype) for array in parts[:2]]
                for part, array in zip(CACHE_PARTS, parts):
                    kept = array[:, :, first:] if part in ("key", "value") else array[:, first:]
                    out[f"present.{l}.{part}"] = np.ascontiguousarray(kept)
            self.inference_time = time.perf_counter() - start
            return out

    return PrefillRunner


def _layer_caches(state) -> list[tuple]:
    """Per layer (key, value, positions, valid) of a runner's state: the reference's
    ``PrefixKVCache`` layers, or an engine state's ``layers()``."""
    if hasattr(state, "cache"):
        return [(layer.keys, layer.values, layer.positions, layer.valid) for layer in state.cache.layers]
    return state.layers()


def prompt_scores(state, attention_mask) -> list[list[np.ndarray]] | None:
    """The reference's scores per layer and row, indexed by original position (the row's real
    prompt columns), from a ``TorchRunner`` state; None for other runners or no compaction."""
    scores = getattr(getattr(state, "cache", None), "prompt_scores", None)
    if scores is None:
        return None
    real = np.asarray(attention_mask).astype(bool)
    return [[_numpy(layer)[b][real[b]] for b in range(len(real))] for layer in scores]


def tied_rows(engine_positions, reference_positions, scores) -> tuple[list[int], list[int]]:
    """The rows (B, W original positions, -1 empty) whose kept sets differ -> (those that differ
    only among tied reference scores (``TIE_RTOL``: the engine's choice scores the same, sorted,
    as the reference's), the others).  scores: per row the reference's scores by original
    position (``prompt_scores``'s layer), or None (no tie can be told)."""
    tied, other = [], []
    for b, (e, r) in enumerate(zip(np.asarray(engine_positions), np.asarray(reference_positions))):
        e, r = np.sort(e[e >= 0]), np.sort(r[r >= 0])
        if e.shape == r.shape and np.array_equal(e, r):
            continue
        row = None if scores is None else scores[b]
        same = (row is not None and e.shape == r.shape and e.max(initial=-1) < len(row)
                and np.allclose(np.sort(row[e]), np.sort(row[r]), rtol=TIE_RTOL, atol=0))
        (tied if same else other).append(b)
    return tied, other


def _numpy(tensor) -> np.ndarray:
    """A torch tensor (any device; half precisions as float32), an OrtValue or an array as numpy."""
    if hasattr(tensor, "detach"):
        tensor = tensor.detach().cpu()
        return (tensor.float() if tensor.is_floating_point() else tensor).numpy()
    if not isinstance(tensor, np.ndarray) and hasattr(tensor, "numpy"):
        return tensor.numpy()
    return np.asarray(tensor)


def trim_empty_front(valid) -> int:
    """How many leading columns of a (B, W) validity mask are empty in every row."""
    valid = np.asarray(valid).astype(bool)
    used = valid.any(0)
    return int(np.argmax(used)) if used.any() else valid.shape[1]


# -- the three checks ---------------------------------------------------------------------------
def check_graph(engine_dir: Path, reference, feeds: list[dict], providers=None,
                logits_atol: float = LOGITS_ATOL, cache_atol: float = CACHE_ATOL, rtol: float = RTOL,
                engine=None, threads: int | None = None) -> dict:
    """The engine's prefill vs reference through Polygraphy's Comparator, on ``feeds``: for an
    ONNX Runtime engine the prompt in decoder-graph chunks, then the compact graph.

    engine: a prefixkv ``Runner`` (wrapped by ``prefill_runner_class``); None: the folder's
    ONNX Runtime runner."""
    manifest = read_manifest(engine_dir, verify=False)
    names = ["logits", *(f"present.{l}.{part}" for l in range(int(manifest["layers"])) for part in CACHE_PARTS)]
    exact = [n for n in names if n.endswith((".positions", ".valid"))]
    atol = {"": cache_atol, "logits": logits_atol, **{n: 0.0 for n in exact}}
    rtols = {"": rtol, **{n: 0.0 for n in exact}}
    if engine is None:
        engine = load_runner(engine_dir, backend="onnxruntime", providers=providers, threads=threads, verify=False,
                             allow_failed_validation=True)
    under_test = prefill_runner_class()(engine)
    runners = [under_test, prefill_runner_class()(reference, name="pytorch-reference")]
    severity = G_LOGGER.module_severity
    G_LOGGER.module_severity = G_LOGGER.ERROR
    try:
        with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
            warnings.simplefilter("ignore")
            results = Comparator.run(runners, data_loader=feeds)
            accuracy = Comparator.compare_accuracy(
                results, compare_func=CompareFunc.simple(atol=atol, rtol=rtols, check_shapes=True)
            )
    finally:
        G_LOGGER.module_severity = severity
    (_, engine_iters), (_, reference_iters) = list(results.items())
    (compared,) = accuracy[0].values()  # one compare function, one runner pair: per run, output name -> passed
    outputs, positions_identical, ties, failed = {}, True, 0, set()
    for i, (engine_out, reference_out) in enumerate(zip(engine_iters, reference_iters)):
        scores = runners[1].scores[i] if i < len(runners[1].scores) else None
        excused = {}  # output -> rows kept differently only among tied scores (positions, keys, values)
        for l in range(int(manifest["layers"])):
            name = f"present.{l}.positions"
            a, b = np.asarray(engine_out[name]), np.asarray(reference_out[name])
            if a.shape == b.shape and not np.array_equal(a, b):
                tied, other = tied_rows(a, b, None if scores is None else scores[l])
                if tied and not other:
                    ties += len(tied)
                    excused.update({f"present.{l}.{part}": tied for part in ("positions", "key", "value")})
        failed |= {name for name, ok in compared[i].items() if not ok and name not in excused}
        for name in names:
            a, b = np.asarray(engine_out[name]), np.asarray(reference_out[name])
            entry = outputs.setdefault(name, {"max_abs": 0.0, "max_rel": 0.0, "shapes_equal": True})
            if name in excused:  # the other rows, within the tolerances
                rest = [row for row in range(len(b)) if row not in excused[name]]
                a, b = a[rest], b[rest]
                entry["tied_rows"] = entry.get("tied_rows", 0) + len(excused[name])
                if not np.allclose(a, b, atol=atol.get(name, cache_atol), rtol=rtols.get(name, rtol)):
                    failed.add(name)
            if a.shape != b.shape:
                entry["shapes_equal"] = False
                positions_identical &= not name.endswith(".positions")
                continue
            if a.size:
                diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
                entry["max_abs"] = max(entry["max_abs"], float(diff.max()))
                entry["max_rel"] = max(entry["max_rel"], float((diff / (np.abs(b.astype(np.float64)) + 1e-12)).max()))
            if name.endswith(".positions") and not np.array_equal(a, b):
                positions_identical = False
    worst = lambda suffix: max((v["max_abs"] for k, v in outputs.items() if k.endswith(suffix)), default=0.0)  # noqa: E731
    return {
        "passed": not failed and positions_identical,
        "comparator": "polygraphy",
        "tolerances": {"logits_atol": logits_atol, "cache_atol": cache_atol, "rtol": rtol, "positions": "exact", "valid": "exact",
                       "ties_rtol": TIE_RTOL},
        "feeds": [{k: list(np.shape(v)) for k, v in f.items()} for f in feeds],
        "kept_positions_identical": positions_identical,
        "kept_position_ties": ties,  # (run, layer, row)s kept differently among tied reference scores: excused, counted
        "failed_outputs": sorted(failed),
        "max_abs": {"logits": worst("logits"), "key": worst(".key"), "value": worst(".value")},
        "outputs": outputs,
    }


def lockstep(engine, reference, token_lists: list[list[int]], steps: int) -> dict:
    """Greedy decoding of both runners fed the reference's tokens, compared at every step.

    Returns per row the reference's tokens, the steps where the argmax differed and whether
    every layer kept the same positions at every step.
    """
    ids, mask = reference.pad(token_lists)
    engine_logits, engine_state = engine.prefill(ids, mask)
    ref_logits, ref_state = reference.prefill(ids, mask)
    rows = len(token_lists)
    tokens = [[] for _ in range(rows)]
    mismatches = [[] for _ in range(rows)]
    positions_ok, max_err = True, 0.0
    scores = prompt_scores(ref_state, mask)
    tied = set()  # (layer, row)s whose prompt kept sets differ among tied scores: not compared after
    for l, (a, b) in enumerate(zip(engine.kept_positions(engine_state), reference.kept_positions(ref_state))):
        if a.shape == b.shape:
            rows_tied, _ = tied_rows(a, b, None if scores is None else scores[l])
            tied |= {(l, row) for row in rows_tied}
    for step in range(steps):
        max_err = max(max_err, float(np.abs(engine_logits - ref_logits).max()))
        chosen, theirs = ref_logits.argmax(-1), engine_logits.argmax(-1)
        for row in range(rows):
            tokens[row].append(int(chosen[row]))
            if chosen[row] != theirs[row]:
                top2 = np.sort(ref_logits[row])[-2:]
                mismatches[row].append({"step": step, "reference": int(chosen[row]), "engine": int(theirs[row]),
                                        "reference_margin": float(top2[1] - top2[0])})
        kept_e, kept_r = engine.kept_positions(engine_state), reference.kept_positions(ref_state)
        for l, (a, b) in enumerate(zip(kept_e, kept_r)):
            compare = [row for row in range(rows) if (l, row) not in tied]
            positions_ok &= a.shape == b.shape and np.array_equal(a[compare], b[compare])
        if step == steps - 1:
            break
        engine_logits, engine_state = engine.decode(engine_state, chosen)
        ref_logits, ref_state = reference.decode(ref_state, chosen)
    lengths = [int(n) for n in np.asarray(engine.layer_lengths(engine_state)).sum(0)] if hasattr(engine, "layer_lengths") else None
    return {"tokens": tokens, "mismatches": mismatches, "kept_positions_identical": positions_ok,
            "kept_position_ties": len(tied), "max_abs_logits": max_err, "final_entries_per_row": lengths}


def check_generation(engine, reference, token_lists: list[list[int]], max_new_tokens: int,
                     min_agreement: float | None = None) -> dict:
    """Greedy lockstep: identical tokens and kept positions (fp32 weights), or, with
    ``min_agreement`` (quantized weights, whose logits and hence scores differ), at least that
    share of the steps choosing the reference's token."""
    result = lockstep(engine, reference, token_lists, max_new_tokens)
    agree = [not m for m in result["mismatches"]]
    steps = len(token_lists) * max_new_tokens
    agreement = 1 - sum(len(m) for m in result["mismatches"]) / steps
    if min_agreement is None:
        passed = all(agree) and result["kept_positions_identical"]
    else:
        passed = agreement >= min_agreement
    return {
        "passed": passed,
        "token_agreement": agreement,
        "min_token_agreement": min_agreement,
        "prompts": len(token_lists),
        "prompt_tokens": [len(t) for t in token_lists],
        "max_new_tokens": max_new_tokens,
        "agree": agree,
        "first_mismatch": [m[0] if m else None for m in result["mismatches"]],
        "kept_positions_identical": result["kept_positions_identical"],
        "kept_position_ties": result["kept_position_ties"],
        "max_abs_logits": result["max_abs_logits"],
        "texts": [engine.tokenizer.decode(t) for t in result["tokens"]],
    }


def teacher_forced_nll(runner, prompts: list[list[int]], continuations: list[list[int]]) -> tuple[float, int]:
    """Summed negative log-likelihood of ``continuations`` after ``prompts`` and the token count."""
    ids, mask = runner.pad(prompts)
    logits, state = runner.prefill(ids, mask)
    steps = max(len(c) for c in continuations)
    total, count = 0.0, 0
    for t in range(steps):
        log_probs = _log_softmax(logits)
        target = np.array([c[t] if t < len(c) else runner.tokenizer.pad_token_id for c in continuations], dtype=np.int64)
        for row, c in enumerate(continuations):
            if t < len(c):
                total -= float(log_probs[row, target[row]])
                count += 1
        if t < steps - 1:
            logits, state = runner.decode(state, target)
    return total, count


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def check_quality(engine, full, samples: list[dict], max_new_tokens: int,
                  max_ppl_increase: float | None = None, min_rouge_l: float | None = None) -> dict:
    """Engine vs full cache: PPL of the references, ROUGE-L of greedy outputs (``metrics.rouge_l``)."""
    tok = engine.tokenizer
    prompts = [tok.encode(s["prompt"]) for s in samples]
    bos = [tok.token_to_id(tok.bos_token)] if tok.add_bos and tok.bos_token else []
    continuations = [tok.encode(s["reference"])[len(bos):] for s in samples if s.get("reference")]
    result = {"samples": len(samples), "max_new_tokens": max_new_tokens}
    if continuations and len(continuations) == len(prompts):
        ppl = {}
        for name, runner in (("engine", engine), ("full", full)):
            total, count = teacher_forced_nll(runner, prompts, continuations)
            ppl[name] = math.exp(total / max(count, 1))
        result["ppl"] = ppl
        result["ppl_delta"] = ppl["engine"] - ppl["full"]
        result["ppl_increase"] = ppl["engine"] / ppl["full"] - 1
    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
    engine_out = engine.generate_ids(prompts, config)
    full_out = full.generate_ids(prompts, config)
    result["rouge_l_vs_full"] = float(np.mean([rouge_l(e.text, f.text) for e, f in zip(engine_out, full_out)]))
    if all(s.get("reference") for s in samples):
        result["rouge_l_vs_reference"] = {
            "engine": float(np.mean([rouge_l(e.text, s["reference"]) for s, e in zip(samples, engine_out)])),
            "full": float(np.mean([rouge_l(f.text, s["reference"]) for s, f in zip(samples, full_out)])),
        }
    failures = []
    if max_ppl_increase is not None and result.get("ppl_increase", 0.0) > max_ppl_increase:
        failures.append(f"PPL increase {result['ppl_increase']:.3f} > {max_ppl_increase}")
    if min_rouge_l is not None and result["rouge_l_vs_full"] < min_rouge_l:
        failures.append(f"ROUGE-L vs full {result['rouge_l_vs_full']:.3f} < {min_rouge_l}")
    result["thresholds"] = {"max_ppl_increase": max_ppl_increase, "min_rouge_l": min_rouge_l}
    result["failures"] = failures
    result["passed"] = not failures
    # "pass" only where a threshold was checked; without any the numbers are reported, not judged
    result["status"] = ("pass" if not failures else "FAIL") if (max_ppl_increase, min_rouge_l) != (None, None) else "reported"
    return result


# -- the inputs: text or images, chosen once from the manifest ------------------------------------
@dataclass
class Prompt:
    """One validation prompt as token ids, with the pixel values of its images ((0, 3, H, W) for none)."""

    ids: list[int]
    pixels: np.ndarray | None = None

    @property
    def images(self) -> int:
        return 0 if self.pixels is None else len(self.pixels)


def _text_prompts(engine, config: ValidationConfig) -> list[Prompt]:
    texts = config.prompts
    if texts is None:
        texts = [s["prompt"] for s in builtin_samples(engine.tokenizer, "evaluation", n=config.n_prompts,
                                                     tokens=config.prompt_tokens, reference_tokens=0)]
    return [Prompt(engine.encode_prompt(t, max_new_tokens=config.max_new_tokens)) for t in texts]


def _image_prompts(engine, config: ValidationConfig) -> list[Prompt]:
    samples = list(config.samples) if config.samples else default_samples(config.n_prompts)
    out = []
    for sample in samples:
        image = sample.get("image")
        pixels = engine.preprocess([image] if image is not None else [])
        ids = engine.encode_image_prompt(sample["prompt"], len(pixels), config.chat, config.max_new_tokens)
        out.append(Prompt(ids, pixels))
    return out


def _feeds(engine, reference, prompts: list[Prompt], vision: bool) -> list[dict]:
    """The graph check's feeds: a padded batch of the first two prompts (text: the second
    shortened by a quarter) and the last prompt alone; image rows carry the reference's
    image embeddings."""
    groups = []
    if len(prompts) >= 2:
        first, second = prompts[0], prompts[1]
        if not vision or not (first.images or second.images):
            second = Prompt(second.ids[: max(2, 3 * len(second.ids) // 4)], second.pixels)
        groups.append([first, second])
    groups.append([prompts[-1]])
    feeds = []
    for group in groups:
        ids, mask = engine.pad([p.ids for p in group])
        feed = {"input_ids": ids, "attention_mask": mask}
        if vision:
            pixels = np.concatenate([p.pixels for p in group])
            feed["image_embeds"] = reference.image_embeddings(pixels) if len(pixels) else engine.image_embeddings(pixels)
        feeds.append(feed)
    return feeds


def check_vision(engine, reference, pixels: np.ndarray, atol: float, rtol: float) -> dict:
    """The engine's vision graph vs the model's own image features on the same pixels."""
    if not len(pixels):
        return {"passed": True, "images": 0, "skipped": "no sample has an image"}
    got, want = engine.image_embeddings(pixels), reference.image_embeddings(pixels)
    return {"passed": bool(got.shape == want.shape and np.allclose(got, want, atol=atol, rtol=rtol)),
            "images": int(len(pixels)), "max_abs": float(np.abs(got - want).max()), "atol": atol}


# -- the whole validation ------------------------------------------------------------------------
def validate_engine(engine_dir: str | Path, config: ValidationConfig | None = None, model=None, processor=None,
                    log=_stderr) -> dict:
    """Run ``config``'s checks on the engine at ``engine_dir``; returns the report (``report["passed"]``).

    model (and processor, for a vision engine): the model the engine was built from, already
    loaded; loaded from the manifest's source if None.
    """
    config = config or ValidationConfig()
    start = time.perf_counter()
    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir, verify=True)
    vision = bool(manifest.get("vision"))
    checks = config.checks or tuple(c for c in (VISION_CHECKS if vision else TEXT_CHECKS) if config.quality or c != "quality")
    not_here = [c for c in checks if c == ("quality" if vision else "vision")]
    if not_here:
        raise ValueError(f"the {not_here[0]} check applies to {'text' if vision else 'vision'} engines only; "
                         f"choose from {', '.join(VISION_CHECKS if vision else TEXT_CHECKS)}")
    precision = (manifest.get("weights") or {}).get("precision", "fp32")
    min_agreement = None if precision == "fp32" else (
        config.min_token_agreement if config.min_token_agreement is not None else defaults.MIN_TOKEN_AGREEMENT[precision])
    context = int(manifest["max_context"])
    if not vision and config.prompts is None and config.prompt_tokens + config.max_new_tokens > context:
        raise ValueError(f"validation prompts of {config.prompt_tokens} tokens + {config.max_new_tokens} new tokens do not fit "
                         f"the engine's context of {context}: pass --validate-tokens and --validate-new-tokens that sum to "
                         f"at most {context}")
    if "quality" in checks and config.quality_tokens + config.quality_new_tokens > context:
        fit = context - config.quality_new_tokens
        if fit < 2:
            raise ValueError(f"the quality check's {config.quality_new_tokens} reference tokens do not fit the engine's context "
                             f"of {context}; skip it with --quality-samples 0")
        log(f"quality samples shortened to {fit} tokens to fit the engine's context of {context}")
        config = replace(config, quality_tokens=fit)
    engine = load_runner(engine_dir, backend=config.backend, providers=config.providers, threads=config.threads, verify=False,
                         allow_failed_validation=True, prefill_chunk=config.prefill_chunk)  # validating it again is how a failed engine is looked into
    if model is None:
        log(f"loading the reference model {manifest['model']['source']}")
    model, loaded, settings = reference_settings(engine_dir, manifest, model, config.threads)
    if vision:
        reference = TorchVisionRunner(model, engine_dir, **settings, processor=loaded if loaded is not None else processor)
    else:
        reference = TorchRunner(model, engine_dir, **settings)
    prompts = (_image_prompts if vision else _text_prompts)(engine, config)
    pixels = np.concatenate([p.pixels for p in prompts]) if vision else None
    report = {"engine": str(engine_dir), "backend": engine.name, "keep_fraction": settings["keep_fraction"], "weights": precision,
              "providers": getattr(engine, "providers", None), "prompts": len(prompts), "checks": {}}
    if vision:
        report["images"] = int(len(pixels))

    if "vision" in checks:
        log("validation: vision graph vs the model's get_image_features")
        report["checks"]["vision"] = check_vision(engine, reference, pixels, config.cache_atol, config.rtol)
    if "graph" in checks:
        log("validation: graph level (Polygraphy, the engine's prefill vs PyTorch reference)")
        report["checks"]["graph"] = check_graph(engine_dir, reference, _feeds(engine, reference, prompts, vision),
                                                config.providers, config.logits_atol, config.cache_atol, config.rtol,
                                                engine=engine, threads=config.threads)
        if precision != "fp32":  # quantized weights: the fp32 tolerances cannot hold; the differences are reported
            report["checks"]["graph"]["status"] = "reported"
    if "generation" in checks:
        log(f"validation: generation level ({len(prompts)} prompts, {config.max_new_tokens} greedy tokens in lockstep)")
        with (engine.images(pixels) if vision else contextlib.nullcontext()), \
                (reference.images(pixels) if vision else contextlib.nullcontext()):
            report["checks"]["generation"] = check_generation(engine, reference, [p.ids for p in prompts], config.max_new_tokens,
                                                              min_agreement)
    if "quality" in checks:
        log(f"validation: quality vs full cache ({config.quality_samples} evaluation samples of {config.quality_tokens} tokens)")
        samples = builtin_samples(engine.tokenizer, "evaluation", n=config.quality_samples, tokens=config.quality_tokens,
                                  reference_tokens=config.quality_new_tokens)
        full = TorchRunner(model, engine_dir, keep_fraction=1.0)
        report["checks"]["quality"] = check_quality(engine, full, samples, config.quality_new_tokens,
                                                    config.max_ppl_increase, config.min_rouge_l)
    return finish_report(report, start, config.json_path, log)

def finish_report(report: dict, start: float, json_path=None, log=_stderr) -> dict:
    """Set ``passed`` and ``seconds``, log one line per check, write the JSON if asked.

    Every check has a ``status``: "pass" or "FAIL" against its tolerances, or "reported" for a
    check with no threshold (its numbers are informational and do not decide ``passed``)."""
    for check in report["checks"].values():
        check.setdefault("status", "pass" if check["passed"] else "FAIL")
    report["passed"] = all(c["passed"] for c in report["checks"].values() if c["status"] != "reported")
    report["seconds"] = round(time.perf_counter() - start, 1)
    for name, check in report["checks"].items():
        log(f"  {name}: {check['status']}{_summary(name, check)}")
    if json_path:
        atomic_write_text(json_path, json.dumps(report, indent=2) + "\n")
    return report


def _ties(check: dict) -> str:
    n = check.get("kept_position_ties", 0)
    return f", {n} layer-row{'s' if n != 1 else ''} chose among tied scores" if n else ""


def _summary(name: str, check: dict) -> str:
    if name == "vision":
        return f" ({check['images']} images, max |diff| {check.get('max_abs', 0.0):.2e})"
    if name == "graph":
        m = check["max_abs"]
        return (f" (max |diff| logits {m['logits']:.2e}, keys {m['key']:.2e}, values {m['value']:.2e}; "
                f"kept positions {'identical' if check['kept_positions_identical'] else 'DIFFER'}{_ties(check)})")
    if name == "generation":
        if check.get("min_token_agreement") is not None:
            return (f" ({check['token_agreement']:.1%} of {check['prompts']} x {check['max_new_tokens']} greedy steps choose the "
                    f"fp32 reference's token; at least {check['min_token_agreement']:.0%} needed)")
        return f" ({sum(check['agree'])}/{check['prompts']} prompts agree on {check['max_new_tokens']} greedy tokens)"
    if name == "quality":
        parts = []
        if "ppl" in check:
            parts.append(f"PPL {check['ppl']['engine']:.3f} vs full {check['ppl']['full']:.3f} ({check['ppl_increase']:+.1%})")
        parts.append(f"ROUGE-L vs full {check['rouge_l_vs_full']:.3f}")
        return " (" + ", ".join(parts) + ")"
    return ""
