"""The PyTorch reference runner: the Hugging Face model with a ``PrefixKVCache``.

Same interface as every engine (``prefixkv.engines.base.Runner``), so validation compares
an engine with this runner and nothing else.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..cache import PrefixKVCache, cache_argument
from ..defaults import EVICT_DISTANCE
from ..engine_folder import read_manifest
from ..models import load_model
from ..profile import Fingerprint, RetentionProfile
from ..tokenizer import Tokenizer
from ..vision.data import load_image
from ..vision.export import image_geometry
from ..vision.preprocess import ImageProcessor
from .base import Runner
from .images import ImageInputs


class TorchState:
    """cache: the PrefixKVCache; mask: (batch, columns) 2D padding mask so far."""

    def __init__(self, cache: PrefixKVCache, mask: torch.Tensor):
        self.cache, self.mask = cache, mask


class TorchRunner(Runner):
    """model: a transformers causal LM using the ``prefixkv`` attention (``prefixkv.enable``);
    tokenizer_folder: the folder with tokenizer.json (the model folder or an engine folder);
    the other arguments are ``PrefixKVCache``'s (method, profile, keep fraction...)."""

    name = "torch"

    def __init__(self, model, tokenizer_folder: str | Path, profile=None, keep_fraction: float = 1.0,
                 method: str | None = None, **cache_kwargs):
        self.model = model
        self.tokenizer = Tokenizer(tokenizer_folder)
        text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.max_context = int(getattr(text_config, "max_position_embeddings", 2048))
        if method is None:
            method = "full" if (profile is None and keep_fraction >= 1.0) else None
        self.cache_args = dict(profile=profile, keep_fraction=keep_fraction, method=method, **cache_kwargs)

    def new_cache(self) -> PrefixKVCache:
        return PrefixKVCache(**self.cache_args)

    @torch.no_grad()
    def prefill(self, input_ids, attention_mask):
        return self._prefill(attention_mask, input_ids=torch.as_tensor(np.asarray(input_ids), dtype=torch.long))

    def _prefill(self, attention_mask, **inputs):
        """One prefill into a new compressed cache; ``inputs``: input_ids or inputs_embeds (+ pixel_values)."""
        mask = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        cache = self.new_cache()
        out = self.model(attention_mask=mask, position_ids=positions, **inputs, **cache_argument(self.model, cache),
                         use_cache=True, logits_to_keep=1)
        cache.compress()
        return out.logits[:, -1].float().numpy(), TorchState(cache, mask)

    @torch.no_grad()
    def decode(self, state: TorchState, token_ids):
        ids = torch.as_tensor(np.asarray(token_ids), dtype=torch.long).view(-1, 1)
        mask = torch.cat([state.mask, torch.ones_like(ids)], dim=-1)
        positions = state.cache.seen.view(-1, 1).clone()
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         **cache_argument(self.model, state.cache), use_cache=True)
        return out.logits[:, -1].float().numpy(), TorchState(state.cache, mask)

    def kept_positions(self, state: TorchState) -> list[np.ndarray]:
        return [p.numpy() for p in state.cache.kept_positions()]


class TorchVisionRunner(ImageInputs, TorchRunner):
    """model: a LLaVA-style model using the ``prefixkv`` attention in its language model;
    folder: tokenizer.json and the processor settings (the model's folder or an engine's);
    processor: the model's own ``AutoProcessor``; when given, it makes the pixel values.
    The other arguments are ``PrefixKVCache``'s (profile, keep fraction, method, ...)."""

    name = "torch-vision"

    def __init__(self, model, folder: str | Path, profile=None, keep_fraction: float = 1.0, method: str | None = None,
                 processor=None, **cache_kwargs):
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
        dtype = next(self.model.parameters()).dtype
        return self._prefill(attention_mask, input_ids=torch.as_tensor(np.asarray(input_ids), dtype=torch.long),
                             pixel_values=torch.from_numpy(pixels).to(dtype) if len(pixels) else None)

    @torch.no_grad()
    def image_embeddings(self, pixel_values) -> np.ndarray:
        """(I, 3, H, W) -> (I, N, hidden) through the model's own ``get_image_features``."""
        pixels = torch.as_tensor(np.asarray(pixel_values, dtype=np.float32)).to(next(self.model.parameters()).dtype)
        features = self.model.model.get_image_features(pixel_values=pixels).pooler_output
        return torch.stack(list(features)).float().numpy()

    @torch.no_grad()
    def prefill_embeds(self, input_ids, attention_mask, image_embeds):
        """The prefill on given image embeddings (I, N, hidden), put at the image tokens the way
        the Hugging Face model puts its own (row-major ``masked_scatter``): the reference side of
        the graph check, which feeds both sides the same embeddings."""
        ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
        embeds = self.model.get_input_embeddings()(ids)
        image = (ids == self.vision["image_token_id"]).unsqueeze(-1).expand_as(embeds)
        rows = torch.as_tensor(np.asarray(image_embeds)).to(embeds.dtype)
        return self._prefill(attention_mask, inputs_embeds=embeds.masked_scatter(image, rows.reshape(-1)))


def load_torch_runner(engine_dir, threads: int | None = None, verify: bool = True, model=None, processor=None,
                      **kwargs) -> Runner:
    """The PyTorch reference of an engine folder: its model (loaded from the manifest's source
    unless given), profile, keep fraction and eviction; images too for a vision engine."""
    manifest = read_manifest(engine_dir, verify=verify)
    model, loaded, settings = reference_settings(engine_dir, manifest, model, threads)
    if manifest.get("vision"):
        return TorchVisionRunner(model, engine_dir, **settings, processor=processor if loaded is None else loaded, **kwargs)
    return TorchRunner(model, engine_dir, **settings, **kwargs)


def reference_settings(engine_dir, manifest: dict, model=None, threads: int | None = None):
    """What the PyTorch reference of an engine needs: (model, the processor or tokenizer
    ``load_model`` gave, or None when ``model`` was given, PrefixKVCache settings: the
    engine's profile (checked against the model), keep fraction, method and eviction)."""
    if threads is not None:
        torch.set_num_threads(threads)
    loaded = None
    if model is None:
        model, loaded = load_model(manifest["model"]["source"])
    profile = RetentionProfile.load(Path(engine_dir) / "profile.json")
    profile.check_model(Fingerprint.of(model.config))
    settings = dict(profile=profile, keep_fraction=float(manifest["keep_fraction"]), method="prefixkv",
                    evict_distance=int(manifest.get("evict_distance", EVICT_DISTANCE)))
    return model, loaded, settings
