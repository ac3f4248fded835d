"""The image side of the Triton model: an ``image`` input of encoded bytes (PNG, JPEG, ...).

The Triton model (``prefixkv.serving.templates.model``) takes, next to ``text_input``,

    image   BYTES [-1]   optional; one encoded image per ``<image>`` in the prompt
                         (with ``chat`` true, the chat template places them before the text)

and for a request with images calls ``image_request`` to get the prompt ids and pixel
values, then runs ``runner.generate_ids`` inside ``with runner.images(pixel_values):``.
Imports numpy and Pillow only (it runs in Triton's Python backend).
"""
from __future__ import annotations

import numpy as np

from .data import ImageError, decode_image

IMAGE_INPUT = "image"
# the entry of config.pbtxt's ``input [ ... ]`` list
IMAGE_INPUT_PBTXT = '{ name: "image"       data_type: TYPE_STRING dims: [ -1 ] optional: true }'


def image_values(value) -> list[bytes]:
    """The ``image`` input (a numpy object array of bytes, bytes, or a list of bytes) as a list of bytes."""
    if value is None:
        return []
    items = value.reshape(-1).tolist() if isinstance(value, np.ndarray) else (list(value) if isinstance(value, (list, tuple)) else [value])
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            raise ImageError(f"image[{i}] is text; send the encoded bytes of a PNG or JPEG file (BYTES), not a path or base64 text")
        if not isinstance(item, (bytes, bytearray)):
            raise ImageError(f"image[{i}] must be encoded image bytes, got {type(item).__name__}")
        out.append(bytes(item))
    return out


def image_request(runner, prompt: str, image, chat: bool = False, max_new_tokens: int = 0):
    """(prompt ids, pixel values (I, 3, H, W) float32) of a request that has the ``image`` input.

    runner: the model's runner; a runner without image support (a text-only engine) is
    refused with an ``ImageError`` naming the fix.  Raises ``ImageError`` for unreadable
    images or a placeholder count that differs from the images, ``PromptError`` for a
    prompt longer than the context.
    """
    encoded = image_values(image)
    if not hasattr(runner, "encode_image_prompt"):
        raise ImageError("this model serves a text-only engine; it takes no image: drop the image input, "
                         "or deploy an engine built with `prefixkv build`")
    pictures = [decode_image(data, f"image[{i}]") for i, data in enumerate(encoded)]
    pixels = runner.preprocess(pictures)
    return runner.encode_image_prompt(prompt, len(pictures), chat, max_new_tokens), pixels
