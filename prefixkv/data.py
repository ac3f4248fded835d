"""Text sets: the built-in one (Python's language reference, ``pydoc_data.topics``) with
disjoint calibration and evaluation splits, and the project's JSONL format.

JSONL: one object per line, ``{"prompt": str, "reference": str (optional), "image": path (optional)}``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

SPLITS = ("calibration", "evaluation")


def builtin_topics(split: str) -> list[str]:
    """Topic texts of one split: every 4th topic (sorted by name) is evaluation, the rest calibration."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose {' or '.join(SPLITS)}")
    from pydoc_data.topics import topics

    names = sorted(topics)
    chosen = [n for i, n in enumerate(names) if (i % 4 == 3) == (split == "evaluation")]
    return [topics[n].strip() for n in chosen]


def builtin_text(split: str) -> str:
    return "\n\n".join(builtin_topics(split))


def builtin_samples(tokenizer, split: str = "calibration", n: int = 16, tokens: int = 512,
                    reference_tokens: int = 64, phase: float = 0.0) -> list[dict]:
    """``n`` passages of ``tokens`` prompt tokens followed by ``reference_tokens`` of continuation.

    Windows are spread evenly over the split's text (overlapping only when the text is too
    short for ``n`` disjoint windows).  tokenizer: anything with ``encode``/``decode``.
    phase: where in each stride the windows start (0 = its start, 0.5 = its middle: the
    windows between those of phase 0, for a second set from the same split).
    """
    if not 0 <= phase < 1:
        raise ValueError(f"phase must be in [0, 1), got {phase}")
    if n < 1 or tokens < 2:
        raise ValueError(f"need n >= 1 samples of >= 2 tokens, got n={n}, tokens={tokens}")
    ids = _encode(tokenizer, builtin_text(split))
    span = tokens + reference_tokens
    if len(ids) < span:
        raise ValueError(f"the {split} split has {len(ids)} tokens, fewer than one sample of {span}")
    last_start = len(ids) - span
    stride = last_start / max(n - 1, 1) if n > 1 else last_start
    starts = [min(round((i + phase) * stride), last_start) for i in range(n)]
    samples = []
    for start in starts:
        prompt = tokenizer.decode(ids[start : start + tokens])
        reference = tokenizer.decode(ids[start + tokens : start + span]) if reference_tokens else ""
        samples.append({"prompt": prompt, "reference": reference})
    return samples


def _encode(tokenizer, text: str) -> list[int]:
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:  # prefixkv.tokenizer.Tokenizer
        return list(tokenizer.encode(text))


def load_jsonl(path: str | Path) -> list[dict]:
    """Samples from a JSONL file, each checked: a non-empty ``prompt`` string, optional
    ``reference`` string and ``image`` path (relative paths are taken from the file's folder)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    samples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from err
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise ValueError(f"{path}:{number}: each line needs a non-empty \"prompt\" string")
        if "reference" in row and not isinstance(row["reference"], str):
            raise ValueError(f"{path}:{number}: \"reference\" must be a string")
        if row.get("image") is not None:
            image = Path(row["image"])
            row["image"] = str(image if image.is_absolute() else path.parent / image)
        samples.append(row)
    if not samples:
        raise ValueError(f"{path} holds no samples")
    return samples


def samples_hash(token_lists) -> str:
    digest = hashlib.sha256()
    for ids in token_lists:
        digest.update(json.dumps(list(map(int, ids))).encode())
    return digest.hexdigest()[:16]
