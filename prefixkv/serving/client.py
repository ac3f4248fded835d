"""Small clients for a served ``prefixkv_llm``: Triton's HTTP generate endpoints and gRPC streaming.

    reply = generate("127.0.0.1:8000", "Hello", max_tokens=32)          # {"text_output": ..., ...}
    for event in generate_stream("127.0.0.1:8000", "Hello", max_tokens=32):
        print(event["text_output"], end="")
    pieces = grpc_generate("127.0.0.1:8001", "Hello", max_tokens=32, stream=True)
    scrape_metrics("127.0.0.1:8002")                                      # {"prefixkv_active_sequences": 0.0, ...}

HTTP uses the standard library only; gRPC needs ``tritonclient[grpc]``, the metrics
``prometheus-client`` (its text-format parser).  Errors from the
server raise :class:`TritonRequestError` with Triton's message and the HTTP status.
"""
from __future__ import annotations

import json
import queue
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

MODEL = "prefixkv_llm"


class TritonRequestError(RuntimeError):
    """The server answered with an error (``status``: the HTTP status, None for gRPC)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def _post(url: str, body: dict | bytes, timeout: float):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        text = err.read().decode(errors="replace").strip()
        body = text[len("data:"):] if text.startswith("data:") else text  # generate_stream errors come as an SSE event
        try:
            message = json.loads(body).get("error", text)
        except (json.JSONDecodeError, AttributeError):
            message = text
        raise TritonRequestError(message, err.code) from None


def request_body(prompt: str, max_tokens: int | None = None, **fields) -> dict:
    """A generate-endpoint body: the prompt plus any model inputs given (None values left out)."""
    body = {"text_input": prompt}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    body.update({k: v for k, v in fields.items() if v is not None})
    return body


def generate(http_url: str, prompt: str | None = None, max_tokens: int | None = None, model: str = MODEL,
             timeout: float = 300.0, body: dict | bytes | None = None, **fields) -> dict:
    """POST /v2/models/MODEL/generate; the reply's JSON (text_output, output_ids, finish_reason)."""
    body = request_body(prompt, max_tokens, **fields) if body is None else body
    with _post(f"http://{http_url}/v2/models/{model}/generate", body, timeout) as reply:
        return json.loads(reply.read())


def generate_stream(http_url: str, prompt: str | None = None, max_tokens: int | None = None, model: str = MODEL,
                    timeout: float = 300.0, body: dict | bytes | None = None, **fields) -> Iterator[dict]:
    """POST /v2/models/MODEL/generate_stream with ``stream: true``; yields each SSE event's JSON
    with ``_time`` (time.perf_counter() at arrival) added.  An error event raises."""
    if body is None:
        body = request_body(prompt, max_tokens, stream=True, **fields)
    with _post(f"http://{http_url}/v2/models/{model}/generate_stream", body, timeout) as reply:
        for raw in reply:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue
            event = json.loads(line[len("data:"):])
            if "error" in event:
                raise TritonRequestError(event["error"], reply.status)
            event["_time"] = time.perf_counter()
            yield event


def grpc_inputs(prompt: str | bytes, max_tokens: int | None = None, stream: bool = False, **fields):
    """tritonclient.grpc InferInputs for the model's inputs (dtypes as in config.pbtxt);
    ``image``: the encoded bytes of one image file, or a list of them (vision engines)."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    dtypes = {"max_tokens": ("INT64", np.int64), "temperature": ("FP32", np.float32), "top_p": ("FP32", np.float32),
              "top_k": ("INT64", np.int64), "seed": ("UINT64", np.uint64), "stream": ("BOOL", np.bool_),
              "chat": ("BOOL", np.bool_)}
    text = prompt if isinstance(prompt, bytes) else prompt.encode("utf-8")
    values = {"max_tokens": max_tokens, "stream": stream, **fields}
    made = grpcclient.InferInput("text_input", [1], "BYTES")
    made.set_data_from_numpy(np.array([text], dtype=np.object_))
    inputs = [made]
    for name, value in values.items():
        if value is None:
            continue
        if name == "stop":
            items = [value] if isinstance(value, str) else list(value)
            tensor = grpcclient.InferInput("stop", [len(items)], "BYTES")
            tensor.set_data_from_numpy(np.array([s.encode() for s in items], dtype=np.object_))
        elif name == "image":  # vision engines: encoded image file(s), one per <image>
            items = [value] if isinstance(value, (bytes, bytearray)) else list(value)
            tensor = grpcclient.InferInput("image", [len(items)], "BYTES")
            tensor.set_data_from_numpy(np.array([bytes(x) for x in items], dtype=np.object_))
        else:
            triton_type, np_type = dtypes[name]
            tensor = grpcclient.InferInput(name, [1], triton_type)
            tensor.set_data_from_numpy(np.array([value], dtype=np_type))
        inputs.append(tensor)
    return inputs


def grpc_generate(grpc_url: str, prompt: str | bytes, max_tokens: int | None = None, stream: bool = False,
                  model: str = MODEL, timeout: float = 300.0, inputs=None, **fields) -> list[dict]:
    """One request over a gRPC bidirectional stream (the way decoupled models are called).

    Returns one dict per response: text_output (str), output_ids (list), finish_reason,
    final (bool), _time.  A Triton error raises TritonRequestError.
    """
    import tritonclient.grpc as grpcclient

    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(grpc_url)
    responses = []
    try:
        client.start_stream(callback=lambda result, error: results.put((result, error, time.perf_counter())))
        client.async_stream_infer(model, inputs or grpc_inputs(prompt, max_tokens, stream, **fields),
                                  enable_empty_final_response=True)
        deadline = time.monotonic() + timeout
        while True:
            result, error, arrived = results.get(timeout=max(0.1, deadline - time.monotonic()))
            if error is not None:
                raise TritonRequestError(str(error.message() if hasattr(error, "message") else error))
            reply = result.get_response()
            final = reply.parameters["triton_final_response"].bool_param if "triton_final_response" in reply.parameters else True
            item = {"final": final, "_time": arrived}
            text = result.as_numpy("text_output")
            if text is not None:
                item["text_output"] = text.reshape(-1)[0].decode("utf-8")
                item["output_ids"] = result.as_numpy("output_ids").reshape(-1).tolist()
                reason = result.as_numpy("finish_reason")
                if reason is not None:
                    item["finish_reason"] = reason.reshape(-1)[0].decode()
            responses.append(item)
            if final:
                return responses
    finally:
        client.stop_stream(cancel_requests=False)
        client.close()


def scrape_metrics(metrics_url: str, prefix: str = "prefixkv_", timeout: float = 10.0) -> dict[str, float]:
    """The metrics endpoint's samples whose name starts with ``prefix``: {'name{label="v"}': value},
    without the ``model`` / ``version`` labels (samples that differ only by them are summed)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{metrics_url}/metrics", timeout=timeout) as reply:
        text = reply.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.startswith(prefix):
                continue
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()) if k not in ("model", "version"))
            key = f"{sample.name}{{{labels}}}" if labels else sample.name
            out[key] = out.get(key, 0.0) + sample.value
    return out
