"""Runners that take images: the PyTorch reference and the ONNX Runtime engine.

    runner = load_vision_runner("engines/llava-k20")                      # ONNX Runtime
    runner = load_vision_runner("engines/llava-k20", backend="torch")     # the PyTorch reference
    runner.generate("<image>\\nWhat is shown?", GenerationConfig(max_new_tokens=32), images=["cat.png"])

Both keep the text ``Runner`` interface and add images to it:

    prefill(input_ids, attention_mask, pixel_values=None)
        pixel_values: (I, 3, H, W) float32 for the I images whose tokens appear in the batch,
        in row-major order; None takes the images set with ``with runner.images(pixel_values):``
        (so the shared loops, ``generate_ids``, validation's lockstep and teacher forcing,
        run unchanged with images)
    encode_image_prompt(prompt, images, chat) -> token ids with ``<image>`` expanded
    preprocess(images) -> pixel values (paths or PIL images)

The ONNX Runtime runner imports numpy, Pillow, onnxruntime and tokenizers only (it runs in
Triton's Python backend); the torch runner lives in ``prefixkv.vision.torch_runner``.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..engines.base import Generation, GenerationConfig, PromptError
from ..engines.onnxruntime import OnnxRuntimeRunner, OnnxRuntimeState
from . import is_vision_engine
from .data import IMAGE_PLACEHOLDER, ImageError, chat_messages, check_placeholders, count_placeholders, load_image
from .preprocess import ImageProcessor, expand_placeholders


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


# -- ONNX Runtime ----------------------------------------------------------------------------------
class VisionOnnxRuntimeRunner(ImageInputs, OnnxRuntimeRunner):
    """An engine folder written by ``build_vision_engine``: vision, prefill and decode graphs."""

    name = "onnxruntime-vision"

    def __init__(self, engine_dir: str | Path, providers=None, threads: int | None = None, verify: bool = True):
        from ..engine_folder import EngineError, read_manifest

        if not is_vision_engine(engine_dir):  # before loading any graph
            source = read_manifest(engine_dir, verify=False)["model"]["source"]
            raise ImageError(
                f"{engine_dir} is a text-only engine (built from {source}); it takes no image: drop the image, "
                "or build a vision engine from a LLaVA model with `prefixkv vision build`")
        super().__init__(engine_dir, providers=providers, threads=threads, verify=verify)
        self.vision = self.manifest["vision"]
        if "vision" not in self.manifest["graphs"]:
            raise EngineError(f"{self.engine_dir}: the manifest lists no vision graph; rebuild it with `prefixkv vision build --force`")
        self.image_processor = ImageProcessor.from_dict(self.vision["processor"], f"{self.engine_dir}/manifest.json")
        options = self.sessions["prefill"].get_session_options()
        path = self.engine_dir / self.manifest["graphs"]["vision"]["file"]
        self.sessions["vision"] = self._ort.InferenceSession(str(path), options, providers=self.providers)
        self._check_io("vision")
        self._outputs["vision"] = [o.name for o in self.sessions["vision"].get_outputs()]

    def image_embeddings(self, pixel_values) -> np.ndarray:
        """(I, 3, H, W) float32 -> (I, N, hidden): the vision graph (no run for I = 0)."""
        pixels = np.asarray(pixel_values, dtype=np.float32)
        if pixels.shape[0] == 0:
            return np.zeros((0, self.vision["tokens_per_image"], self.vision["hidden"]), np.dtype(self.manifest.get("dtype", "float32")))
        return self.sessions["vision"].run(None, {"pixel_values": np.ascontiguousarray(pixels)})[0]

    def prefill(self, input_ids, attention_mask, pixel_values=None):
        """input_ids, attention_mask (B, S) int64; pixel_values (I, 3, H, W) -> (logits (B, V), state)."""
        pixels = self._pixels_for(input_ids, pixel_values)
        return self.prefill_embeds(input_ids, attention_mask, self.image_embeddings(pixels))

    def prefill_embeds(self, input_ids, attention_mask, image_embeds):
        """The prefill graph on given image embeddings (I, N, hidden) (graph-level validation)."""
        ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.asarray(attention_mask, dtype=np.int64)
        if ids.ndim != 2 or ids.shape != mask.shape or ids.shape[1] < 1:
            raise ValueError(f"input_ids and attention_mask must be (batch, S) arrays of one shape, got {ids.shape} and {mask.shape}")
        outputs = self._run("prefill", {"input_ids": ids, "attention_mask": mask, "image_embeds": np.asarray(image_embeds)})
        lengths = mask.sum(-1).astype(np.int64)
        return outputs[0].numpy(), OnnxRuntimeState(list(outputs[1:]), lengths.copy(), lengths)


def load_vision_runner(engine_dir: str | Path, backend: str = "onnxruntime", threads: int | None = None,
                       providers=None, verify: bool = True, model=None, processor=None):
    """A runner with images for a vision engine folder; a text-only engine is refused with the fix.

    backend "torch": the engine's model (loaded from the manifest unless given), profile and
    keep fraction through the PyTorch reference cache.
    """
    from ..engines import ALIASES, BACKENDS
    from ..engine_folder import read_manifest

    name = ALIASES.get(str(backend).lower(), str(backend).lower())
    if name == "auto":  # vision engines are ONNX Runtime engines (no TensorRT vision graph yet)
        name = "onnxruntime"
    if name == "onnxruntime":
        return VisionOnnxRuntimeRunner(engine_dir, providers=providers, threads=threads, verify=verify)
    if name != "torch":
        raise ValueError(f"unknown backend {backend!r} for a vision engine; choose one of {', '.join(b for b in BACKENDS if b != 'tensorrt')}")
    manifest = read_manifest(engine_dir, verify=verify)
    if not manifest.get("vision"):
        raise ImageError(f"{engine_dir} is a text-only engine (built from {manifest['model']['source']}); it takes no image: "
                         "drop the image, or build a vision engine from a LLaVA model with `prefixkv vision build`")
    from ..engines import reference_settings
    from .torch_runner import TorchVisionRunner

    model, loaded, settings = reference_settings(engine_dir, manifest, model, threads)
    return TorchVisionRunner(model, engine_dir, **settings, processor=processor if loaded is None else loaded)


__all__ = ["IMAGE_PLACEHOLDER", "ImageInputs", "VisionOnnxRuntimeRunner", "load_vision_runner"]
