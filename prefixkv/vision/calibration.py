"""Calibration on image prompts, and the share of kept entries that are image tokens.

    run = calibrate_vision(model, processor, samples, keep_fractions=[0.2, 0.5])
    run.profiles["accumulated"].save("profile.json")
    run.image_share["accumulated"][0.2]      # per layer: kept image entries / kept entries
    plot_image_share(run, "report/")

Each sample (``{"prompt", "image"?}``, see ``prefixkv.vision.data``) is prepared by the model's
own processor (Pillow image, ``<image>`` expanded, pixel values) and then calibrated by
``prefixkv.calibration.calibrate`` itself: a thin stand-in for the model (``_ImageFeed``)
adds each sample's pixel values to the one forward ``calibrate`` makes per sample, and keeps
the importance scores that forward recorded.  From those scores the kept entries of every
layer are chosen exactly as ``PrefixKVCache`` chooses them (``prefixkv.compaction.compact``
with the profile's per-layer keep fractions), and counted as image or text tokens.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..cache import cache_argument
from ..calibration import Calibration, calibrate
from ..compaction import compact
from .data import ImageError, chat_messages, check_placeholders, load_image


@dataclass
class VisionCalibration(Calibration):
    """``Calibration`` plus, per scorer and keep fraction, the per-layer image share of kept entries."""

    # scorer key -> keep fraction -> per layer mean(kept image entries / kept entries) over samples
    image_share: dict[str, dict[float, list[float]]] = field(default_factory=dict)
    # mean share of image tokens in the calibration prompts (what a uniform choice would keep)
    prompt_image_share: float = 0.0


def model_inputs(processor, sample: dict, chat: bool = False) -> dict[str, torch.Tensor]:
    """One sample as model inputs by the model's processor: input_ids, attention_mask (1, S)
    and, with an image, pixel_values (1, 3, H, W).  chat: wrap in the processor's chat template."""
    token = getattr(processor, "image_token", None) or "<image>"
    images = [load_image(sample["image"])] if sample.get("image") else []
    prompt = sample["prompt"]
    if chat:
        if not getattr(processor, "chat_template", None):
            raise ValueError("the model's processor has no chat template; calibrate without --chat (prompts hold <image> themselves)")
        prompt = processor.apply_chat_template(chat_messages(prompt, len(images), token), add_generation_prompt=True, tokenize=False)
    check_placeholders(prompt, len(images), token)
    encoded = processor(images=images or None, text=[prompt], return_tensors="pt")
    inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    if images:
        inputs["pixel_values"] = encoded["pixel_values"]
    return inputs


class _ImageFeed:
    """Looks like ``model`` to ``calibrate``: adds each sample's pixel values to its forward
    and keeps the recorded scores.  Samples must come in the order given (checked)."""

    def __init__(self, model, prepared: list[dict]):
        self.model, self.config, self.prepared = model, model.config, prepared
        self.scores: list[dict[str, torch.Tensor]] = []  # per sample: scorer key -> (layers, S)

    def parameters(self):
        return self.model.parameters()

    def __call__(self, input_ids, past_key_values=None, **kwargs):
        sample = self.prepared[len(self.scores)]
        if not torch.equal(input_ids.cpu(), sample["input_ids"]):
            raise RuntimeError("calibrate() fed the samples in another order than given")
        pixels = sample.get("pixel_values")
        device = input_ids.device
        out = self.model(input_ids=input_ids, **cache_argument(self.model, past_key_values),
                         pixel_values=None if pixels is None else pixels.to(device, next(self.model.parameters()).dtype), **kwargs)
        self.scores.append({k: v[:, 0].float().cpu() for k, v in past_key_values.recorded_scores().items()})
        return out


def kept_image_share(scores: torch.Tensor, is_image: torch.Tensor, fractions: Sequence[float], sink: int,
                     protect_last: bool) -> list[float]:
    """Per layer, the share of image tokens among the entries ``PrefixKVCache`` keeps.

    scores: (layers, S) importance of one prompt; is_image: (S,) bool; fractions: per-layer keep fractions.
    """
    s = scores.shape[-1]
    valid = torch.ones(1, s, dtype=torch.bool)
    dummy = torch.zeros(1, 1, s, 1)
    shares = []
    for layer, fraction in enumerate(fractions):
        _, _, positions, kept = compact(dummy, dummy, scores[layer : layer + 1], valid, float(fraction), sink, protect_last)
        chosen = positions[kept]
        shares.append(float(is_image[chosen].float().mean()) if chosen.numel() else 0.0)
    return shares


def calibrate_vision(model, processor, samples: Sequence[dict], keep_fractions: Sequence[float],
                     scorers: Sequence = ("accumulated",), chat: bool = False, **options) -> VisionCalibration:
    """Calibrate one profile per scorer on image samples (see the module doc).

    options: ``prefixkv.calibration.calibrate``'s own (search, progress, seed, data_name)."""
    if not samples:
        raise ValueError("calibration needs at least one sample")
    image_token_id = getattr(model.config, "image_token_id", None)
    if image_token_id is None:
        raise ImageError("the model has no image_token_id: calibrate a text-only model with `prefixkv calibrate`")
    prepared = [model_inputs(processor, s, chat) for s in samples]
    feed = _ImageFeed(model, prepared)
    token_lists = [p["input_ids"][0].tolist() for p in prepared]
    run = calibrate(feed, token_lists, keep_fractions, scorers, **options)
    masks = [p["input_ids"][0] == image_token_id for p in prepared]
    result = VisionCalibration(profiles=run.profiles, curves=run.curves, gini=run.gini)
    result.prompt_image_share = float(torch.stack([m.float().mean() for m in masks]).mean())
    digest = hashlib.sha256()
    for p in prepared:
        if "pixel_values" in p:
            digest.update(p["pixel_values"].numpy().tobytes())
    for key, profile in run.profiles.items():
        shares = {}
        for kf in profile.keep_fractions:
            fractions = profile.layer_fractions(kf)
            per_sample = [kept_image_share(sc[key], m, fractions, profile.sink, profile.protect_last)
                          for sc, m in zip(feed.scores, masks)]
            shares[kf] = [round(float(x), 6) for x in torch.tensor(per_sample).mean(0)]
        result.image_share[key] = shares
        profile.calibration.update({
            "images": sum("pixel_values" in p for p in prepared),
            "images_hash": digest.hexdigest()[:16],
            "chat": chat,
            "prompt_image_share": round(result.prompt_image_share, 6),
            "image_share": {f"{kf:g}": v for kf, v in shares.items()},
        })
    return result


def plot_image_share(run: VisionCalibration, folder: str | Path, keep_fractions: Sequence[float] | None = None) -> list[Path]:
    """One PNG per scorer: per layer, the kept entries split into image and text tokens
    (stacked bars, one panel per keep fraction; the dashed line is the prompts' image share)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, shares in run.image_share.items():
        chosen = sorted(keep_fractions or shares)
        if len(chosen) > 4:
            chosen = [chosen[round(i * (len(chosen) - 1) / 3)] for i in range(4)]
        fig, axes = plt.subplots(len(chosen), 1, figsize=(max(6, 0.25 * len(shares[chosen[0]]) + 2), 2.2 * len(chosen)),
                                 squeeze=False, sharex=True)
        for ax, kf in zip(axes[:, 0], chosen):
            image = shares[kf]
            layers = range(len(image))
            ax.bar(layers, image, color="tab:orange", label="image tokens")
            ax.bar(layers, [1 - x for x in image], bottom=image, color="tab:blue", label="text tokens")
            ax.axhline(run.prompt_image_share, color="black", linestyle="--", linewidth=1, label="share in the prompts")
            ax.set_ylim(0, 1)
            ax.set_ylabel(f"keep {kf:g}")
        fig.suptitle(f"Kept KV entries per layer: image vs text tokens (scorer {key})")
        axes[0, 0].legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncol=3, fontsize=7, frameon=False)
        axes[-1, 0].set_xlabel("layer")
        axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.tight_layout()
        path = folder / f"image_share.{key}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
