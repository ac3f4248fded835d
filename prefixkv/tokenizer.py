"""Tokenisation and chat templates without transformers.

Engines and the Triton model run where importing transformers may fail (the Triton Python
backend stub embeds another libpython build), so run-time tokenisation uses the
``tokenizers`` library on ``tokenizer.json`` and renders the chat template with jinja2,
the same way transformers does.
"""
from __future__ import annotations

import json
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


class Tokenizer:
    """A fast tokenizer loaded from a folder holding ``tokenizer.json`` (+ ``tokenizer_config.json``)."""

    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer as _Fast

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the engine folder needs the model's tokenizer.json")
        self._tok = _Fast.from_file(str(path))
        config = {}
        if (folder / "tokenizer_config.json").is_file():
            config = json.loads((folder / "tokenizer_config.json").read_text())
        template = config.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        self.chat_template: str | None = template
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.pad_token = _token_text(config.get("pad_token")) or self.eos_token
        self.add_bos = bool(config.get("add_bos_token", False))
        self.eos_token_id = self.token_to_id(self.eos_token)
        self.pad_token_id = self.token_to_id(self.pad_token)
        if self.pad_token_id is None:
            self.pad_token_id = 0

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        bos = self.token_to_id(self.bos_token) if self.add_bos else None
        return ([bos] if bos is not None else []) + ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` ([{"role": ..., "content": ...}]) with the model's template."""
        if not self.chat_template:
            raise ValueError("this model has no chat template; pass the prompt as plain text (without --chat)")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, loader=jinja2.BaseLoader())

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value
