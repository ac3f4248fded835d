"""Image data: the LLaVA conversation format, the project's JSONL with ``image``, Pillow loading.

LLaVA conversation format (a JSON list, or JSONL with one conversation per line)::

    {"id": "...", "image": "coco/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is in the picture?"},
                       {"from": "gpt", "value": "A bus parked on a street."}, ...]}

Each (human, gpt) exchange becomes one sample ``{"prompt", "reference", "image"}``; later
exchanges carry the earlier turns in their prompt (``USER: ... ASSISTANT: ...``) unless
``first_turn_only``.  The project's JSONL (``{"prompt", "reference", "image"}``) is read by
``prefixkv.data.load_jsonl``.  Relative image paths are taken from ``image_folder`` (default:
the data file's folder).

``<image>`` marks where an image goes in a prompt: a prompt must hold exactly one per image.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..data import load_jsonl

IMAGE_PLACEHOLDER = "<image>"


class ImageError(ValueError):
    """An image that cannot be used (missing, unreadable, not matching the prompt), with the fix."""


# -- images -------------------------------------------------------------------------------------
def load_image(path: str | Path):
    """The image at ``path`` as an RGB ``PIL.Image`` (fully read, the file closed)."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as err:  # pragma: no cover - Pillow is a dependency of the vision path
        raise ImportError("reading images needs Pillow: pip install pillow") from err
    path = Path(path).expanduser()
    if not path.exists():
        raise ImageError(f"no image at {path}; check the path (relative paths in a data file are taken from its folder or --image-folder)")
    if not path.is_file():
        raise ImageError(f"{path} is not a file; give the path of an image (PNG, JPEG, ...)")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"{path} is not a readable image ({type(err).__name__}: {err}); give a PNG, JPEG or another format Pillow reads") from err


def decode_image(data: bytes, name: str = "image"):
    """Encoded image bytes (PNG, JPEG, ...) as an RGB ``PIL.Image``."""
    import io

    from PIL import Image, UnidentifiedImageError

    if not isinstance(data, (bytes, bytearray)) or not data:
        raise ImageError(f"{name} is empty; send the encoded bytes of a PNG or JPEG file")
    try:
        with Image.open(io.BytesIO(bytes(data))) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"{name} is not a readable image ({type(err).__name__}); send the encoded bytes of a PNG or JPEG file") from err


# -- prompts ------------------------------------------------------------------------------------
def count_placeholders(prompt: str, placeholder: str = IMAGE_PLACEHOLDER) -> int:
    return prompt.count(placeholder)


def check_placeholders(prompt: str, images: int, placeholder: str = IMAGE_PLACEHOLDER) -> None:
    """Refuse a prompt whose ``<image>`` count differs from the number of images."""
    found = count_placeholders(prompt, placeholder)
    if found == images:
        return
    if images == 0:
        raise ImageError(f"the prompt holds {found} {placeholder} placeholder(s) but no image was given; pass the image (--image PATH) or remove {placeholder}")
    if found == 0:
        raise ImageError(
            f"{images} image(s) given but the prompt holds no {placeholder} placeholder; put {placeholder} where the image "
            f"goes, e.g. \"{placeholder}\\nWhat is in the picture?\" (or use --chat, which adds it)")
    raise ImageError(f"the prompt holds {found} {placeholder} placeholders but {images} image(s) were given; use one {placeholder} per image")


def chat_messages(prompt: str, images: int, placeholder: str = IMAGE_PLACEHOLDER) -> list[dict]:
    """A one-turn chat with ``images`` image parts before the text (the LLaVA-1.5 layout).

    Placeholders already in ``prompt`` are removed (the chat template writes them).
    """
    text = prompt.replace(placeholder, "").strip()
    return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}]


# -- data files ---------------------------------------------------------------------------------
def load_llava(path: str | Path, image_folder: str | Path | None = None, first_turn_only: bool = False) -> list[dict]:
    """Samples from a LLaVA conversation file (JSON list or JSONL): see the module doc."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    records = _records(path)
    folder = Path(image_folder) if image_folder else path.parent
    samples = []
    for where, record in records:
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
            raise ValueError(f"{where}: a LLaVA record needs a \"conversations\" list")
        image = record.get("image")
        if isinstance(image, list):
            if len(image) != 1:
                raise ValueError(f"{where}: {len(image)} images in one record; prefixkv takes one image per prompt")
            image = image[0]
        if image is not None and not isinstance(image, str):
            raise ValueError(f"{where}: \"image\" must be a path string")
        image_path = None if image is None else str(Path(image) if Path(image).is_absolute() else folder / image)
        history = ""
        turns = record["conversations"]
        for i in range(0, len(turns) - 1, 2):
            human, gpt = turns[i], turns[i + 1]
            if not (isinstance(human, dict) and isinstance(gpt, dict) and human.get("from") == "human" and gpt.get("from") == "gpt"):
                raise ValueError(f"{where}: turns must alternate {{\"from\": \"human\"}} and {{\"from\": \"gpt\"}} (turn {i})")
            question, answer = human.get("value"), gpt.get("value")
            if not isinstance(question, str) or not isinstance(answer, str):
                raise ValueError(f"{where}: every turn needs a string \"value\" (turn {i})")
            prompt = history + question
            if image_path is not None and i > 0 and IMAGE_PLACEHOLDER not in prompt:
                raise ValueError(f"{where}: the record has an image but no {IMAGE_PLACEHOLDER} in its first question")
            samples.append({"prompt": prompt, "reference": answer, "image": image_path,
                            "id": f"{record.get('id', where)}#{i // 2}"})
            if first_turn_only:
                break
            history = f"{prompt} ASSISTANT: {answer}\nUSER: "
    if not samples:
        raise ValueError(f"{path} holds no (human, gpt) exchanges")
    return samples


def _records(path: Path) -> list[tuple[str, object]]:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from err
        return [(f"{path}[{i}]", r) for i, r in enumerate(data)]
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                out.append((f"{path}:{number}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from err
    return out


def load_samples(path: str | Path, image_folder: str | Path | None = None, first_turn_only: bool = False) -> list[dict]:
    """Samples ``{"prompt", "reference"?, "image"?}`` from either format, detected from the first record.

    Every image path is checked to exist now, so a bad data file fails before any model runs.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    records = _records(path)
    if not records:
        raise ValueError(f"{path} holds no samples")
    first = records[0][1]
    if isinstance(first, dict) and "conversations" in first:
        samples = load_llava(path, image_folder, first_turn_only)
    elif isinstance(first, dict) and "prompt" in first:
        samples = load_jsonl(path)
        if image_folder:
            for s, (_, row) in zip(samples, records):
                if row.get("image") is not None and not Path(row["image"]).is_absolute():
                    s["image"] = str(Path(image_folder) / row["image"])
    else:
        raise ValueError(f"{records[0][0]}: neither a LLaVA record (\"conversations\") nor a prefixkv sample (\"prompt\")")
    for s in samples:
        if s.get("image") is not None and not Path(s["image"]).is_file():
            raise ImageError(f"{path}: sample {s.get('id', '')!s} names the image {s['image']}, which does not exist; fix the path or pass --image-folder")
    return samples


# -- validation prompts: synthetic pictures -----------------------------------------------------
DEFAULT_PROMPTS = (
    "<image>\nWhat is shown in this picture? Describe the colours, the shapes and where they are.",
    "<image>\nIs there any text in the image? Answer briefly.",
    "Describe a sunny day at the beach without looking at any image.",
)


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
