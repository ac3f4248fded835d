"""The quality metrics, one implementation each, used by ``eval``, ``validate`` and the benchmarks.

ROUGE-L is rouge-score's F1 of the longest common token subsequence with the Porter
stemmer (``defaults.ROUGE_STEMMER``), the setting of rouge-score's own examples and of the
summarisation literature: inflections of one word count as the same word.
"""
from __future__ import annotations

import math

from rouge_score import rouge_scorer

from .defaults import ROUGE_STEMMER

_ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=ROUGE_STEMMER)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of ``prediction`` against ``reference``; two empty texts score 1."""
    if not prediction.strip() and not reference.strip():
        return 1.0
    return float(_ROUGE.score(reference, prediction)["rougeL"].fmeasure)


def perplexity(nll_sum: float, tokens: int) -> float:
    """exp(summed negative log-likelihood / tokens); NaN without tokens."""
    return math.exp(nll_sum / tokens) if tokens > 0 else float("nan")
