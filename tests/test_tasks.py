"""prefixkv.bench.tasks: the retrieval generator (SmolLM2's tokenizer, no model) and its scoring."""
from __future__ import annotations

import pytest

from prefixkv.bench.tasks import answer_correct, fact_sentence, retrieval_samples, score


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from prefixkv.models import resolve

    return AutoTokenizer.from_pretrained(resolve("smollm2-135m"))


def _tokens(tokenizer, text):
    return len(tokenizer.encode(text, add_special_tokens=False))


def test_deterministic_from_the_seed(tokenizer):
    a = retrieval_samples(tokenizer, n=3, length=256, seed=4)
    b = retrieval_samples(tokenizer, n=3, length=256, seed=4)
    c = retrieval_samples(tokenizer, n=3, length=256, seed=5)
    assert a == b
    assert [s["prompt"] for s in a] != [s["prompt"] for s in c]
    # a prompt depends on (seed, length, index) only, not on how many are asked for
    assert retrieval_samples(tokenizer, n=1, length=256, seed=4)[0] == a[0]


@pytest.mark.parametrize("length", [256, 1024])
def test_fact_placement_question_and_length(tokenizer, length):
    for s in retrieval_samples(tokenizer, n=4, length=length, seed=1):
        sentence = fact_sentence(s["subject"], s["answer"])
        prompt = s["prompt"]
        assert prompt.count(sentence) == 1
        assert prompt.count(s["answer"]) == 1  # the value appears only in its fact
        assert f"\n{sentence}\n" in prompt or prompt.startswith(sentence + "\n")  # a line of its own
        assert prompt.endswith(f"Question: What is the secret code of {s['subject']}?\n"
                               f"Answer: The secret code of {s['subject']} is")
        assert s["reference"] == " " + s["answer"] and s["answer"].isdigit() and len(s["answer"]) == 4
        # the planted depth is where the fact sits in the prose (token share), within a few percent
        prose = prompt[: prompt.rindex("\n\nQuestion:")]
        at = _tokens(tokenizer, prose[: prose.index(sentence)]) / _tokens(tokenizer, prose)
        assert at == pytest.approx(s["depth"], abs=0.05)
        assert 0.05 - 0.01 <= s["depth"] <= 0.95 + 0.01
        assert length - 16 <= s["prompt_tokens"] <= length
        assert s["prompt_tokens"] == _tokens(tokenizer, prompt)


def test_depths_spread_over_the_context(tokenizer):
    depths = [s["depth"] for s in retrieval_samples(tokenizer, n=12, length=256, seed=0)]
    assert min(depths) < 0.35 and max(depths) > 0.65


def test_several_facts_distinct_subjects_one_target(tokenizer):
    for s in retrieval_samples(tokenizer, n=3, length=512, seed=2, facts=3):
        assert len(s["facts"]) == 3
        assert len({f["subject"] for f in s["facts"]}) == 3
        assert sum(f["target"] for f in s["facts"]) == 1
        assert [f["depth"] for f in s["facts"]] == sorted(f["depth"] for f in s["facts"])
        positions = [s["prompt"].index(f["sentence"]) for f in s["facts"]]
        assert positions == sorted(positions)
        target = next(f for f in s["facts"] if f["target"])
        assert (target["subject"], target["value"]) == (s["subject"], s["answer"])


def test_chat_template(tokenizer):
    s = retrieval_samples(tokenizer, n=1, length=512, seed=0, chat=True)[0]
    assert s["prompt"].startswith("<|im_start|>")
    assert s["prompt"].endswith(f"<|im_start|>assistant\nThe secret code of {s['subject']} is")
    assert 512 - 24 <= s["prompt_tokens"] <= 512


def test_answer_correct():
    assert answer_correct(" 4817.", "4817")
    assert answer_correct(" 4817 and 1234", "4817")
    assert not answer_correct(" 1234, not 4817", "4817")
    assert not answer_correct(" 48170", "4817")
    assert not answer_correct(" unknown", "4817")
    assert not answer_correct("", "4817")


def test_score_adds_accuracy_and_answer_ppl():
    samples = [{"answer": "1111", "depth": 0.2}, {"answer": "2222", "depth": 0.7}]
    result = {"ppl": 3.5, "per_sample": [{"generation": " 1111."}, {"generation": " 2223"}]}
    score(result, samples)
    assert result["accuracy"] == 0.5 and result["correct"] == 1 and result["answer_ppl"] == 3.5
    assert [r["correct"] for r in result["per_sample"]] == [True, False]
    with pytest.raises(ValueError):
        score(result, samples[:1])


def test_bad_arguments(tokenizer):
    with pytest.raises(ValueError):
        retrieval_samples(tokenizer, n=0)
    with pytest.raises(ValueError):
        retrieval_samples(tokenizer, n=1, length=32)
    with pytest.raises(ValueError):
        retrieval_samples(tokenizer, n=1, facts=0)
