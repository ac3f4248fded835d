"""The one runner interface every backend implements, and generation on top of it.

A backend implements two steps over a batch of left-padded rows:

    prefill(input_ids, attention_mask) -> (logits, state)
        input_ids, attention_mask: (batch, S) int64 numpy arrays, left padding
        logits: (batch, vocab) float32 numpy, for the last position of each row
    decode(state, token_ids) -> (logits, state)
        token_ids: (batch,) int64; the state knows each row's next original position

and may expose ``kept_positions(state)`` (per layer, (batch, W) int64 original positions,
-1 for empty slots) for validation.  For in-flight batching (``engines.batching``) a backend
may also offer ``begin_prefill`` (one prompt, chunk by chunk), ``merge`` (rows of states as
one state: sequences join and leave a running batch) and ``cache_layout``.  Everything else
(sampling, stop strings, EOS, streaming: ``TextStream``) lives here, once, for every backend.  Numpy only: this module is
imported inside the Triton Python backend.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..tokenizer import Tokenizer


@dataclass
class GenerationConfig:
    """Sampling settings.  ``temperature == 0`` means greedy decoding."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: Sequence[str] = ()
    ignore_eos: bool = False

    def validate(self) -> None:
        if not isinstance(self.max_new_tokens, (int, np.integer)) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not (self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k!r}")


@dataclass
class Generation:
    """One prompt's result: the generated text only (no prompt), its ids and why it stopped."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "length" | "eos" | "stop"
    prompt_tokens: int = 0


class PromptError(ValueError):
    """A prompt the engine cannot take (empty, or longer than the context)."""


class Runner(ABC):
    """Base class of every backend.  Subclasses set ``tokenizer``, ``max_context`` and ``name``."""

    name: str = "runner"
    tokenizer: Tokenizer
    max_context: int = 2048

    @abstractmethod
    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray):
        """-> (logits (batch, vocab) float32, state)"""

    @abstractmethod
    def decode(self, state, token_ids: np.ndarray):
        """-> (logits (batch, vocab) float32, state)"""

    def kept_positions(self, state) -> list[np.ndarray]:
        raise NotImplementedError(f"{self.name} does not expose kept positions")

    # -- prompts ---------------------------------------------------------------------
    def encode_prompt(self, prompt: str, chat: bool = False, max_new_tokens: int = 0) -> list[int]:
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError("the prompt is empty; give some text")
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
        ids = self.tokenizer.encode(text)
        if len(ids) + max_new_tokens > self.max_context:
            raise PromptError(
                f"the prompt has {len(ids)} tokens and {max_new_tokens} new tokens were asked for, "
                f"more than the model's context of {self.max_context}; shorten the prompt or lower max_new_tokens"
            )
        return ids

    def pad(self, batch: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Left-pad token lists -> input_ids, attention_mask (batch, S) int64."""
        width = max(len(ids) for ids in batch)
        input_ids = np.full((len(batch), width), self.tokenizer.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for row, ids in enumerate(batch):
            input_ids[row, width - len(ids) :] = ids
            mask[row, width - len(ids) :] = 1
        return input_ids, mask

    # -- generation ------------------------------------------------------------------
    def generate(
        self,
        prompts: str | Sequence[str],
        config: GenerationConfig | None = None,
        chat: bool = False,
        callback: Callable[[int, str], None] | None = None,
    ) -> list[Generation]:
        """Generate for one prompt or a batch.  ``callback(row, text_piece)`` streams new text."""
        config = config or GenerationConfig()
        config.validate()
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        token_lists = [self.encode_prompt(p, chat, config.max_new_tokens) for p in prompts]
        return self.generate_ids(token_lists, config, callback)

    def generate_ids(
        self,
        token_lists: Sequence[Sequence[int]],
        config: GenerationConfig,
        callback: Callable[[int, str], None] | None = None,
    ) -> list[Generation]:
        rng = np.random.default_rng(config.seed)
        input_ids, mask = self.pad(token_lists)
        logits, state = self.prefill(input_ids, mask)
        streams = [TextStream(self.tokenizer, config, len(ids), None if callback is None else
                              (lambda piece, row=row: callback(row, piece))) for row, ids in enumerate(token_lists)]
        done = np.zeros(len(streams), dtype=bool)
        while True:
            tokens = sample(logits, config, rng)
            for row in np.flatnonzero(~done):
                done[row] = streams[row].push(int(tokens[row]))
            if done.all():
                break
            tokens = np.where(done, self.tokenizer.pad_token_id, tokens).astype(np.int64)
            logits, state = self.decode(state, tokens)
        return [s.generation for s in streams]

    # -- in-flight batching (``engines.batching``) -------------------------------------------
    supports_batching = False  # True: ``merge`` joins and splits running batches

    def begin_prefill(self, ids: Sequence[int], pixel_values=None):
        """One prompt's prefill as a generator the scheduler advances: it yields after each
        chunk and returns (logits (1, vocab), state).  Here: the whole prefill in one go."""
        input_ids, mask = self.pad([list(ids)])
        return self.prefill(input_ids, mask) if pixel_values is None else self.prefill(input_ids, mask, pixel_values)
        yield  # noqa: B901  (a generator)

    def merge(self, parts):
        """parts: [(state, rows)] -> one state holding those rows, in that order (the states given are consumed)."""
        raise NotImplementedError(f"{self.name} runs one sequence at a time (no batch merging)")

    def cache_layout(self):
        """The cache's shape rules for KV memory accounting (``batching.CacheLayout``), or None."""
        return None


class TextStream:
    """One sequence's output: tokens in (``push``), the finish checks (EOS, stop strings,
    max_new_tokens) and its text out, streamed as pieces that never end in half a character."""

    def __init__(self, tokenizer: Tokenizer, config: GenerationConfig, prompt_tokens: int,
                 callback: Callable[[str], None] | None = None):
        self.tokenizer, self.config, self.callback = tokenizer, config, callback
        self.generation = Generation("", [], "length", prompt_tokens)
        self.streamed = ""
        self.done = False

    def push(self, token: int) -> bool:
        """Add one sampled token; returns whether the sequence is finished."""
        out, config = self.generation, self.config
        if token == self.tokenizer.eos_token_id and not config.ignore_eos:
            out.finish_reason, self.done = "eos", True
            return True
        out.token_ids.append(token)
        text = self.tokenizer.decode(out.token_ids)
        cut = _first_stop(text, config.stop)
        if cut is not None:
            text, out.finish_reason, self.done = text[:cut], "stop", True
        out.text = text
        if self.callback is not None:
            stable = text
            if not self.done:  # hold back half a character, and what may be the start of a stop string
                stable = text[: len(text) - _stop_prefix(text, config.stop)]
                stable = self.streamed if stable.endswith("\ufffd") else stable
            if len(stable) > len(self.streamed) and stable.startswith(self.streamed):
                piece, self.streamed = stable[len(self.streamed) :], stable
                self.callback(piece)
        if len(out.token_ids) >= config.max_new_tokens:
            self.done = True
        return self.done


def _stop_prefix(text: str, stops: Sequence[str]) -> int:
    """The length of the longest end of ``text`` that begins a stop string (0: none)."""
    return max((k for s in stops if s for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stops if s]
    hits = [h for h in hits if h >= 0]
    return min(hits) if hits else None


def sample(logits: np.ndarray, config: GenerationConfig, rng: np.random.Generator) -> np.ndarray:
    """Next token per row: argmax when temperature is 0, else top-k / top-p sampling."""
    logits = np.asarray(logits, dtype=np.float64)
    if config.temperature == 0:
        return logits.argmax(-1)
    logits = logits / config.temperature
    if config.top_k > 0:
        k = min(config.top_k, logits.shape[-1])
        kth = np.partition(logits, -k, axis=-1)[:, -k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if config.top_p < 1:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_probs = np.take_along_axis(probs, order, -1)
        keep = np.cumsum(sorted_probs, -1) - sorted_probs < config.top_p
        mask = np.zeros_like(keep)
        np.put_along_axis(mask, order, keep, -1)
        probs = np.where(mask, probs, 0)
        probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=p) for p in probs], dtype=np.int64)
