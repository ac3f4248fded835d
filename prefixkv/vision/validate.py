"""Validate a vision engine against the PyTorch reference (``TorchVisionRunner``).

Three checks on prompts with images (given samples, or synthetic images made here); the
report passes when all do:

    vision      the vision graph vs the model's own ``get_image_features`` on the same pixels
    graph       the prefill graph vs the reference prefill on a padded batch (one row with an
                image, one with an image and a shorter prompt) and a text-only prompt: logits
                and compacted caches within tolerance, kept positions and validity identical.
                The graph gets the reference's image embeddings, so only the prefill is compared.
    generation  greedy decoding in lockstep (``prefixkv.engines.validate.check_generation``):
                at every step the argmax and every layer's kept positions agree; the engine
                runs its own vision graph.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from ..engines.validate import CACHE_ATOL, LOGITS_ATOL, RTOL, check_generation, finish_report

CHECKS = ("vision", "graph", "generation")
DEFAULT_PROMPTS = (
    "<image>\nWhat is shown in this picture? Describe the colours, the shapes and where they are.",
    "<image>\nIs there any text in the image? Answer briefly.",
    "Describe a sunny day at the beach without looking at any image.",
)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def synthetic_image(seed: int, size: tuple[int, int] = (96, 128)):
    """A deterministic RGB test picture: a colour gradient, a rectangle and noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    image = np.stack([x * 255 / w, y * 255 / h, np.full_like(x, 40 * (seed % 6), dtype=float)], -1)
    top, left = rng.integers(0, h // 2), rng.integers(0, w // 2)
    image[top : top + h // 3, left : left + w // 3] = rng.integers(0, 255, 3)
    image += rng.normal(0, 8, image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def default_samples(n: int) -> list[dict]:
    """``n`` prompts: with synthetic images, and the last one text-only when n >= 3."""
    return [{"prompt": DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)] if i < n - 1 or n < 3 else DEFAULT_PROMPTS[-1],
             "image": synthetic_image(i) if (i < n - 1 or n < 3) else None} for i in range(n)]


def _encode(runner, sample: dict, chat: bool, max_new_tokens: int):
    image = sample.get("image")
    pixels = runner.preprocess([image] if image is not None else [])
    return runner.encode_image_prompt(sample["prompt"], len(pixels), chat, max_new_tokens), pixels


def _compare(engine_out, ref_logits, ref_state, layers: int, logits_atol: float, cache_atol: float, rtol: float) -> dict:
    logits, state = engine_out
    cache = ref_state.cache
    worst = {"logits": float(np.abs(logits - ref_logits).max()), "key": 0.0, "value": 0.0}
    passed = bool(np.allclose(logits, ref_logits, atol=logits_atol, rtol=rtol))
    positions_identical = True
    for l in range(layers):
        layer = cache.layers[l]
        for i, (part, ref) in enumerate(zip(("key", "value", "positions", "valid"), (layer.keys, layer.values, layer.positions, layer.valid))):
            got, ref = state.past[4 * l + i].numpy(), ref.numpy()
            if got.shape != ref.shape:
                passed = False
                positions_identical &= part not in ("positions", "valid")
                continue
            if part in ("positions", "valid"):
                same = np.array_equal(got, ref)
                positions_identical &= same
                passed &= same
            else:
                diff = float(np.abs(got - ref).max()) if got.size else 0.0
                worst[part] = max(worst[part], diff)
                passed &= bool(np.allclose(got, ref, atol=cache_atol, rtol=rtol))
    return {"passed": passed, "max_abs": worst, "kept_positions_identical": positions_identical}


def validate_vision_engine(
    engine_dir: str | Path,
    model=None,
    processor=None,
    *,
    samples: list[dict] | None = None,
    n_prompts: int = 3,
    max_new_tokens: int = 16,
    chat: bool = False,
    checks=CHECKS,
    providers=None,
    threads: int | None = None,
    logits_atol: float = LOGITS_ATOL,
    cache_atol: float = CACHE_ATOL,
    rtol: float = RTOL,
    json_path: str | Path | None = None,
    log=_stderr,
) -> dict:
    """Run ``checks`` on the vision engine at ``engine_dir``; returns the report (``report["passed"]``).

    samples: dicts with "prompt" and "image" (a path, a PIL image or None); default: ``n_prompts``
    prompts with synthetic images (the last text-only).  model/processor: the LLaVA model the
    engine was built from (loaded from the manifest's source if None).
    """
    from ..engine_folder import read_manifest
    from ..engines import reference_settings
    from .runner import VisionOnnxRuntimeRunner
    from .torch_runner import TorchVisionRunner

    start = time.perf_counter()
    engine_dir = Path(engine_dir)
    unknown = set(checks) - set(CHECKS)
    if unknown:
        raise ValueError(f"unknown checks {sorted(unknown)}; choose from {', '.join(CHECKS)}")
    manifest = read_manifest(engine_dir, verify=True)
    engine = VisionOnnxRuntimeRunner(engine_dir, providers=providers, threads=threads, verify=False)
    if model is None:
        log(f"loading the reference model {manifest['model']['source']}")
    model, loaded, settings = reference_settings(engine_dir, manifest, model)
    processor = loaded if loaded is not None else processor
    keep = settings["keep_fraction"]
    reference = TorchVisionRunner(model, engine_dir, **settings)
    samples = list(samples) if samples else default_samples(n_prompts)
    encoded = [_encode(engine, s, chat, max_new_tokens) for s in samples]
    report = {"engine": str(engine_dir), "keep_fraction": keep, "providers": engine.providers,
              "prompts": len(samples), "images": int(sum(len(p) for _, p in encoded)), "checks": {}}
    all_pixels = np.concatenate([p for _, p in encoded])

    if "vision" in checks:
        log("validation: vision graph vs the model's get_image_features")
        if len(all_pixels):
            got, want = engine.image_embeddings(all_pixels), reference.image_embeddings(all_pixels)
            diff = float(np.abs(got - want).max())
            report["checks"]["vision"] = {"passed": bool(np.allclose(got, want, atol=cache_atol, rtol=rtol)) and got.shape == want.shape,
                                          "images": int(len(all_pixels)), "max_abs": diff, "atol": cache_atol}
        else:
            report["checks"]["vision"] = {"passed": True, "images": 0, "skipped": "no sample has an image"}
    if "graph" in checks:
        log("validation: prefill graph vs PyTorch reference (same image embeddings)")
        feeds = []
        with_image = [e for e in encoded if len(e[1])]
        if len(with_image) >= 2:
            (a, pa), (b, pb) = with_image[:2]
            feeds.append(([a, b], np.concatenate([pa, pb])))
        elif with_image:
            feeds.append(([with_image[0][0]], with_image[0][1]))
        feeds += [([ids], px) for ids, px in encoded if not len(px)][:1]
        results = []
        for token_lists, pixels in feeds:
            ids, mask = reference.pad(token_lists)
            ref_logits, ref_state = reference.prefill(ids, mask, pixels)
            embeds = reference.image_embeddings(pixels) if len(pixels) else engine.image_embeddings(pixels)
            result = _compare(engine.prefill_embeds(ids, mask, embeds), ref_logits, ref_state, engine.layers,
                              logits_atol, cache_atol, rtol)
            result["feed"] = {"rows": len(token_lists), "tokens": [len(t) for t in token_lists], "images": int(len(pixels))}
            results.append(result)
        report["checks"]["graph"] = {
            "passed": all(r["passed"] for r in results),
            "kept_positions_identical": all(r["kept_positions_identical"] for r in results),
            "tolerances": {"logits_atol": logits_atol, "cache_atol": cache_atol, "rtol": rtol, "positions": "exact", "valid": "exact"},
            "max_abs": {k: max(r["max_abs"][k] for r in results) for k in ("logits", "key", "value")},
            "feeds": results,
        }
    if "generation" in checks:
        log(f"validation: generation level ({len(encoded)} prompts, {max_new_tokens} greedy tokens in lockstep)")
        with engine.images(all_pixels), reference.images(all_pixels):
            report["checks"]["generation"] = check_generation(engine, reference, [ids for ids, _ in encoded], max_new_tokens)
    return finish_report(report, start, json_path, log)
