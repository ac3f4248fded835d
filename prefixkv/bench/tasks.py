"""A long-context retrieval task family, generated from the built-in text set.

Each prompt is prose from ``builtin_text(split)`` (Python's language reference) with
short facts planted as their own lines at random depths, then a question about one of
them, and the start of the answer so the next tokens are the value:

    ...prose...
    The secret code of the blue door is 4817.
    ...prose...

    Question: What is the secret code of the blue door?
    Answer: The secret code of the blue door is

The target answer is `` 4817``.  Scoring: a greedy answer is right when its first number
is exactly the planted value; answer PPL is the teacher-forced PPL of the value (the
reference).  Everything is deterministic from ``seed`` (each prompt from (seed, length,
index)), so two runs, or two methods, see the same prompts.
"""
from __future__ import annotations

import random
import re
from collections.abc import Sequence

from ..data import _encode, builtin_text

COLORS = ("blue", "red", "green", "yellow", "black", "white", "orange", "purple", "silver", "golden", "brown", "grey")
THINGS = ("door", "box", "gate", "chest", "safe", "locker", "vault", "cabinet", "drawer", "window", "car", "bag")
QUESTION = "Question: What is the secret code of {subject}?\nAnswer: The secret code of {subject} is"


def fact_sentence(subject: str, value: str) -> str:
    return f"The secret code of {subject} is {value}."


def _snap(pieces: list[str], p: int, reach: int, lo: int, hi: int) -> int:
    """A token boundary near ``p`` that ends a line, else a sentence, else ``p`` itself.

    pieces: the decoded text of each token; boundary q falls between tokens q-1 and q;
    the boundary stays within ``reach`` tokens of ``p`` and inside [lo, hi].
    """
    first, last = max(1, p - reach, lo), min(len(pieces) - 1, p + reach, hi)
    near = sorted(range(first, last + 1), key=lambda q: (abs(q - p), q))
    for q in near:
        if pieces[q - 1].endswith("\n"):
            return q
    for q in near:
        if pieces[q - 1].endswith(".") and pieces[q][:1] in (" ", "\n"):
            return q
    return p


def retrieval_samples(
    tokenizer,
    n: int = 16,
    length: int = 1024,
    seed: int = 0,
    split: str = "evaluation",
    facts: int = 1,
    chat: bool = False,
    depth_range: tuple[float, float] = (0.05, 0.95),
    text: str | None = None,
) -> list[dict]:
    """``n`` retrieval prompts of about ``length`` tokens.

    facts: facts planted per prompt (distinct subjects and values, each at its own random
    depth); the question asks about one of them, chosen at random.
    chat: wrap the prose and question in the tokenizer's chat template (the answer start
    is then the beginning of the assistant's turn).
    Each sample: ``prompt``, ``reference`` (" 4817"), ``answer`` ("4817"), ``subject``,
    ``depth`` (relative position of the target fact in the prose, 0 = start),
    ``prompt_tokens``, ``length`` (the requested one), ``facts`` (all planted facts), ``index``.
    text: prose to plant the facts in instead of the built-in ``split`` (a user's own text).
    """
    if n < 1 or length < 64:
        raise ValueError(f"need n >= 1 prompts of >= 64 tokens, got n={n}, length={length}")
    if not 1 <= facts <= len(COLORS):
        raise ValueError(f"facts must be in 1..{len(COLORS)}, got {facts}")
    lo, hi = depth_range
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"depth_range must be within [0, 1], got {depth_range}")
    text_ids = _encode(tokenizer, builtin_text(split) if text is None else text)
    if text is not None:
        split = "custom"
    samples = []
    for index in range(n):
        rng = random.Random(f"prefixkv-retrieval:{seed}:{length}:{index}")
        colors = rng.sample(COLORS, facts)
        things = [rng.choice(THINGS) for _ in range(facts)]
        subjects = [f"the {c} {t}" for c, t in zip(colors, things)]
        values = [str(rng.randint(1000, 9999)) for _ in range(facts)]
        target = rng.randrange(facts)
        depths = sorted((rng.uniform(lo, hi), k) for k in range(facts))
        question = QUESTION.format(subject=subjects[target])

        overhead = len(_encode(tokenizer, "\n\n" + question)) + 2
        overhead += sum(len(_encode(tokenizer, "\n" + fact_sentence(s, v) + "\n")) for s, v in zip(subjects, values))
        if chat:
            overhead += len(_encode(tokenizer, _render_chat(tokenizer, "", "")))
        budget = length - overhead
        if budget < 16:
            raise ValueError(f"length {length} is too short for {facts} facts and the question")
        if len(text_ids) < budget + 2:
            raise ValueError(f"the {split} text has {len(text_ids)} tokens, fewer than {budget} of prose for a "
                             f"{length}-token retrieval prompt")
        start = rng.randrange(0, len(text_ids) - budget - 1)
        window = text_ids[start : start + budget + 96]
        pieces = [tokenizer.decode([t]) for t in window]
        first = next((q for q in range(1, min(96, len(window))) if pieces[q - 1].endswith("\n")), 0)
        hay = window[first : first + budget]
        pieces = pieces[first : first + budget]
        prose_text = "".join(pieces)
        for k in range(facts):  # a value must not occur anywhere else in the prompt
            while values[k] in prose_text or values[k] in values[:k]:
                values[k] = str(rng.randint(1000, 9999))

        reach = max(4, len(hay) // 40)
        cuts = [_snap(pieces, round(d * len(hay)), reach, round(lo * len(hay)), round(hi * len(hay))) for d, _ in depths]
        parts, planted, previous = [], [], 0
        for (d, k), cut in zip(depths, cuts):
            cut = max(cut, previous)
            parts.append(tokenizer.decode(hay[previous:cut]))
            sentence = fact_sentence(subjects[k], values[k])
            parts.append(("\n" if parts[-1] and not parts[-1].endswith("\n") else "") + sentence + "\n")
            planted.append({"subject": subjects[k], "value": values[k], "depth": round(cut / len(hay), 4),
                            "sentence": sentence, "target": k == target})
            previous = cut
        parts.append(tokenizer.decode(hay[previous:]))
        prose = "".join(parts).rstrip() + "\n\n"
        if chat:
            user, answer_start = prose + question.rsplit("\nAnswer: ", 1)[0], question.rsplit("\nAnswer: ", 1)[1]
            prompt = _render_chat(tokenizer, user, answer_start)
        else:
            prompt = prose + question
        target_fact = next(f for f in planted if f["target"])
        samples.append({
            "prompt": prompt,
            "reference": " " + values[target],
            "answer": values[target],
            "subject": subjects[target],
            "depth": target_fact["depth"],
            "facts": planted,
            "length": length,
            "prompt_tokens": len(_encode(tokenizer, prompt)),
            "index": index,
            "seed": seed,
            "split": split,
            "chat": chat,
        })
    return samples


def _render_chat(tokenizer, user: str, answer_start: str) -> str:
    template = getattr(tokenizer, "apply_chat_template", None)
    if template is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat=True needs a tokenizer with a chat template")
    text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    return text + answer_start


# -- scoring ------------------------------------------------------------------------------------------
_NUMBER = re.compile(r"\d+")


def answer_correct(generation: str, answer: str) -> bool:
    """Exact match: the first number in the greedy answer is the planted value."""
    found = _NUMBER.search(generation or "")
    return found is not None and found.group(0) == answer


def score(result: dict, samples: Sequence[dict]) -> dict:
    """Add retrieval figures to an ``evaluation.evaluate`` result (in place, and returned).

    Per sample: ``correct`` (bool), ``answer``, ``depth``; overall: ``accuracy`` (share
    right), ``correct`` (count) and ``answer_ppl`` (the result's PPL: the reference is
    the answer).
    """
    rows = result["per_sample"]
    if len(rows) != len(samples):
        raise ValueError(f"{len(rows)} results for {len(samples)} samples")
    for row, sample in zip(rows, samples):
        if "generation" not in row:
            raise ValueError("retrieval scoring needs generations (evaluate with generate=True)")
        row["answer"] = sample["answer"]
        row["depth"] = sample["depth"]
        row["correct"] = answer_correct(row["generation"], sample["answer"])
    result["correct"] = sum(r["correct"] for r in rows)
    result["accuracy"] = result["correct"] / len(rows)
    result["answer_ppl"] = result["ppl"]
    return result
