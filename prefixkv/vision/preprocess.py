"""Run-time image preprocessing with Pillow and numpy only (no transformers, no torch).

Engines and the Triton model cannot rely on transformers, so the model's image processor
settings (``preprocessor_config.json``, or the ``image_processor`` entry of
``processor_config.json``) are applied here with the same operations as transformers' PIL
backend of ``CLIPImageProcessor`` / ``LlavaImageProcessor``:

    [pad to square (LLaVA do_pad)] -> resize (shortest edge, PIL resample) -> center crop
    -> rescale (x 1/255) -> normalize ((x - mean) / std) -> (3, H, W) float32

``tests/test_vision.py`` checks the result against the model's own processor.  (With
torchvision installed transformers defaults to its torchvision backend, whose resize
differs from PIL's by a few 1e-2; engines are always validated on the pixels made here.)

The prompt side: ``expand_placeholders`` writes ``<image>`` once per image token, as
``LlavaProcessor`` does, before tokenisation.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data import IMAGE_PLACEHOLDER

SUPPORTED = ("CLIPImageProcessor", "LlavaImageProcessor")
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


class ProcessorConfigError(ValueError):
    """Image processor settings this module cannot reproduce, with the fix."""


@dataclass
class ImageProcessor:
    """The settings of a CLIP / LLaVA image processor; ``__call__`` turns images into pixel values."""

    kind: str = "CLIPImageProcessor"
    do_resize: bool = True
    size: dict = field(default_factory=lambda: {"shortest_edge": 224})
    resample: int = 3  # PIL.Image.BICUBIC
    do_center_crop: bool = True
    crop_size: dict = field(default_factory=lambda: {"height": 224, "width": 224})
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: list = field(default_factory=lambda: list(OPENAI_CLIP_MEAN))
    image_std: list = field(default_factory=lambda: list(OPENAI_CLIP_STD))
    do_pad: bool = False  # LLaVA's pad-to-square with the mean colour

    @classmethod
    def from_dict(cls, config: dict, source: str = "image processor config") -> ImageProcessor:
        kind = str(config.get("image_processor_type", "CLIPImageProcessor"))
        base = kind.removesuffix("Fast").removesuffix("Pil")
        if base not in SUPPORTED:
            raise ProcessorConfigError(
                f"{source}: image processor {kind} is not supported at run time (supported: {', '.join(SUPPORTED)}); "
                "use the PyTorch backend (--backend torch) for this model")
        out = cls(kind=base)
        for name in ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
                     "do_normalize", "image_mean", "image_std", "do_pad"):
            if config.get(name) is not None:
                setattr(out, name, config[name])
        if isinstance(out.size, int):
            out.size = {"shortest_edge": out.size}
        if isinstance(out.crop_size, int):
            out.crop_size = {"height": out.crop_size, "width": out.crop_size}
        if out.do_resize and not ({"shortest_edge"} <= set(out.size) or {"height", "width"} <= set(out.size)):
            raise ProcessorConfigError(f"{source}: resize size {out.size} is not supported (shortest_edge or height/width)")
        if out.do_resize and "longest_edge" in out.size:
            raise ProcessorConfigError(f"{source}: resize with longest_edge is not supported; use the PyTorch backend")
        return out

    @classmethod
    def from_folder(cls, folder: str | Path) -> ImageProcessor:
        """From ``preprocessor_config.json`` or ``processor_config.json`` in a model or engine folder."""
        folder = Path(folder)
        flat = folder / "preprocessor_config.json"
        if flat.is_file():
            return cls.from_dict(json.loads(flat.read_text()), str(flat))
        nested = folder / "processor_config.json"
        if nested.is_file():
            data = json.loads(nested.read_text())
            if isinstance(data.get("image_processor"), dict):
                return cls.from_dict(data["image_processor"], str(nested))
        raise ProcessorConfigError(
            f"{folder} has no image processor settings (preprocessor_config.json or processor_config.json); "
            "save the model's processor there: AutoProcessor.from_pretrained(...).save_pretrained(folder)")

    def to_dict(self) -> dict:
        return {"image_processor_type": self.kind, **{k: v for k, v in self.__dict__.items() if k != "kind"}}

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of the pixel values."""
        if self.do_center_crop:
            return int(self.crop_size["height"]), int(self.crop_size["width"])
        if "height" in self.size:
            return int(self.size["height"]), int(self.size["width"])
        raise ProcessorConfigError("the output size depends on the image (shortest-edge resize without crop)")

    # -- the pipeline ---------------------------------------------------------------------------
    def __call__(self, images) -> np.ndarray:
        """PIL images (or one) -> pixel values (n, 3, H, W) float32."""
        from PIL import Image

        images = [images] if isinstance(images, Image.Image) else list(images)
        return np.stack([self.one(im) for im in images]).astype(np.float32) if images else np.zeros((0, 3, *self.output_size), np.float32)

    def one(self, image) -> np.ndarray:
        from PIL import Image

        image = image.convert("RGB")
        if self.do_pad:
            image = _pad_to_square(image, tuple(int(x * 255) for x in self.image_mean))
        if self.do_resize:
            image = image.resize(self._resize_to(image.width, image.height)[::-1], resample=Image.Resampling(int(self.resample)))
        array = np.asarray(image).transpose(2, 0, 1)  # (3, H, W) uint8
        if self.do_center_crop:
            array = _center_crop(array, int(self.crop_size["height"]), int(self.crop_size["width"]))
        array = array.astype(np.float64) * self.rescale_factor if self.do_rescale else array.astype(np.float64)
        array = array.astype(np.float32)
        if self.do_normalize:
            mean = np.array(self.image_mean, dtype=np.float32)
            std = np.array(self.image_std, dtype=np.float32)
            array = ((array.T - mean) / std).T
        return array

    def _resize_to(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) after resizing (transformers' get_resize_output_image_size)."""
        if "shortest_edge" in self.size:
            target = int(self.size["shortest_edge"])
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = target, int(target * long / short)
            return (new_long, new_short) if width <= height else (new_short, new_long)
        return int(self.size["height"]), int(self.size["width"])


def _pad_to_square(image, color):
    from PIL import Image

    side = max(image.size)
    if image.width == image.height:
        return image
    canvas = Image.new("RGB", (side, side), color)
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


def _center_crop(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, H, W) -> (C, height, width); zero-pads (centred) an image smaller than the crop."""
    _, h, w = array.shape
    if h < height or w < width:
        new_h, new_w = max(h, height), max(w, width)
        canvas = np.zeros((array.shape[0], new_h, new_w), dtype=array.dtype)
        top, left = -(-(new_h - h) // 2), -(-(new_w - w) // 2)
        canvas[:, top : top + h, left : left + w] = array
        array, h, w = canvas, new_h, new_w
    top, left = (h - height) // 2, (w - width) // 2
    return array[:, top : top + height, left : left + width]


def expand_placeholders(prompt: str, tokens_per_image: int, placeholder: str = IMAGE_PLACEHOLDER) -> str:
    """Each ``<image>`` written ``tokens_per_image`` times (what ``LlavaProcessor`` does)."""
    return prompt.replace(placeholder, placeholder * tokens_per_image)
