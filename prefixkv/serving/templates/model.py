"""prefixkv_llm: a Triton Python-backend model that owns one prefixkv engine.

Written by ``prefixkv deploy`` into ``<repository>/prefixkv_llm/<version>/model.py``, next to

    engine/      the engine folder (copied or linked); its manifest is checked at load
    prefixkv/    the prefixkv runtime this repository was written with (vendored)

It runs in-flight batching over the PrefixKV-compressed caches, tokenisation and the chat
template included: ``execute`` checks each request and queues it; one scheduler thread per
instance (``prefixkv.engines.batching.Batcher``) admits queued requests by KV memory
(parameters ``max_batch_size``, ``kv_cache_memory_mib``, ``max_queue``), prefills each in
chunks between the running rows' decode steps, and sends the responses.  Decoupled: a
request with ``stream`` true gets one response per new piece of text and a final one;
otherwise a single response.  A cancelled request (the client went away) frees its row.
The LLM metrics (``Metrics``) are Triton custom metrics on the server's metrics endpoint.

Inputs (tensors, or the same names as request parameters, e.g. the ``parameters`` object
of Triton's generate endpoint; a tensor wins over a parameter):

    text_input  STRING [1]   the prompt (required, UTF-8)
    max_tokens  INT64  [1]   new tokens to generate (default: config parameter default_max_tokens)
    temperature FP32   [1]   0 (default) = greedy
    top_p       FP32   [1]   nucleus sampling (default 1)
    top_k       INT64  [1]   0 (default) = off
    seed        UINT64 [1]   sampling seed
    stop        STRING [-1]  stop strings (the text ends before the first one)
    stream      BOOL   [1]   stream text pieces (needs a streaming client: generate_stream, gRPC stream)
    chat        BOOL   [1]   wrap the prompt in the model's chat template (default: config parameter chat)
    image       BYTES  [-1]  vision engines: one encoded image (PNG, JPEG, ...) per ``<image>`` in the prompt

Outputs: ``text_output`` (generated text only, never the prompt), ``output_ids`` (the
generated token ids) and ``finish_reason`` ("length", "eos" or "stop").  While streaming,
each intermediate response carries one new piece of text and no ids; the final response
carries any text not yet sent and all the generated ids.

Run-time imports are numpy, onnxruntime, tokenizers and jinja2 only: the Python backend
stub embeds its own libpython, under which transformers (through ``ssl``) or torch may not
import.  The vendored ``prefixkv`` package holds the runtime modules only and imports
neither (its ``__init__`` is lazy): see ``_import_runtime``.

The three stages are kept apart (``Preprocessor``: request -> token ids; the batcher:
ids -> ids; ``Postprocessor``: ids -> outputs), so splitting this model
into a TensorRT-LLM-style ensemble (preprocessing -> engine -> postprocessing) only moves
these classes into their own models.
"""
from __future__ import annotations

import contextlib
import faulthandler
import json
import math
import signal
import sys
import threading
import traceback
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

MODEL_INPUTS = ("text_input", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "chat", "image")
PARAMETERS = MODEL_INPUTS[1:-1]  # allowed as request parameters too (not the image bytes)
RESERVED_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end", "priority", "timeout", "headers")


class RequestError(ValueError):
    """A request the model refuses, with a message for the client."""


def _import_runtime(version_dir: Path):
    """Import the vendored prefixkv runtime (``version_dir/prefixkv``) as the package itself.

    Its ``__init__`` is lazy and the runtime modules import numpy, onnxruntime, tokenizers,
    jinja2 (and Pillow for images) only, so this works under the stub's own libpython.
    """
    source = version_dir / "prefixkv"
    if not (source / "engines" / "base.py").is_file():
        raise RuntimeError(f"{source} does not hold the prefixkv runtime; re-run `prefixkv deploy`")
    if str(version_dir) not in sys.path:
        sys.path.insert(0, str(version_dir))
    from prefixkv.engines import load_runner

    return load_runner


def _error(message: str, kind: str = "INVALID_ARG") -> pb_utils.TritonError:
    code = getattr(pb_utils.TritonError, kind, None)
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


class Preprocessor:
    """Request -> (prompt ids, GenerationConfig, stream).  Validates every field."""

    def __init__(self, runner, generation_config_cls, prompt_error_cls, default_max_tokens: int, chat: bool,
                 image_request=None, image_error_cls=None):
        self.runner = runner
        self.image_request, self.ImageError = image_request, image_error_cls
        self.GenerationConfig = generation_config_cls
        self.PromptError = prompt_error_cls
        self.default_max_tokens = default_max_tokens
        self.default_chat = chat

    def __call__(self, request):
        """-> (prompt ids, GenerationConfig, stream, pixel values or None)."""
        values = self._parameters(request)
        for name in MODEL_INPUTS:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                values[name] = tensor.as_numpy()
        if "text_input" not in values:
            raise RequestError("text_input is missing: send the prompt as text_input")
        prompt = self._text(values.pop("text_input"))
        max_tokens = self._int(values, "max_tokens", self.default_max_tokens)
        limit = self.runner.max_context
        if max_tokens < 1 or max_tokens > limit:
            raise RequestError(f"max_tokens must be between 1 and the model's context of {limit}, got {max_tokens}")
        seed = self._int(values, "seed", None)
        if seed is not None and seed < 0:
            raise RequestError(f"seed must be a non-negative integer, got {seed}")
        config = self.GenerationConfig(
            max_new_tokens=max_tokens,
            temperature=self._float(values, "temperature", 0.0),
            top_p=self._float(values, "top_p", 1.0),
            top_k=self._int(values, "top_k", 0),
            seed=seed,
            stop=self._stops(values.get("stop")),
        )
        try:
            config.validate()
        except ValueError as err:  # its messages name max_new_tokens; the request field is max_tokens
            raise RequestError(str(err).replace("max_new_tokens", "max_tokens")) from err
        chat = self._bool(values, "chat", self.default_chat)
        if values.get("image") is not None:
            if self.image_request is None:
                raise RequestError("this model serves a text-only engine; it takes no image: drop the image input, "
                                   "or deploy an engine built with `prefixkv build`")
            try:
                ids, pixels = self.image_request(self.runner, prompt, values["image"], chat, max_tokens)
            except (self.ImageError, self.PromptError) as err:
                raise RequestError(str(err).replace("max_new_tokens", "max_tokens")) from err
            return ids, config, self._bool(values, "stream", False), pixels
        try:
            ids = self.runner.encode_prompt(prompt, chat=chat, max_new_tokens=max_tokens)
        except self.PromptError as err:
            message = str(err).replace("new tokens were asked for", "new tokens (max_tokens) were asked for")
            raise RequestError(message.replace("max_new_tokens", "max_tokens")) from err
        except ValueError as err:  # e.g. chat asked of a model without a chat template
            raise RequestError(str(err)) from err
        return ids, config, self._bool(values, "stream", False), None

    # -- fields ------------------------------------------------------------------------
    @staticmethod
    def _parameters(request) -> dict:
        raw = request.parameters()
        params = json.loads(raw) if isinstance(raw, str) and raw else dict(raw or {})
        unknown = sorted(k for k in params if k not in PARAMETERS and k not in RESERVED_PARAMETERS and not k.startswith("triton_"))
        if unknown:
            raise RequestError(
                f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(repr(k) for k in unknown)}; "
                f"this model takes text_input and {', '.join(PARAMETERS)}"
            )
        return {k: v for k, v in params.items() if k in PARAMETERS}

    @staticmethod
    def _scalar(values: dict, name: str):
        value = values.get(name)
        if isinstance(value, np.ndarray):
            if value.size != 1:
                raise RequestError(f"{name} must hold exactly one value, got shape {list(value.shape)}")
            value = value.reshape(-1)[0]
            value = value.item() if isinstance(value, np.generic) else value
        return value

    def _text(self, value) -> str:
        value = self._scalar({"text_input": value}, "text_input")
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as err:
                raise RequestError(f"text_input is not valid UTF-8 (byte 0x{value[err.start]:02x} at offset {err.start}); send UTF-8 text") from None
        if not isinstance(value, str):
            raise RequestError(f"text_input must be a string, got {type(value).__name__}")
        return value

    def _int(self, values, name, default):
        value = self._scalar(values, name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
            raise RequestError(f"{name} must be an integer, got {value!r}")
        return int(value)

    def _float(self, values, name, default):
        value = self._scalar(values, name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RequestError(f"{name} must be a finite number, got {value!r}")
        return float(value)

    def _bool(self, values, name, default):
        value = self._scalar(values, name)
        if value is None:
            return default
        if not isinstance(value, (bool, np.bool_)):
            raise RequestError(f"{name} must be true or false, got {value!r}")
        return bool(value)

    def _stops(self, value) -> list[str]:
        if value is None:
            return []
        items = value.reshape(-1).tolist() if isinstance(value, np.ndarray) else [value]
        stops = []
        for item in items:
            if isinstance(item, bytes):
                try:
                    item = item.decode("utf-8")
                except UnicodeDecodeError:
                    raise RequestError("stop holds bytes that are not valid UTF-8") from None
            if not isinstance(item, str):
                raise RequestError(f"stop must be a string or a list of strings, got {item!r}")
            if item:
                stops.append(item)
        return stops


class Postprocessor:
    """Generated text / ids -> Triton responses."""

    @staticmethod
    def response(text: str, ids, finish_reason: str | None = None) -> pb_utils.InferenceResponse:
        tensors = [
            pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
            pb_utils.Tensor("output_ids", np.asarray(list(ids), dtype=np.int64)),
        ]
        if finish_reason is not None:
            tensors.append(pb_utils.Tensor("finish_reason", np.array([finish_reason.encode()], dtype=np.object_)))
        return pb_utils.InferenceResponse(output_tensors=tensors)


# -- metrics -------------------------------------------------------------------------------------
SECONDS_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]
FAILURE_REASONS = ("invalid", "too_large", "queue_full", "cancelled", "shutdown", "internal")


class Metrics:
    """The model's LLM metrics, as Triton custom metrics (on the server's metrics endpoint).
    An observer of the batcher (``prefixkv.engines.batching.Observer``'s methods)."""

    def __init__(self, labels: dict):
        M = pb_utils.MetricFamily
        self._families = []  # a family must outlive its metrics

        def metric(name, description, kind, **extra):
            family = M(name=name, description=description, kind=kind)
            self._families.append(family)
            return family.Metric(labels=dict(labels, **extra.pop("more", {})), **extra)

        self.prompt_tokens = metric("prefixkv_prompt_tokens_total", "Prompt tokens of requests admitted", M.COUNTER)
        self.generated_tokens = metric("prefixkv_generated_tokens_total", "Tokens generated", M.COUNTER)
        self.decode_tokens = metric("prefixkv_decode_tokens_total", "Tokens made by decode steps (prefill excluded)", M.COUNTER)
        self.decode_seconds = metric("prefixkv_decode_seconds_total", "Seconds spent in decode steps", M.COUNTER)
        family = M(name="prefixkv_request_failures_total", description="Failed requests, by reason", kind=M.COUNTER)
        self._families.append(family)
        self.failures = {r: family.Metric(labels=dict(labels, reason=r)) for r in FAILURE_REASONS}
        self.ttft = metric("prefixkv_time_to_first_token_seconds", "Time from arrival to the first token", M.HISTOGRAM,
                           buckets=SECONDS_BUCKETS)
        self.itl = metric("prefixkv_inter_token_latency_seconds", "Time between a sequence's tokens", M.HISTOGRAM,
                          buckets=SECONDS_BUCKETS)
        self.queue_wait = metric("prefixkv_queue_wait_seconds", "Time from arrival to admission", M.HISTOGRAM,
                                 buckets=SECONDS_BUCKETS)
        self.gauges = {  # set in this order: a scrape that reads no active sequence reads their KV freed
            "kv_entries": metric("prefixkv_kv_cache_entries", "KV entries held, all layers and rows", M.GAUGE),
            "kv_bytes": metric("prefixkv_kv_cache_bytes", "Bytes of KV buffers allocated", M.GAUGE),
            "active": metric("prefixkv_active_sequences", "Sequences in the running batch", M.GAUGE),
            "queued": metric("prefixkv_queued_requests", "Requests waiting for a row", M.GAUGE),
        }
        self._last = {}

    def fail(self, reason: str) -> None:
        self.failures.get(reason, self.failures["internal"]).increment(1)

    # the batcher's observer
    def admitted(self, seq) -> None:
        self.prompt_tokens.increment(len(seq.ids))
        self.queue_wait.observe(max(seq.admitted - seq.arrived, 0.0))

    def token(self, seq, first: bool, gap: float) -> None:
        if first:
            self.ttft.observe(max(seq.first_token - seq.arrived, 0.0))
        else:
            self.itl.observe(max(gap, 0.0))

    def finished(self, seq, generation) -> None:
        self.generated_tokens.increment(len(generation.token_ids))

    def failed(self, seq, error) -> None:
        self.fail(error.reason)

    def stepped(self, batcher) -> None:
        stats, done = batcher.stats, self._last.get("decode", (0, 0.0))
        if (stats.decode_tokens, stats.decode_seconds) != done:
            self.decode_tokens.increment(stats.decode_tokens - done[0])
            self.decode_seconds.increment(stats.decode_seconds - done[1])
            self._last["decode"] = (stats.decode_tokens, stats.decode_seconds)
        for name, gauge in self.gauges.items():
            value = getattr(batcher.stats, name)
            if self._last.get(name) != value:
                gauge.set(value)
                self._last[name] = value


# finalize waits this long for the batcher loop, well inside Triton's exit timeout (30 s by default)
FINALIZE_JOIN = 10.0


class TritonPythonModel:
    def initialize(self, args):
        self.logger = pb_utils.Logger
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise RuntimeError("prefixkv_llm must be decoupled (model_transaction_policy { decoupled: true })")
        # SIGUSR1 writes every thread's Python stack to the server's log (what `TritonServer.stop`
        # asks for when Triton has not exited in time)
        with contextlib.suppress(Exception):  # not every platform has SIGUSR1
            faulthandler.register(signal.SIGUSR1, all_threads=True)
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / str(args["model_version"])
        engine_dir = version_dir / params.get("engine_dir", "engine")
        threads = int(params["threads"]) if params.get("threads") else None
        backend = params.get("backend", "auto")

        load_runner = _import_runtime(version_dir)
        from prefixkv.engines.base import GenerationConfig, PromptError
        from prefixkv.engines.batching import BatchConfig, Batcher, BatchError, Request
        from prefixkv.vision import is_vision_engine

        # the loaders check the engine folder's manifest (files, hashes, format) and
        # refuse a folder they cannot serve, with the reason, so the model fails to load
        image_request = image_error = None
        self.runner = load_runner(engine_dir.resolve(), backend=backend, threads=threads,
                                  allow_failed_validation=params.get("allow_failed_validation", "false").lower() == "true")
        if is_vision_engine(engine_dir):  # an image input: Pillow is imported only when one comes
            from prefixkv.vision.data import ImageError
            from prefixkv.vision.serving import image_request

            image_error = ImageError
        self.preprocess = Preprocessor(
            self.runner,
            GenerationConfig,
            PromptError,
            default_max_tokens=int(params.get("default_max_tokens", "64")),
            chat=params.get("chat", "false").lower() == "true",
            image_request=image_request,
            image_error_cls=image_error,
        )
        budget = params.get("kv_cache_memory_mib") or None
        batch = BatchConfig(max_batch_size=int(params.get("max_batch_size") or 8),
                            kv_cache_memory_mib=None if budget is None else float(budget),
                            max_queue=int(params.get("max_queue") or 256))
        self.metrics = Metrics({"model": args["model_name"], "version": str(args["model_version"])})
        self.Request, self.BatchError = Request, BatchError
        self.batcher = Batcher(self.runner, batch, observer=self.metrics)
        self.stop = threading.Event()
        self.loop = threading.Thread(target=self.batcher.run, args=(self.stop,), name="prefixkv-batcher", daemon=True)
        self.loop.start()
        self.logger.log_info(
            f"prefixkv_llm: {backend} engine {engine_dir.resolve()} loaded (context {self.runner.max_context}, "
            f"threads {threads or 'default'}, up to {self.batcher.max_rows} sequences at once, KV budget "
            f"{'none' if budget is None else budget + ' MiB'}, queue {batch.max_queue})"
        )

    def execute(self, requests):
        """Each request is checked and queued; the batcher's thread sends its responses."""
        for request in requests:
            try:
                self._submit(request)
            except Exception as err:  # execute must not raise: the stub would close every sender of the batch
                self.logger.log_error(f"prefixkv_llm: a request could not be answered: {type(err).__name__}: {err}")
        return None

    def _submit(self, request):
        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            ids, config, stream, pixels = self.preprocess(request)
        except RequestError as err:
            self.metrics.fail("invalid")
            sender.send(pb_utils.InferenceResponse(error=_error(str(err))), flags=final)
            return
        except Exception as err:  # never let one request take the instance down
            self.metrics.fail("internal")
            self.logger.log_error(f"prefixkv_llm: request failed:\n{traceback.format_exc()}")
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"internal error: {type(err).__name__}: {err}")), flags=final)
            return
        streamed: list[str] = []

        def on_text(piece: str) -> None:
            if stream:
                sender.send(Postprocessor.response(piece, ()))
                streamed.append(piece)

        def on_done(generation, error) -> None:
            try:
                if error is None:
                    rest = generation.text[len("".join(streamed)) :] if stream else generation.text
                    sender.send(Postprocessor.response(rest, generation.token_ids, generation.finish_reason), flags=final)
                elif error.reason == "cancelled":
                    sender.send(flags=final)
                elif error.reason in ("internal", "shutdown"):
                    if error.reason == "internal":
                        self.logger.log_error(f"prefixkv_llm: request failed: {error}")
                    kind = "INTERNAL" if error.reason == "internal" else "UNAVAILABLE"
                    sender.send(pb_utils.InferenceResponse(error=_error(str(error), kind)), flags=final)
                else:
                    sender.send(pb_utils.InferenceResponse(error=_error(str(error))), flags=final)
            except Exception as err:  # the request's last response did not go out: say so in the log
                self.logger.log_error(f"prefixkv_llm: the final response could not be sent "
                                      f"({error.reason if error else 'finished'}): {type(err).__name__}: {err}")

        try:
            self.batcher.submit(self.Request(ids, config, on_text=on_text, on_done=on_done,
                                             cancelled=sender.is_cancelled, pixel_values=pixels))
        except self.BatchError as err:
            self.metrics.fail(err.reason)
            sender.send(pb_utils.InferenceResponse(error=_error(str(err))), flags=final)

    def finalize(self):
        """The loop stops and answers every request it still holds or queues ("shutting down")."""
        self.logger.log_info("prefixkv_llm: finalize: stopping the batcher loop")
        self.stop.set()
        self.batcher.wake()
        self.loop.join(timeout=FINALIZE_JOIN)
        if self.loop.is_alive():  # log where it is stuck; the thread is a daemon, so the stub still exits
            frame = sys._current_frames().get(self.loop.ident)
            where = "".join(traceback.format_stack(frame)) if frame is not None else "(no frame)"
            self.logger.log_error(f"prefixkv_llm: the batcher loop did not stop in {FINALIZE_JOIN:g}s; it is at:\n{where}")
        self.runner = None
        self.logger.log_info("prefixkv_llm: finalize: done")
