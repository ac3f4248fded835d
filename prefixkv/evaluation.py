"""Quality of a compressed cache: perplexity of a reference and ROUGE-L against full-cache text.

For every prompt (batches, left padded):

1. Prefill with the full cache, recording the importance of every scorer needed.
2. For each (method, keep fraction), build that method's compressed cache from the
   prefill (``fork``): scores, allocation and compaction are exactly what
   ``PrefixKVCache(method=..., keep_fraction=...)`` does after its own prefill, so one
   prefill serves every method.
3. Teacher forcing: the reference continuation is fed ONE token per step and the cache
   keeps each layer's budget at every step (the paper's protocol).  PPL is
   exp(summed NLL / reference tokens), pooled over prompts.
4. Greedy generation (``max_new_tokens``) from the same compressed cache; ROUGE-L F1
   against the full cache's greedy generation.  A prompt without a reference is scored
   on the full cache's generation instead.

No plotting and no files here: results are plain dicts (see ``evaluate``).
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .cache import PrefixKVCache, PrefixKVLayer, cache_argument
from .defaults import EVAL_NEW_TOKENS, check_evict_distance
from .metrics import perplexity, rouge_l
from .policies import Method, Profiled, make_method
from .search import PAPER, SearchSettings
from .vision import is_vision_model
from .vision.calibration import model_inputs


@dataclass
class MethodConfig:
    """One compression setting: a named method, or a (scorer, allocation) pair with ``method="custom"``.

    profile: the retention profile for the ``profile`` allocation (its scorer must match).
    search: the ``online`` allocation's curve, floor and blend (the paper's by default; a
    profile carries its own).
    """

    method: str = "custom"
    scorer: str | None = None
    allocation: str | None = None
    scorer_params: dict | None = None
    search: SearchSettings = PAPER
    sink: int | None = None  # None: the method's own (a profile's for its allocation)
    profile: object | None = None
    label: str | None = None
    force_scorer: bool = False
    evict_distance: int | None = None  # None: the method's own (StreamingLLM the oldest, a profile's, else 25)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.search, SearchSettings):
            raise ValueError(f"search must be a SearchSettings, got {self.search!r}")
        if self.sink is not None and (isinstance(self.sink, bool) or not isinstance(self.sink, int) or self.sink < 0):
            raise ValueError(f"the sink must be a non-negative integer, got {self.sink!r}")
        if self.evict_distance is not None:
            check_evict_distance(self.evict_distance)

    def build(self, profile=None) -> Method:
        return make_method(self.method, self.profile or profile, self.scorer, self.scorer_params, self.allocation,
                           self.evict_distance, self.search, self.force_scorer, self.sink)

    def name(self, profile=None) -> str:
        """The label, or ``method`` / ``scorer+allocation``."""
        if self.label:
            return self.label
        if self.method != "custom":
            return self.method
        m = self.build(profile)
        return f"{m.scorer.name}+{m.allocation.name}"


@dataclass
class EvalSettings:
    """How an evaluation runs: greedy tokens for ROUGE-L, batch size, ``generate=False`` for PPL
    only, the chat template for image prompts, a progress bar."""

    max_new_tokens: int = EVAL_NEW_TOKENS
    batch_size: int = 4
    generate: bool = True
    chat: bool = False
    progress: bool = True

    def __post_init__(self):
        for name in ("max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")


# -- samples --------------------------------------------------------------------------------------
def _encode(tokenizer, text: str, special: bool) -> list[int]:
    try:
        return list(tokenizer.encode(text, add_special_tokens=special))
    except TypeError:  # prefixkv.tokenizer.Tokenizer
        return list(tokenizer.encode(text))


def _decode(tokenizer, ids: Sequence[int]) -> str:
    if tokenizer is None:
        return " ".join(str(int(i)) for i in ids)
    try:
        return tokenizer.decode(list(ids), skip_special_tokens=True)
    except TypeError:
        return tokenizer.decode(list(ids))


def prepare(tokenizer, samples, images: bool = False, chat: bool = False) -> list[dict]:
    """Token ids of each sample: ``{"prompt_ids", "reference_ids" (or None), "pixel_values" (or None)}``.

    A sample is a prompt string, or a dict with ``prompt`` (+ optional ``reference``), or
    already ``prompt_ids`` (+ optional ``reference_ids``; then no tokenizer is needed).
    The prompt gets the tokenizer's special tokens unless it already starts with BOS text.
    images: ``tokenizer`` is a vision-language model's processor; dict samples may hold an
    ``image`` (``prefixkv.vision.data``) and are encoded by it (``<image>`` expanded,
    pixel values; ``chat``: its chat template).
    """
    out = []
    text = getattr(tokenizer, "tokenizer", tokenizer)  # a processor's own tokenizer
    for i, s in enumerate(samples):
        s = {"prompt": s} if isinstance(s, str) else dict(s)
        if images and "prompt_ids" not in s:
            inputs = model_inputs(tokenizer, s, chat)
            ref = _encode(text, s["reference"], False) if s.get("reference") else None
            out.append({"prompt_ids": inputs["input_ids"][0].tolist(), "reference_ids": ref or None,
                        "pixel_values": inputs.get("pixel_values")})
            continue
        if "prompt_ids" in s:
            prompt = [int(t) for t in s["prompt_ids"]]
            ref = s.get("reference_ids")
            ref = [int(t) for t in ref] if ref else None
        else:
            if tokenizer is None:
                raise ValueError("text samples need a tokenizer (or give prompt_ids)")
            bos = getattr(text, "bos_token", None)
            special = not (bos and s["prompt"].startswith(bos))
            prompt = _encode(text, s["prompt"], special)
            ref = _encode(text, s["reference"], False) if s.get("reference") else None
        if len(prompt) < 1:
            raise ValueError(f"sample {i} has an empty prompt")
        out.append({"prompt_ids": prompt, "reference_ids": ref or None, "pixel_values": None})
    return out


# -- the forward loops --------------------------------------------------------------------------------
def _left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


@torch.no_grad()
def prefill(model, prompts: list[list[int]], record: Sequence, pad_id: int, score_block: int = 256, pixel_values=None):
    """One full-cache prefill of a left-padded batch, recording ``record`` scorers.

    pixel_values: (I, 3, H, W) for the images of a vision-language model's prompts, in
    row-major order of their image tokens (None: no image).
    Returns (cache, last logits (batch, vocab) float32, attention mask (batch, S)).
    """
    device = next(model.parameters()).device
    ids, mask = _left_pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    cache = PrefixKVCache(method="full", keep_fraction=1.0, record=list(record), score_block=score_block)
    extra = {}
    if pixel_values is not None:
        extra["pixel_values"] = pixel_values.to(device, next(model.parameters()).dtype)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, **cache_argument(model, cache),
                use_cache=True, logits_to_keep=1, **extra)
    return cache, out.logits[:, -1].float(), mask


def fork(base: PrefixKVCache, method: Method, keep_fraction: float, sink: int | None = None,
         protect_last: bool = True) -> PrefixKVCache:
    """A compressed cache for ``method`` built from an uncompressed full-cache prefill.

    ``base`` must be a ``PrefixKVCache(method="full", record=[...])`` right after its prefill
    (not yet compressed), recording ``method``'s scorer.  The prefill tensors are shared,
    never modified: any number of forks can be made from one prefill.  The result equals
    a ``PrefixKVCache(method=method, keep_fraction=keep_fraction)`` after the same prefill.
    """
    if base._prefilled or not base._pending:
        raise RuntimeError("fork needs a full-cache prefill that has not been compressed or decoded yet")
    cache = PrefixKVCache(method=method, keep_fraction=keep_fraction, sink=sink, protect_last=protect_last)
    scores = None
    if method.compresses:
        if method.scorer.key not in base.recorded:
            raise RuntimeError(f"the prefill did not record scorer {method.scorer.key!r}")
        scores = base.recorded[method.scorer.key]
    for i, src in enumerate(base.layers):
        layer = PrefixKVLayer()
        layer.lazy_initialization(src.keys, src.values)
        layer.keys, layer.values, layer.valid, layer.positions = src.keys, src.values, src.valid, src.positions
        layer.scores = scores[i] if scores is not None else None
        cache.layers.append(layer)
    cache.prompt_valid = base.prompt_valid
    cache.columns = base.columns
    cache._pending = True
    cache.compress()
    return cache


def _step(model, cache, tokens, mask):
    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
    out = model(input_ids=tokens.view(-1, 1), attention_mask=mask, position_ids=cache.seen.view(-1, 1),
                **cache_argument(model, cache), use_cache=True)
    return out.logits[:, -1].float(), mask


@torch.no_grad()
def teacher_force(model, cache, first_logits, mask, references: list[list[int]], pad_id: int) -> torch.Tensor:
    """Summed NLL (batch,) float64 of each row's reference, one token per step.

    ``first_logits`` predict the first reference token (from the prefill); rows with shorter
    references are padded and their extra positions ignored.
    """
    width = max(len(r) for r in references)
    ref = torch.full((len(references), width), pad_id, dtype=torch.long, device=first_logits.device)
    real = torch.zeros_like(ref, dtype=torch.bool)
    for i, r in enumerate(references):
        ref[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        real[i, : len(r)] = True
    nll = torch.zeros(len(references), dtype=torch.float64, device=first_logits.device)
    logits = first_logits
    for t in range(width):
        logp = torch.log_softmax(logits, dim=-1).gather(-1, ref[:, t : t + 1])[:, 0]
        nll -= torch.where(real[:, t], logp, torch.zeros_like(logp)).double()
        if t + 1 < width:
            logits, mask = _step(model, cache, ref[:, t], mask)
    return nll


@torch.no_grad()
def greedy(model, cache, first_logits, mask, max_new_tokens: int, eos_ids: Sequence[int], pad_id: int) -> list[list[int]]:
    """Greedy decoding from a prefilled cache; each row stops at its first EOS (not returned)."""
    if max_new_tokens < 1:
        return [[] for _ in range(first_logits.shape[0])]
    eos = torch.tensor(sorted(set(eos_ids)) or [-1], device=first_logits.device)
    tokens = first_logits.argmax(-1)
    done = torch.isin(tokens, eos)
    steps = [tokens]
    for _ in range(max_new_tokens - 1):
        if bool(done.all()):
            break
        logits, mask = _step(model, cache, tokens, mask)
        tokens = torch.where(done, torch.full_like(tokens, pad_id), logits.argmax(-1))
        steps.append(tokens)
        done = done | torch.isin(tokens, eos)
    grid = torch.stack(steps, dim=1).tolist()
    out = []
    for row in grid:
        cut = next((j for j, t in enumerate(row) if t in set(eos_ids)), len(row))
        out.append(row[:cut])
    return out


# -- metrics ------------------------------------------------------------------------------------------
def _eos_ids(model, tokenizer) -> list[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(ids) if isinstance(ids, (list, tuple)) else ([ids] if ids is not None else [])
    tok = getattr(tokenizer, "eos_token_id", None)
    if tok is not None:
        ids.append(tok)
    return sorted({int(i) for i in ids})


def pad_token_id(model, tokenizer) -> int:
    """The id that pads batches: the tokenizer's, the generation config's, the config's, else an end-of-sequence id."""
    for source in (tokenizer, getattr(model, "generation_config", None), model.config):
        pad = getattr(source, "pad_token_id", None)
        if pad is not None:
            return int(pad)
    eos = _eos_ids(model, tokenizer)
    return eos[0] if eos else 0


# -- evaluation -----------------------------------------------------------------------------------------
def evaluate_many(
    model,
    tokenizer,
    samples,
    configs: Sequence[MethodConfig],
    keep_fractions: Sequence[float],
    settings: EvalSettings | None = None,
    profile=None,
    full_generations: Sequence[str] | dict | None = None,
) -> list[dict]:
    """Every config at every keep fraction on ``samples``, one prefill per batch.

    Returns one result dict per (config, keep fraction), configs outer (see ``evaluate``);
    a ``full`` config is evaluated once, at keep fraction 1.  Full-cache generations are
    computed once here unless given (a list of strings or a full-method result).
    ``settings.generate=False`` skips generation and ROUGE-L (PPL only).  A vision-language
    model (``tokenizer``: its processor) takes samples with images, prefilled with their pixels.
    """
    settings = settings or EvalSettings()
    max_new_tokens, batch_size, generate = settings.max_new_tokens, settings.batch_size, settings.generate
    images = is_vision_model(model)
    keep_fractions = [float(k) for k in keep_fractions]
    if any(not 0 < k <= 1 for k in keep_fractions):
        raise ValueError(f"keep fractions must be in (0, 1] (0.2 keeps 20% of the entries), got {keep_fractions}")
    prepared = prepare(tokenizer, samples, images, settings.chat)
    n = len(prepared)
    if n == 0:
        raise ValueError("no samples to evaluate")
    if isinstance(full_generations, dict):
        full_generations = [row.get("generation_ids", row.get("generation")) for row in full_generations["per_sample"]]
    if full_generations is not None and len(full_generations) != n:
        raise ValueError(f"{len(full_generations)} full-cache generations for {n} samples")
    need_full = generate or any(p["reference_ids"] is None for p in prepared)
    runs = []  # (config, method, keep fraction, label)
    if need_full and full_generations is None and not any(c.method == "full" for c in configs):
        configs = [MethodConfig("full")] + list(configs)
        hidden_full = True
    else:
        hidden_full = False
    for number, c in enumerate(configs):
        m = c.build(profile)
        kfs = [1.0] if not m.compresses else keep_fractions
        prof = c.profile or profile
        csink = m.sink  # the config's, else the method's own, or its profile's
        for kf in kfs:
            runs.append({"config": c, "method": m, "keep": kf, "label": c.name(profile), "sink": csink,
                         "profile": prof if isinstance(m.allocation, Profiled) else None,
                         "hidden": hidden_full and number == 0})
    runs.sort(key=lambda r: 0 if not r["method"].compresses else 1)  # full first: its text is the reference
    record = {}
    for r in runs:
        if r["method"].compresses:
            record.setdefault(r["method"].scorer.key, r["method"].scorer)
    text = getattr(tokenizer, "tokenizer", tokenizer)  # a processor's own tokenizer
    pad_id, eos_ids = pad_token_id(model, text), _eos_ids(model, text)
    image_token = getattr(model.config, "image_token_id", None) if images else None

    per_run = [[None] * n for _ in runs]
    seconds = [0.0] * len(runs)
    order = sorted(range(n), key=lambda i: len(prepared[i]["prompt_ids"]))
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    bar = None
    if settings.progress:
        bar = tqdm(total=len(batches) * len(runs), desc="evaluating", unit="run")
    full_text = list(full_generations) if full_generations is not None else [None] * n
    for batch in batches:
        prompts = [prepared[i]["prompt_ids"] for i in batch]
        started = time.time()
        pixels = [prepared[i]["pixel_values"] for i in batch if prepared[i]["pixel_values"] is not None]
        base, first, mask = prefill(model, prompts, list(record.values()), pad_id,
                                    pixel_values=torch.cat(pixels) if pixels else None)
        prefill_s = (time.time() - started) / max(len(runs), 1)
        prompt_lengths = [len(p) for p in prompts]
        for k, run in enumerate(runs):
            started = time.time()
            m, kf = run["method"], run["keep"]
            generations = None
            if generate or any(prepared[i]["reference_ids"] is None for i in batch):
                cache = fork(base, m, kf, run["sink"])
                generations = greedy(model, cache, first, mask, max_new_tokens, eos_ids, pad_id)
                if not m.compresses:
                    for j, i in enumerate(batch):
                        if full_text[i] is None:
                            full_text[i] = generations[j]
            if run["hidden"]:  # only the full cache's text was needed
                if bar is not None:
                    bar.update(1)
                continue
            refs, sources = [], []
            for j, i in enumerate(batch):
                ref = prepared[i]["reference_ids"]
                source = "data"
                if ref is None:
                    full = full_text[i]
                    ref = full if isinstance(full, list) else (
                        [int(t) for t in full.split()] if text is None else _encode(text, full, False))
                    source = "full-generation"
                refs.append(ref if ref else [eos_ids[0] if eos_ids else pad_id])
                sources.append(source)
            cache = fork(base, m, kf, run["sink"])
            held = cache.layer_lengths().double()  # (layers, batch) after the prefill compaction
            nll = teacher_force(model, cache, first, mask, refs, pad_id)
            held_end = cache.layer_lengths().double()
            seen = cache.seen.double()
            for j, i in enumerate(batch):
                row = {
                    "index": i,
                    "prompt_tokens": prompt_lengths[j],
                    "reference_tokens": len(refs[j]),
                    "reference_source": sources[j],
                    "nll_sum": float(nll[j]),
                    "ppl": perplexity(float(nll[j]), len(refs[j])),
                    "kv_fraction": float(held[:, j].mean() / prompt_lengths[j]),
                    "kv_fraction_end": float(held_end[:, j].mean() / seen[j]),
                    "layer_keep_fractions": [round(float(x), 5) for x in held[:, j] / prompt_lengths[j]],
                }
                if images:
                    pixels_i = prepared[i]["pixel_values"]
                    row["images"] = 0 if pixels_i is None else int(pixels_i.shape[0])
                    row["image_tokens"] = int(sum(t == image_token for t in prompts[j]))
                if generations is not None:
                    row["generation_ids"] = generations[j]
                    row["generation"] = _decode(text, generations[j])
                per_run[k][i] = row
            seconds[k] += time.time() - started + prefill_s
            if bar is not None:
                bar.update(1)
        del base
    if bar is not None:
        bar.close()

    results = []
    for k, run in enumerate(runs):
        if run["hidden"]:
            continue
        rows = per_run[k]
        if generate:
            for i, row in enumerate(rows):
                full = full_text[i]
                full = _decode(text, full) if isinstance(full, list) else full
                row["rouge_l"] = rouge_l(row["generation"], full)
        results.append(_summarise(run, rows, seconds[k], generate, max_new_tokens))
    return results


def _summarise(run: dict, rows: list[dict], seconds: float, generate: bool, max_new_tokens: int) -> dict:
    m = run["method"]
    nll = sum(r["nll_sum"] for r in rows)
    tokens = sum(r["reference_tokens"] for r in rows)
    layers = len(rows[0]["layer_keep_fractions"])
    c = run["config"]
    result = {
        "label": run["label"],
        "method": m.name,
        "scorer": m.scorer.key if m.compresses else None,
        "allocation": m.allocation.name if m.compresses else None,
        "keep_fraction": run["keep"],
        "min_layer_keep": (run["profile"].min_layer_keep if run["profile"] is not None else c.search.min_layer_keep),
        "blend": (run["profile"].blend if run["profile"] is not None else c.search.blend),
        "curve": (run["profile"].curve if run["profile"] is not None
                  else c.search.curve if m.allocation.name == "online" else None),
        "sink": run["sink"],
        "samples": len(rows),
        "reference_tokens": tokens,
        "nll": nll / tokens if tokens else float("nan"),
        "ppl": perplexity(nll, tokens),
        "rouge_l": (sum(r["rouge_l"] for r in rows) / len(rows)) if generate else None,
        "kv_fraction": sum(r["kv_fraction"] for r in rows) / len(rows),
        "kv_fraction_end": sum(r["kv_fraction_end"] for r in rows) / len(rows),
        "layer_keep_fractions": [round(sum(r["layer_keep_fractions"][l] for r in rows) / len(rows), 5) for l in range(layers)],
        "max_new_tokens": max_new_tokens if generate else 0,
        "seconds": round(seconds, 2),
        "per_sample": rows,
    }
    if "images" in rows[0]:
        result["images"] = sum(r["images"] for r in rows)
    if c.extra:
        result.update(c.extra)
    return result


def evaluate(model, tokenizer, samples, config: MethodConfig, keep_fraction: float, settings: EvalSettings | None = None,
             profile=None, full_generations: Sequence[str] | dict | None = None) -> dict:
    """PPL and ROUGE-L of one method at one keep fraction, next to the full cache's PPL.

    samples: prompt strings, ``{"prompt", "reference"?}`` dicts or ``{"prompt_ids", "reference_ids"?}``
    (with ``"image"`` for a vision-language model, whose processor is ``tokenizer``).
    Returns a dict: ``ppl`` (pooled over reference tokens), ``ppl_full`` (the full cache's, same
    tokens), ``nll``, ``rouge_l`` (mean F1 against the full cache's greedy text), ``method``,
    ``scorer``, ``allocation``, ``keep_fraction``, ``samples``, ``kv_fraction`` (entries actually
    held after the prefill compaction / prompt entries, mean over layers and prompts),
    ``kv_fraction_end`` (held / seen after the last reference token), ``layer_keep_fractions``
    and ``per_sample`` rows (nll_sum, ppl, ppl_full, rouge_l, generation, kv fractions...).
    Pass ``full_generations`` (list of strings or the full method's result) to reuse
    full-cache generations across methods.
    """
    if config.method == "full":
        result = evaluate_many(model, tokenizer, samples, [config], [keep_fraction], settings, profile, full_generations)[0]
        full = result
    else:
        full, result = evaluate_many(model, tokenizer, samples, [MethodConfig("full"), config], [keep_fraction], settings,
                                     profile, full_generations)
    result["ppl_full"] = full["ppl"]
    for row, base in zip(result["per_sample"], full["per_sample"]):
        row["ppl_full"] = base["ppl"]
    return result
