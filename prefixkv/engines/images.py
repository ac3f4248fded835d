"""The image input adapter of the runners: prompts with ``<image>``, preprocessing, pending images.

A runner of a vision engine (``VisionOnnxRuntimeRunner``, ``TorchVisionRunner``) mixes in
``ImageInputs`` and keeps the text ``Runner`` interface, adding images to it:

    prefill(input_ids, attention_mask, pixel_values=None)
        pixel_values: (I, 3, H, W) float32 for the I images whose tokens appear in the batch,
        in row-major order; None takes the images set with ``with runner.images(pixel_values):``
        (so the shared loops, ``generate_ids``, validation's lockstep and teacher forcing,
        run unchanged with images)
    encode_image_prompt(prompt, images, chat) -> token ids with ``<image>`` expanded
    preprocess(images) -> pixel values (paths or PIL images)

Imports numpy and Pillow only (it runs in Triton's Python backend).
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..vision.data import (
    ImageError,
    chat_messages,
    check_placeholders,
    count_placeholders,
    load_image,
)
from ..vision.preprocess import ImageProcessor, expand_placeholders
from .base import Generation, GenerationConfig, PromptError


class ImageInputs:
    """Mixin for a ``Runner`` with ``self.vision`` (the manifest's ``vision`` entry) and
    ``self.image_processor``: prompt encoding, preprocessing and per-thread pending images."""

    vision: dict
    image_processor: ImageProcessor

    # -- images for the shared loops ------------------------------------------------------------
    def _local(self) -> threading.local:
        return self.__dict__.setdefault("_pending_images", threading.local())

    @contextlib.contextmanager
    def images(self, pixel_values):
        """Within the block, prefill calls of this thread without pixel_values use these."""
        local = self._local()
        previous = getattr(local, "pixels", None)
        local.pixels = None if pixel_values is None else np.asarray(pixel_values, dtype=np.float32)
        try:
            yield self
        finally:
            local.pixels = previous

    def _pixels_for(self, input_ids: np.ndarray, pixel_values) -> np.ndarray:
        """The pixel values of a prefill, checked against the image tokens of ``input_ids``."""
        if pixel_values is None:
            pixel_values = getattr(self._local(), "pixels", None)
        c, h, w = self.vision["pixel_shape"]
        pixels = np.zeros((0, c, h, w), np.float32) if pixel_values is None else np.asarray(pixel_values, dtype=np.float32)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (c, h, w):
            raise ImageError(f"pixel values must be (images, {c}, {h}, {w}), got {tuple(pixels.shape)}")
        tokens = int((np.asarray(input_ids) == self.vision["image_token_id"]).sum())
        expected = pixels.shape[0] * self.vision["tokens_per_image"]
        if tokens != expected:
            raise ImageError(
                f"the batch holds {tokens} image tokens but {pixels.shape[0]} image(s) of {self.vision['tokens_per_image']} "
                f"tokens were given; encode prompts with encode_image_prompt (one {self.vision['image_token']} per image)")
        return pixels

    # -- prompts and images ---------------------------------------------------------------------
    def preprocess(self, images) -> np.ndarray:
        """Paths or PIL images -> pixel values (I, 3, H, W) float32."""
        from PIL import Image

        images = [images] if isinstance(images, (str, Path, Image.Image)) else list(images or [])
        loaded = [im if isinstance(im, Image.Image) else load_image(im) for im in images]
        return self.image_processor(loaded)

    def encode_image_prompt(self, prompt: str, images: int, chat: bool = False, max_new_tokens: int = 0) -> list[int]:
        """Token ids of ``prompt`` for ``images`` images, each ``<image>`` expanded to its tokens.

        chat: render the model's chat template with the images before the text (any
        ``<image>`` in the prompt is moved there); otherwise the prompt must hold one
        ``<image>`` per image.
        """
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError("the prompt is empty; give some text")
        token = self.vision["image_token"]
        if chat:
            if count_placeholders(prompt, token) not in (0, images):
                check_placeholders(prompt, images, token)
            text = self.tokenizer.apply_chat_template(chat_messages(prompt, images, token))
        else:
            text = prompt
        check_placeholders(text, images, token)
        ids = self.tokenizer.encode(expand_placeholders(text, self.vision["tokens_per_image"], token))
        if len(ids) + max_new_tokens > self.max_context:
            raise PromptError(
                f"the prompt has {len(ids)} tokens ({images} image(s) of {self.vision['tokens_per_image']} tokens) and "
                f"{max_new_tokens} new tokens were asked for, more than the model's context of {self.max_context}; "
                "shorten the prompt or lower max_new_tokens")
        return ids

    def encode_prompt(self, prompt: str, chat: bool = False, max_new_tokens: int = 0) -> list[int]:
        """A prompt without images (the text ``Runner`` interface), through ``encode_image_prompt``."""
        return self.encode_image_prompt(prompt, 0, chat, max_new_tokens)

    def generate(self, prompts: str | Sequence[str], config: GenerationConfig | None = None, chat: bool = False,
                 callback=None, images=None) -> list[Generation]:
        """Generate for one prompt or a batch; ``images``: per prompt a path / PIL image / list of them
        (or, for one prompt, a single path or image).  Prompts without images are text-only."""
        config = config or GenerationConfig()
        config.validate()
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        per_prompt = _per_prompt(images, len(prompts))
        pixels = [self.preprocess(group) for group in per_prompt]
        token_lists = [self.encode_image_prompt(p, len(px), chat, config.max_new_tokens) for p, px in zip(prompts, pixels)]
        with self.images(np.concatenate(pixels) if pixels else None):
            return self.generate_ids(token_lists, config, callback)


def _per_prompt(images, n: int) -> list[list]:
    from PIL import Image

    if images is None:
        return [[] for _ in range(n)]
    if isinstance(images, (str, Path, Image.Image)):
        images = [images]
    images = list(images)
    if n == 1 and not any(isinstance(i, (list, tuple)) for i in images):
        return [images]
    if len(images) != n:
        raise ImageError(f"{len(images)} image entries for {n} prompts; give one entry (an image, a list or None) per prompt")
    return [[] if i is None else list(i) if isinstance(i, (list, tuple)) else [i] for i in images]


__all__ = ["ImageInputs"]
