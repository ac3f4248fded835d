"""In-flight batching: independent sequences share one runner, joining and leaving between steps.

    batcher = Batcher(runner, BatchConfig(max_batch_size=8, kv_cache_memory_mib=512))
    batcher.submit(Request(ids, GenerationConfig(max_new_tokens=32), on_text=..., on_done=...))
    batcher.run(stop_event)          # the scheduler loop (a thread of the Triton model)

Each loop iteration does at most one prefill chunk of the sequence joining (the oldest
admitted one) and one decode step of every running row, so running streams keep flowing
while a long prompt is prefilled.  A finished prefill joins the running batch
(``runner.merge``); finished, failed or cancelled rows leave it the same way.  Every row has
its own prompt length, per-layer lengths (the engine's decode rule runs per row), sampling
settings and random generator, so its output is that of the sequence run alone.

Admission is by KV memory.  ``CacheLayout`` gives, from the engine's per-layer keep
fractions, the most slots each layer of a sequence can need (its decode cap at the last
token, plus the free slots a compaction adds).  The batch's buffers are dense (every row
as wide as the widest row of each layer), so the batch's bytes are rows x the per-layer
maxima; a sequence being prefilled holds its whole prompt in every layer until it is
compacted.  A sequence is admitted, in arrival order, when all of that fits in
``kv_cache_memory_mib`` and a row is free; the others wait in a bounded queue.

Numpy only (runs inside Triton's Python backend).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .base import Generation, GenerationConfig, TextStream, sample

MIB = 1 << 20
POLL = 0.25  # seconds between the slower checks: waiting requests' cancellation, the KV gauges (read off the cache)


class BatchError(RuntimeError):
    """A sequence the batcher refuses or drops; ``reason`` is a short metric label."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class BatchConfig:
    """max_batch_size: rows decoded together; kv_cache_memory_mib: the KV memory budget (None:
    rows only); max_queue: sequences that may wait for a row (more are refused)."""

    max_batch_size: int = 8
    kv_cache_memory_mib: float | None = None
    max_queue: int = 256

    def __post_init__(self):
        if isinstance(self.max_batch_size, bool) or not isinstance(self.max_batch_size, (int, np.integer)) or self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive integer, got {self.max_batch_size!r}")
        if self.kv_cache_memory_mib is not None and not (float(self.kv_cache_memory_mib) > 0):
            raise ValueError(f"kv_cache_memory_mib must be a positive number of MiB, got {self.kv_cache_memory_mib!r}")
        if isinstance(self.max_queue, bool) or not isinstance(self.max_queue, (int, np.integer)) or self.max_queue < 1:
            raise ValueError(f"max_queue must be a positive integer (requests go through the queue), got {self.max_queue!r}")


@dataclass(frozen=True)
class CacheLayout:
    """How many slots a sequence's cache needs per layer, from the engine's rules.

    fractions: per-layer keep fractions; sink / protect_last: the protected entries;
    entry_bytes: key + value bytes of one slot of one layer; slack: the runner's
    ``cache_slack`` (a compaction leaves max(slack, entries // 8) free slots)."""

    fractions: tuple[float, ...]
    sink: int
    protect_last: bool
    entry_bytes: int
    slack: int

    @classmethod
    def from_manifest(cls, manifest: dict, slack: int) -> CacheLayout:
        itemsize = np.dtype(manifest.get("dtype", "float32")).itemsize
        return cls(tuple(float(f) for f in manifest["layer_keep_fractions"]), int(manifest["sink"]),
                   bool(manifest["protect_last"]), 2 * int(manifest["kv_heads"]) * int(manifest["head_dim"]) * itemsize,
                   int(slack))

    def kept(self, tokens: int) -> np.ndarray:
        """(layers,) entries each layer keeps of ``tokens`` (``compaction.keep_counts``: float32 rounding)."""
        k = np.floor(np.asarray(self.fractions, np.float32) * np.float32(tokens) + np.float32(0.5)).astype(np.int64)
        sinks = min(tokens, self.sink)
        protected = sinks + int(tokens > sinks and self.protect_last)
        return np.maximum(np.minimum(k, tokens), protected)

    def slots(self, prompt_tokens: int, new_tokens: int) -> np.ndarray:
        """(layers,) the most slots a sequence holds once running: its decode cap at its last
        token plus a compaction's free slots."""
        cap = np.maximum(self.kept(prompt_tokens), self.kept(prompt_tokens + max(new_tokens - 1, 0)))
        return cap + np.maximum(self.slack, cap // 8)

    def batch_bytes(self, rows: list[np.ndarray], prefill_tokens: int = 0) -> int:
        """Bytes of a dense batch of ``rows`` (each a ``slots`` result) plus a prefill of that many tokens."""
        dense = len(rows) * int(np.max(np.stack(rows), axis=0).sum()) if rows else 0
        return (dense + prefill_tokens * len(self.fractions)) * self.entry_bytes


@dataclass(eq=False)
class Request:
    """One request.  on_text(piece): streamed text; on_done(generation, error): called once,
    with the result or a BatchError; cancelled(): polled, True frees the row."""

    ids: list[int]
    config: GenerationConfig
    on_text: Callable[[str], None] | None = None
    on_done: Callable[[Generation | None, BatchError | None], None] | None = None
    cancelled: Callable[[], bool] = lambda: False
    pixel_values: object = None
    # times (time.monotonic), filled in by the batcher
    arrived: float = 0.0
    admitted: float | None = None
    first_token: float | None = None
    last_token: float | None = None


class Observer:
    """What the batcher reports (the Triton model turns these into metrics).  No-ops here."""

    def admitted(self, seq: Request) -> None: ...
    def token(self, seq: Request, first: bool, gap: float) -> None: ...
    def finished(self, seq: Request, generation: Generation) -> None: ...
    def failed(self, seq: Request, error: BatchError) -> None: ...
    def stepped(self, batcher: Batcher) -> None: ...


@dataclass(eq=False)
class _Row:
    seq: Request
    stream: TextStream
    rng: np.random.Generator
    slots: np.ndarray
    token: int = -1
    prefill: object = None  # the prefill generator while joining


@dataclass
class BatchStats:
    """The batcher's state after its last step (gauges) and its running totals."""

    active: int = 0
    queued: int = 0
    kv_entries: int = 0
    kv_bytes: int = 0
    most_active: int = 0
    decode_tokens: int = 0
    decode_seconds: float = 0.0


class Batcher:
    """The scheduler over one runner.  ``submit`` is thread-safe; ``step``/``run`` belong to one thread."""

    def __init__(self, runner, config: BatchConfig | None = None, observer: Observer | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.runner, self.config = runner, config or BatchConfig()
        self.observer, self.clock = observer or Observer(), clock
        self.max_rows = self.config.max_batch_size if runner.supports_batching else 1
        self.layout = runner.cache_layout()
        if self.config.kv_cache_memory_mib is not None and self.layout is None:
            raise ValueError(f"the {runner.name} backend does not report its cache layout, so kv_cache_memory_mib "
                             "cannot be enforced; leave it unset")
        self.budget = None if self.config.kv_cache_memory_mib is None else int(float(self.config.kv_cache_memory_mib) * MIB)
        self.queue: deque[Request] = deque()
        self.rows: list[_Row] = []  # running, in the state's row order
        self.joining: _Row | None = None
        self.state = None
        self.stats = BatchStats()
        self.closed = False
        self._wake = threading.Condition()
        self._polled = self._measured = float("-inf")  # when the queue was last asked, the cache last measured

    # -- requests -----------------------------------------------------------------------------
    def need(self, seq: Request) -> np.ndarray | None:
        """(layers,) the slots ``seq`` needs once running (None without a layout)."""
        if self.layout is None:
            return None
        return self.layout.slots(len(seq.ids), seq.config.max_new_tokens)

    def submit(self, seq: Request) -> None:
        """Queue a sequence; raises BatchError ("too_large" or "queue_full") instead."""
        seq.config.validate()
        if not seq.ids:
            raise BatchError("the prompt has no tokens", "invalid")
        limit = self.runner.max_context
        if len(seq.ids) + seq.config.max_new_tokens > limit:
            raise BatchError(f"{len(seq.ids)} prompt tokens and max_tokens={seq.config.max_new_tokens} exceed the model's "
                             f"context of {limit} tokens; shorten the prompt or lower max_tokens", "too_large")
        if self.budget is not None:
            alone = self.layout.batch_bytes([self.need(seq)], prefill_tokens=len(seq.ids))
            if alone > self.budget:
                raise BatchError(
                    f"this request needs {alone / MIB:.1f} MiB of KV cache ({len(seq.ids)} prompt tokens, "
                    f"{seq.config.max_new_tokens} new), more than kv_cache_memory_mib={self.config.kv_cache_memory_mib:g}; "
                    "shorten the prompt, lower max_tokens or raise kv_cache_memory_mib", "too_large")
        with self._wake:
            if self.closed:
                raise BatchError("the server is shutting down; retry on another instance", "shutdown")
            if len(self.queue) >= self.config.max_queue:
                raise BatchError(f"the queue is full ({self.config.max_queue} requests waiting); retry later", "queue_full")
            seq.arrived = self.clock()
            self.queue.append(seq)
            self._wake.notify()

    @property
    def idle(self) -> bool:
        return not (self.queue or self.rows or self.joining)

    # -- the loop -----------------------------------------------------------------------------
    def run(self, stop: threading.Event, poll: float = 0.05) -> None:
        """Step until ``stop`` is set, sleeping while there is nothing to do; then every
        sequence still held or queued is told the server is shutting down (each request gets
        its final response) and new ones are refused."""
        while not stop.is_set():
            with self._wake:
                if self.idle:
                    self._wake.wait(poll)
                    continue
            try:
                self.step()
            except Exception as err:  # noqa: BLE001  (a bug must not stop the server: fail what is held, go on)
                try:
                    self._reset(_internal(err))
                except Exception:  # noqa: BLE001, S110  (the next turn starts afresh regardless)
                    self.rows, self.joining, self.state = [], None, None
        self.close()

    def close(self) -> None:
        """Refuse new sequences; fail every one held or waiting ("shutdown")."""
        with self._wake:
            self.closed = True
            waiting, self.queue = list(self.queue), deque()
        error = BatchError("the server is shutting down; retry on another instance", "shutdown")
        self._reset(error)
        for seq in waiting:
            self._fail(_Row(seq, None, None, None), error)

    def _reset(self, error: BatchError) -> None:
        """Fail every sequence held (running or joining) and start afresh."""
        held = self.rows + ([self.joining] if self.joining is not None else [])
        self.rows, self.joining, self.state = [], None, None
        for row in held:
            self._fail(row, error)

    def wake(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def step(self) -> None:
        """One iteration: drop cancelled sequences, admit, one prefill chunk, one decode step."""
        self._drop_cancelled()
        self._admit()
        if self.joining is not None:
            self._advance_prefill()
        if self.rows:
            self._decode()
        self._report()

    def drain(self) -> None:
        """Step until every sequence submitted is finished (tests, scripts)."""
        while not self.idle:
            self.step()

    # -- parts --------------------------------------------------------------------------------
    def _fits(self, seq: Request) -> bool:
        if len(self.rows) + 1 > self.max_rows:
            return False
        if self.budget is None:
            return True
        needs = [r.slots for r in self.rows] + [self.need(seq)]
        return self.layout.batch_bytes(needs, prefill_tokens=len(seq.ids)) <= self.budget

    def _admit(self) -> None:
        if self.joining is not None:
            return
        with self._wake:
            if not self.queue or not self._fits(self.queue[0]):
                return
            seq = self.queue.popleft()
        seq.admitted = self.clock()
        need = self.need(seq)
        row = _Row(seq, TextStream(self.runner.tokenizer, seq.config, len(seq.ids), seq.on_text),
                   np.random.default_rng(seq.config.seed), need if need is not None else np.zeros(0, np.int64))
        try:
            row.prefill = self.runner.begin_prefill(seq.ids, seq.pixel_values)
        except Exception as err:  # noqa: BLE001  (reported to the request, the loop goes on)
            self._fail(row, _internal(err))
            return
        self.joining = row
        _quietly(self.observer.admitted, seq)

    def _advance_prefill(self) -> None:
        row = self.joining
        try:
            next(row.prefill)
            return
        except StopIteration as done:
            logits, state = done.value
        except Exception as err:  # noqa: BLE001
            self.joining = None
            self._fail(row, _internal(err))
            return
        self.joining = None
        if self._emit(row, logits):
            return
        if self.state is None:
            self.state = state
        else:
            try:
                merged = self.runner.merge([(self.state, range(len(self.rows))), (state, [0])])
            except Exception as err:  # noqa: BLE001  (the running rows' state is consumed too: all fail)
                self._reset(_internal(err))
                self._fail(row, _internal(err))
                return
            self.state = merged
        self.rows.append(row)

    def _emit(self, row: _Row, logits: np.ndarray) -> bool:
        """Sample the row's next token and stream it; True (and the row reported) when it is
        finished.  Any failure here fails this row only."""
        try:
            token = int(sample(logits, row.seq.config, row.rng)[0])
        except Exception as err:  # noqa: BLE001  (e.g. logits that are not finite: no distribution to sample)
            self._fail(row, _internal(err))
            return True
        now = self.clock()
        first = row.seq.first_token is None
        gap = now - (row.seq.admitted if first else row.seq.last_token)
        if first:
            row.seq.first_token = now
        row.seq.last_token = now
        held = len(row.stream.generation.token_ids)
        try:
            done = row.stream.push(token)
        except Exception as err:  # noqa: BLE001  (e.g. a client's stream that went away)
            self._fail(row, _internal(err))
            return True
        if first or len(row.stream.generation.token_ids) > held:  # an EOS ends the row without a token
            _quietly(self.observer.token, row.seq, first, gap)
        row.token = token
        if done:
            _quietly(self.observer.finished, row.seq, row.stream.generation)
            _tell(row.seq, row.stream.generation, None)
        return done

    def _decode(self) -> None:
        tokens = np.array([r.token for r in self.rows], dtype=np.int64)
        start = self.clock()
        try:
            logits, self.state = self.runner.decode(self.state, tokens)
        except Exception as err:  # noqa: BLE001  (every running row fails; the batch starts afresh)
            self._reset(_internal(err))
            return
        self.stats.decode_seconds += self.clock() - start
        self.stats.decode_tokens += len(tokens)
        keep = [i for i, row in enumerate(self.rows) if not self._emit(row, logits[i : i + 1])]
        self._keep(keep)

    def _keep(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        self.state = self.runner.merge([(self.state, keep)]) if keep else None
        self.rows = [self.rows[i] for i in keep]

    def _drop_cancelled(self) -> None:
        error = BatchError("the request was cancelled", "cancelled")
        waiting = []
        if self.clock() - self._polled >= POLL:  # waiting requests are asked less often than running ones
            self._polled = self.clock()
            with self._wake:
                snapshot = list(self.queue)
            waiting = [s for s in snapshot if _cancelled(s)]
            with self._wake:
                for seq in waiting:
                    self.queue.remove(seq)
        for seq in waiting:
            self._fail(_Row(seq, None, None, None), error)
        if self.joining is not None and _cancelled(self.joining.seq):
            row, self.joining = self.joining, None
            row.prefill.close()
            self._fail(row, error)
        gone = [i for i, row in enumerate(self.rows) if _cancelled(row.seq)]
        if gone:
            rows = [self.rows[i] for i in gone]
            self._keep([i for i in range(len(self.rows)) if i not in gone])
            for row in rows:
                self._fail(row, error)

    def _fail(self, row: _Row, error: BatchError) -> None:
        _quietly(self.observer.failed, row.seq, error)
        _tell(row.seq, None, error)

    def _report(self) -> None:
        stats = self.stats
        stats.active, stats.queued = len(self.rows), len(self.queue)
        stats.most_active = max(stats.most_active, stats.active)
        if self.state is None or not hasattr(self.runner, "layer_lengths"):
            stats.kv_entries = stats.kv_bytes = 0
        elif self.clock() - self._measured >= POLL:  # not every step: it reads every layer's slots
            self._measured = self.clock()
            stats.kv_entries = int(self.runner.layer_lengths(self.state).sum())
            stats.kv_bytes = int(self.runner.kv_bytes(self.state))
        _quietly(self.observer.stepped, self)


def _internal(err: Exception) -> BatchError:
    return BatchError(f"internal error: {type(err).__name__}: {err}", "internal")


def _quietly(report, *args) -> None:
    """An observer's call; its failure (a metric the server dropped) never fails a request."""
    try:
        report(*args)
    except Exception:  # noqa: BLE001, S110
        pass


def _tell(seq: Request, generation, error) -> None:
    if seq.on_done is not None:
        try:
            seq.on_done(generation, error)
        except Exception:  # noqa: BLE001, S110  (the client is gone; nothing more to tell it)
            pass


def _cancelled(seq: Request) -> bool:
    try:
        return bool(seq.cancelled())
    except Exception:  # noqa: BLE001  (a sender that cannot say: treat as gone)
        return True


__all__ = ["BatchConfig", "BatchError", "Batcher", "CacheLayout", "Observer", "Request"]
