"""``TorchVisionRunner``: the Hugging Face LLaVA model with a ``PrefixKVCache``, the reference of vision engines.

Same interface as ``VisionOnnxRuntimeRunner`` (``prefixkv.vision.runner``): validation
compares the two step by step, and evaluation runs every method through it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..cache import cache_argument
from ..engines.torch import TorchRunner, TorchState
from .data import load_image
from .preprocess import ImageProcessor
from .runner import ImageInputs


class TorchVisionRunner(ImageInputs, TorchRunner):
    """model: a LLaVA-style model using the ``prefixkv`` attention in its language model;
    folder: tokenizer.json and the processor settings (the model's folder or an engine's);
    processor: the model's own ``AutoProcessor``; when given, it makes the pixel values.
    The other arguments are ``PrefixKVCache``'s (profile, keep fraction, method, ...)."""

    name = "torch-vision"

    def __init__(self, model, folder: str | Path, profile=None, keep_fraction: float = 1.0, method: str | None = None,
                 processor=None, **cache_kwargs):
        from .export import image_geometry

        super().__init__(model, folder, profile=profile, keep_fraction=keep_fraction, method=method, **cache_kwargs)
        self.hf_processor = processor
        self.image_processor = ImageProcessor.from_folder(folder)
        self.vision = image_geometry(model, self.image_processor)
        if getattr(processor, "image_token", None):
            self.vision["image_token"] = processor.image_token

    def preprocess(self, images) -> np.ndarray:
        """Paths or PIL images -> (I, 3, H, W) float32, by the model's own processor when given."""
        if self.hf_processor is None:
            return super().preprocess(images)
        from PIL import Image

        images = [images] if isinstance(images, (str, Path, Image.Image)) else list(images or [])
        if not images:
            return self.image_processor([])
        loaded = [im if isinstance(im, Image.Image) else load_image(im) for im in images]
        return np.asarray(self.hf_processor.image_processor(loaded, return_tensors="np")["pixel_values"], dtype=np.float32)

    @torch.no_grad()
    def prefill(self, input_ids, attention_mask, pixel_values=None):
        """input_ids, attention_mask (B, S); pixel_values (I, 3, H, W) -> (logits (B, V), state)."""
        pixels = self._pixels_for(input_ids, pixel_values)
        ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
        mask = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        dtype = next(self.model.parameters()).dtype
        cache = self.new_cache()
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         pixel_values=torch.from_numpy(pixels).to(dtype) if len(pixels) else None,
                         **cache_argument(self.model, cache), use_cache=True, logits_to_keep=1)
        cache.compress()
        return out.logits[:, -1].float().numpy(), TorchState(cache, mask)

    @torch.no_grad()
    def image_embeddings(self, pixel_values) -> np.ndarray:
        """(I, 3, H, W) -> (I, N, hidden) through the model's own ``get_image_features``."""
        pixels = torch.as_tensor(np.asarray(pixel_values, dtype=np.float32)).to(next(self.model.parameters()).dtype)
        features = self.model.model.get_image_features(pixel_values=pixels).pooler_output
        return torch.stack(list(features)).float().numpy()
