"""In-flight batching (engines/batching.py) on the tiny engine: every row's output equals the
sequence run alone, rows join and leave between steps, admission by KV memory, the queue,
cancellation."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from test_export import one_torch_thread, tiny_engine  # noqa: F401  (autouse)

from prefixkv.engines.base import GenerationConfig
from prefixkv.engines.batching import (
    MIB,
    BatchConfig,
    Batcher,
    BatchError,
    CacheLayout,
    Observer,
    Request,
)
from prefixkv.engines.onnxruntime import OnnxRuntimeRunner


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    # chunks of 8 tokens: the longer prompts take several prefill chunks
    return OnnxRuntimeRunner(tiny_engine(tmp_path_factory.getbasetemp())[0], threads=1, prefill_chunk=8, cache_slack=4)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 250, size=int(length)).tolist() for length in rng.integers(5, 60, size=n)]


class Recorder:
    """A request's callbacks, and the order things happened in across requests."""

    def __init__(self, log: list, name: int):
        self.log, self.name = log, name
        self.pieces, self.result, self.error = [], None, None
        self.cancel = False

    def request(self, ids, config) -> Request:
        return Request(list(ids), config, on_text=self.on_text, on_done=self.on_done, cancelled=lambda: self.cancel)

    def on_text(self, piece):
        self.pieces.append(piece)
        self.log.append(("text", self.name))

    def on_done(self, generation, error):
        self.result, self.error = generation, error
        self.log.append(("done", self.name))


def test_cache_layout_by_hand():
    layout = CacheLayout((0.5, 0.25), sink=1, protect_last=True, entry_bytes=100, slack=4)
    assert layout.kept(10).tolist() == [5, 3]  # floor(5.5) = 5, floor(3.0) = 3
    assert layout.kept(2).tolist() == [2, 2]  # the sink and the last token are protected
    # cap at the last token (10 + 4 - 1 = 13 seen): floor(7.0) = 7, floor(3.75) = 3; free slots: max(4, cap // 8)
    assert layout.slots(10, 4).tolist() == [11, 7]
    rows = [np.array([11, 7]), np.array([5, 9])]
    assert layout.batch_bytes(rows) == 2 * (11 + 9) * 100  # dense: every row as wide as the widest
    assert layout.batch_bytes(rows, prefill_tokens=6) == (2 * 20 + 6 * 2) * 100
    assert layout.batch_bytes([]) == 0


def test_config_refuses_bad_values():
    for bad in ({"max_batch_size": 0}, {"max_batch_size": True}, {"kv_cache_memory_mib": 0}, {"max_queue": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            BatchConfig(**bad)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_every_row_equals_its_sequence_run_alone(runner, temperature):
    batch = prompts(7)
    configs = [GenerationConfig(max_new_tokens=int(n), temperature=temperature, top_k=20 if temperature else 0, seed=i,
                                ignore_eos=True) for i, n in enumerate([9, 3, 14, 1, 6, 11, 8])]
    alone = [runner.generate_ids([ids], c)[0] for ids, c in zip(batch, configs)]
    log: list = []
    batcher = Batcher(runner, BatchConfig(max_batch_size=3))
    recorders = [Recorder(log, i) for i in range(len(batch))]
    for i in range(3):  # some now, the rest while the first ones run
        batcher.submit(recorders[i].request(batch[i], configs[i]))
    for _ in range(4):
        batcher.step()
    for i in range(3, len(batch)):
        batcher.submit(recorders[i].request(batch[i], configs[i]))
    batcher.drain()
    for rec, want in zip(recorders, alone):
        assert rec.error is None
        assert rec.result.token_ids == want.token_ids and rec.result.text == want.text
        assert "".join(rec.pieces) == want.text[: len("".join(rec.pieces))]
    assert batcher.stats.most_active == 3 and batcher.state is None and not batcher.rows


def test_running_rows_keep_streaming_while_a_long_prompt_prefills(runner):
    log: list = []
    short, long = Recorder(log, 0), Recorder(log, 1)

    class Tokens(Observer):
        def token(self, seq, first, gap):
            log.append(("token", seq.ids[0] == 10))

    batcher = Batcher(runner, BatchConfig(max_batch_size=4), observer=Tokens())
    batcher.submit(short.request([5, 6, 7], GenerationConfig(max_new_tokens=40, ignore_eos=True)))
    batcher.step()  # the short prompt is one chunk: it is running now
    batcher.submit(long.request(list(range(10, 90)), GenerationConfig(max_new_tokens=4, ignore_eos=True)))  # 10 chunks
    batcher.drain()
    first_long = log.index(("token", True))
    assert log[:first_long].count(("token", False)) >= 10  # one decode step of the running row per prefill chunk


def test_admission_by_kv_memory_and_the_queue(runner):
    layout = runner.cache_layout()
    config = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    batch = [list(range(3, 19))] * 5  # equal lengths: equal needs; two prefill chunks each
    need = layout.slots(16, 12)
    budget = layout.batch_bytes([need, need], prefill_tokens=16)  # room for two running rows and a prefill
    batcher = Batcher(runner, BatchConfig(max_batch_size=8, kv_cache_memory_mib=budget / MIB, max_queue=4))
    log: list = []
    recs = [Recorder(log, i) for i in range(5)]
    for rec, ids in zip(recs[:4], batch):
        batcher.submit(rec.request(ids, config))
    with pytest.raises(BatchError, match="queue is full") as err:  # four waiting: the fifth is one too many
        batcher.submit(recs[4].request(batch[4], config))
    assert err.value.reason == "queue_full"
    batcher.drain()
    assert batcher.stats.most_active == 2
    assert [log.index(("done", i)) for i in range(4)] == sorted(log.index(("done", i)) for i in range(4))  # in order
    assert all(r.error is None for r in recs[:4])
    want = runner.generate_ids([batch[0]], config)[0].token_ids
    assert all(r.result.token_ids == want for r in recs[:4])
    with pytest.raises(BatchError, match="more than kv_cache_memory_mib") as err:
        batcher.submit(Request(list(range(3, 200)), config))
    assert err.value.reason == "too_large"
    # past the model's context (the tiny engine's 512 tokens): refused before it runs, whatever the memory
    with pytest.raises(BatchError, match="500 prompt tokens and max_tokens=13 exceed the model's context of 512") as err:
        Batcher(runner).submit(Request([5] * 500, GenerationConfig(max_new_tokens=13)))
    assert err.value.reason == "too_large"
    Batcher(runner).submit(Request([5] * 500, GenerationConfig(max_new_tokens=12)))  # the whole context fits


def test_cancelled_rows_leave_and_free_their_slot(runner):
    log: list = []
    recs = [Recorder(log, i) for i in range(3)]
    ticks = itertools.count()  # a clock a second apart per reading: the queue is asked at every step
    batcher = Batcher(runner, BatchConfig(max_batch_size=2), clock=lambda: float(next(ticks)))
    config = GenerationConfig(max_new_tokens=30, ignore_eos=True)
    batch = prompts(3, seed=1)
    for rec, ids in zip(recs, batch):
        batcher.submit(rec.request(ids, config))
    while len(batcher.rows) < 2:
        batcher.step()
    recs[0].cancel = True
    recs[2].cancel = True  # still queued
    batcher.step()
    assert recs[0].error.reason == "cancelled" and recs[2].error.reason == "cancelled"
    assert len(batcher.rows) == 1 and not batcher.queue
    batcher.drain()
    assert recs[1].result.token_ids == runner.generate_ids([batch[1]], config)[0].token_ids


def test_merge_keeps_each_rows_entries(runner):
    a_ids, b_ids = list(range(3, 40)), list(range(50, 70))
    states = []
    for ids in (a_ids, b_ids):
        gen = runner.begin_prefill(ids)
        while True:
            try:
                next(gen)
            except StopIteration as done:
                states.append(done.value[1])
                break
    kept = [runner.kept_positions(s) for s in states]
    merged = runner.merge([(states[0], [0]), (states[1], [0])])
    both = runner.kept_positions(merged)
    for layer in range(runner.layers):
        for row in range(2):
            got = both[layer][row][both[layer][row] >= 0]
            assert got.tolist() == kept[row][layer][0][kept[row][layer][0] >= 0].tolist()
    assert merged.positions.tolist() == [len(a_ids), len(b_ids)]
    with pytest.raises(ValueError, match="consumed"):
        runner.merge([(states[0], [0])])
    (second,) = [runner.merge([(merged, [1])])]
    assert second.prompt_lengths.tolist() == [len(b_ids)]


def test_closing_tells_every_request_and_refuses_new_ones(runner):
    log: list = []
    recs = [Recorder(log, i) for i in range(3)]
    batcher = Batcher(runner, BatchConfig(max_batch_size=1))
    config = GenerationConfig(max_new_tokens=30, ignore_eos=True)
    for rec, ids in zip(recs, prompts(3, seed=2)):
        batcher.submit(rec.request(ids, config))
    while not batcher.rows:
        batcher.step()
    batcher.close()  # one running, two queued: each gets its final answer
    assert [r.error.reason for r in recs] == ["shutdown"] * 3
    with pytest.raises(BatchError, match="shutting down"):
        batcher.submit(Request([5, 6], config))


def test_a_row_that_cannot_be_sampled_fails_alone(runner):
    log: list = []
    good, bad = Recorder(log, 0), Recorder(log, 1)
    batcher = Batcher(runner, BatchConfig(max_batch_size=2))
    batcher.submit(good.request([5, 6, 7], GenerationConfig(max_new_tokens=8, ignore_eos=True)))
    batcher.submit(bad.request([8, 9], GenerationConfig(max_new_tokens=8, temperature=1e-320, seed=0, ignore_eos=True)))
    batcher.drain()
    assert bad.error is not None and bad.error.reason == "internal" and "internal error" in str(bad.error)
    assert good.error is None and len(good.result.token_ids) == 8


def test_streamed_pieces_never_hold_the_start_of_a_stop_string():
    from prefixkv.engines.base import TextStream

    class Letters:  # one character per token
        eos_token_id = 0

        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    pieces = []
    stream = TextStream(Letters(), GenerationConfig(max_new_tokens=20, stop=["\nUser:"]), 3, pieces.append)
    for ch in "Hi\nUs there\nUser: more":
        if stream.push(ord(ch)):
            break
    assert stream.generation.text == "Hi\nUs there" and stream.generation.finish_reason == "stop"
    assert "".join(pieces) == "Hi\nUs there"  # "\n" and "\nUs" waited until they could not begin "\nUser:"
    first_newline = next(piece for piece in pieces if "\n" in piece)
    assert first_newline == "\nUs "  # released together, once the space ruled the stop string out
