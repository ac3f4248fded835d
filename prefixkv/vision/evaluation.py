"""Quality of a compressed cache on image prompts: the paper's protocol.

For every sample ``{"prompt", "image"?, "reference"?}`` (one at a time):

1. PPL: the reference answer is teacher-forced one token per step after the prompt and
   image were prefilled and compressed; each layer keeps its budget at every step.  PPL is
   exp(summed NLL / reference tokens), pooled over samples.
2. ROUGE-L: greedy generation (``max_new_tokens``) with the compressed cache against the
   full cache's greedy generation (F1, ``prefixkv.evaluation.rouge_l``).

Both run through ``TorchVisionRunner`` (the Hugging Face model + ``PrefixKVCache``), so every
method and policy of ``PrefixKVCache`` is available.  Pixel values come from the model's own
processor.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def evaluate_vision(
    model,
    processor,
    samples: Sequence[dict],
    method: str,
    keep_fraction: float,
    profile=None,
    max_new_tokens: int = 32,
    scorer: str | None = None,
    allocation: str | None = None,
    force_scorer: bool = False,
    sink: int | None = None,
    chat: bool = False,
    folder=None,
    full_generations: Sequence[str] | None = None,
    progress: bool = True,
) -> dict:
    """PPL and ROUGE-L of one method at one keep fraction on image samples.

    folder: tokenizer.json and processor settings (default: the model's folder).
    Returns ``method``, ``keep_fraction``, ``samples``, ``reference_tokens``, ``ppl``, ``nll``,
    ``ppl_full``, ``rouge_l`` (mean F1 vs the full cache's text), ``kv_fraction`` (entries held
    after the prefill compaction / prompt entries) and ``per_sample`` rows.
    """
    from ..engines.base import GenerationConfig
    from ..engines.validate import teacher_forced_nll
    from ..evaluation import perplexity, rouge_l
    from ..models import model_folder
    from .torch_runner import TorchVisionRunner

    if not samples:
        raise ValueError("no samples to evaluate")
    folder = folder or model_folder(model)
    if folder is None:
        raise ValueError("cannot find the model's folder (tokenizer.json, processor settings); pass folder=")
    cache_args = dict(scorer=scorer, allocation=allocation, force_scorer=force_scorer)
    if sink is not None:
        cache_args["sink"] = sink
    compressed = TorchVisionRunner(model, folder, profile=profile, keep_fraction=keep_fraction, method=method,
                                   processor=processor, **{k: v for k, v in cache_args.items() if v is not None})
    full = TorchVisionRunner(model, folder, keep_fraction=1.0, method="full", processor=processor)
    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    tok = compressed.tokenizer
    bos = [tok.token_to_id(tok.bos_token)] if tok.add_bos and tok.bos_token else []
    iterator = enumerate(samples)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=len(samples), desc="evaluating", unit="sample")
    rows, nll_total, nll_full, tokens = [], 0.0, 0.0, 0
    for i, sample in iterator:
        pixels = compressed.preprocess([sample["image"]] if sample.get("image") else [])
        ids = compressed.encode_image_prompt(sample["prompt"], len(pixels), chat, max_new_tokens)
        row = {"index": i, "prompt_tokens": len(ids), "images": int(len(pixels)),
               "image_tokens": int(sum(t == compressed.vision["image_token_id"] for t in ids))}
        with compressed.images(pixels), full.images(pixels):
            if sample.get("reference"):
                reference = tok.encode(sample["reference"])[len(bos):]
                nll, count = teacher_forced_nll(compressed, [ids], [reference])
                base, _ = teacher_forced_nll(full, [ids], [reference])
                nll_total, nll_full, tokens = nll_total + nll, nll_full + base, tokens + count
                row.update(reference_tokens=count, nll_sum=nll, ppl=perplexity(nll, count), ppl_full=perplexity(base, count))
            _, state = compressed.prefill(*compressed.pad([ids]))
            row["kv_fraction"] = float(state.cache.layer_lengths().double().mean() / len(ids))
            if max_new_tokens > 0:
                text = compressed.generate_ids([ids], config)[0].text
                reference_text = (full_generations[i] if full_generations is not None
                                  else full.generate_ids([ids], config)[0].text)
                row.update(generation=text, full_generation=reference_text, rouge_l=rouge_l(text, reference_text))
        rows.append(row)
    result = {
        "method": compressed.new_cache().method.name,
        "keep_fraction": float(keep_fraction),
        "samples": len(rows),
        "images": sum(r["images"] for r in rows),
        "reference_tokens": tokens,
        "nll": nll_total / tokens if tokens else float("nan"),
        "ppl": perplexity(nll_total, tokens),
        "ppl_full": perplexity(nll_full, tokens),
        "rouge_l": float(np.mean([r["rouge_l"] for r in rows])) if max_new_tokens > 0 else None,
        "kv_fraction": float(np.mean([r["kv_fraction"] for r in rows])),
        "max_new_tokens": max_new_tokens,
        "per_sample": rows,
    }
    return result
