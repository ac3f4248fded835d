"""A real Triton Inference Server serving a real engine: nothing mocked.

One server per module (the tiny random-Llama engine of tests/test_export.py, deployed with
`prefixkv deploy`, served by the tritonserver binary on free loopback ports).  Outputs are
compared with the engine's own greedy generation (``load_runner(...).generate``) and with
``prefixkv generate``.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

pytestmark = pytest.mark.serving

MAX_TOKENS = 12
PROMPTS = ["Hello world", "The capital of France is", "Once upon a time", "def add(a, b):",
           "Triton serves", "PrefixKV keeps", "A quick brown fox", "1, 2, 3, 4,"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from test_export import tiny_engine

    return tiny_engine(tmp_path_factory.getbasetemp())[0]


@pytest.fixture(scope="module")
def reference(engine):
    """Greedy generations of the engine itself, in this process, per prompt."""
    from prefixkv.engines import GenerationConfig, load_runner

    runner = load_runner(engine, threads=1)
    return {p: runner.generate(p, GenerationConfig(max_new_tokens=MAX_TOKENS))[0] for p in PROMPTS}


@pytest.fixture(scope="module")
def repository(engine, tmp_path_factory):
    from prefixkv.cli import main

    repo = tmp_path_factory.mktemp("serving") / "triton_repo"
    assert main(["deploy", str(engine), "--repository", str(repo), "--instances", "2", "--threads", "1",
                 "--max-tokens", str(MAX_TOKENS)]) == 0
    return repo


@pytest.fixture(scope="module")
def server(repository):
    from prefixkv.serving.server import TritonServer

    srv = TritonServer(repository).start()
    try:
        srv.wait_ready(timeout=180)
        yield srv
    finally:
        assert srv.stop() == 0, srv.log_tail()


def ready(srv) -> int:
    try:
        with urllib.request.urlopen(f"http://{srv.http_url}/v2/health/ready", timeout=5) as reply:
            return reply.status
    except urllib.error.HTTPError as err:
        return err.code


# -- same text as the engine -----------------------------------------------------------------
def test_generate_equals_the_engine_and_prefixkv_generate(server, reference, engine):
    from prefixkv.serving.client import generate

    for prompt in PROMPTS[:3]:
        reply = generate(server.http_url, prompt, max_tokens=MAX_TOKENS)
        assert reply["text_output"] == reference[prompt].text
        assert reply["output_ids"] == reference[prompt].token_ids
        assert reply["finish_reason"] == reference[prompt].finish_reason
    # the request's default max_tokens is the deploy's --max-tokens; parameters work like inputs
    assert generate(server.http_url, PROMPTS[0])["text_output"] == reference[PROMPTS[0]].text
    reply = generate(server.http_url, body={"text_input": PROMPTS[0], "parameters": {"max_tokens": MAX_TOKENS, "temperature": 0}})
    assert reply["text_output"] == reference[PROMPTS[0]].text

    cli = subprocess.run(
        [sys.executable, "-m", "prefixkv.cli", "generate", str(engine), "--prompt", PROMPTS[1],
         "--max-new-tokens", str(MAX_TOKENS), "--threads", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.removesuffix("\n") == generate(server.http_url, PROMPTS[1], max_tokens=MAX_TOKENS)["text_output"]


def test_generate_stream_sends_the_same_text_incrementally(server, reference):
    from prefixkv.serving.client import generate_stream

    prompt = PROMPTS[2]
    events = list(generate_stream(server.http_url, prompt, max_tokens=MAX_TOKENS))
    pieces = [e["text_output"] for e in events]
    assert len([p for p in pieces[:-1] if p]) >= 2  # several pieces before the final response
    assert "".join(pieces) == reference[prompt].text
    assert all(e["output_ids"] == [] for e in events[:-1])
    assert events[-1]["output_ids"] == reference[prompt].token_ids
    assert events[-1]["finish_reason"] == reference[prompt].finish_reason


def test_grpc_stream_and_single_response(server, reference):
    from prefixkv.serving.client import grpc_generate

    prompt = PROMPTS[3]
    streamed = grpc_generate(server.grpc_url, prompt, max_tokens=MAX_TOKENS, stream=True)
    assert [r["final"] for r in streamed] == [False] * (len(streamed) - 1) + [True]
    assert len(streamed) >= 3
    assert "".join(r["text_output"] for r in streamed) == reference[prompt].text
    assert streamed[-1]["output_ids"] == reference[prompt].token_ids
    (single,) = grpc_generate(server.grpc_url, prompt, max_tokens=MAX_TOKENS)
    assert single["text_output"] == reference[prompt].text and single["final"]


def test_stop_strings_and_chat(server, engine):
    from prefixkv.engines import GenerationConfig, load_runner
    from prefixkv.serving.client import generate

    runner = load_runner(engine, threads=1)
    full = runner.generate(PROMPTS[4], GenerationConfig(max_new_tokens=MAX_TOKENS))[0].text
    stop = full[3:5]
    expected = runner.generate(PROMPTS[4], GenerationConfig(max_new_tokens=MAX_TOKENS, stop=[stop]))[0]
    reply = generate(server.http_url, PROMPTS[4], max_tokens=MAX_TOKENS, stop=[stop])
    assert reply["text_output"] == expected.text and reply["finish_reason"] == "stop"
    chat = runner.generate(PROMPTS[5], GenerationConfig(max_new_tokens=MAX_TOKENS), chat=True)[0]
    assert generate(server.http_url, PROMPTS[5], max_tokens=MAX_TOKENS, chat=True)["text_output"] == chat.text


# -- bad requests: a clear Triton error, and the server stays healthy ---------------------------
BAD_HTTP = [
    ("missing text_input", {"max_tokens": 4}, "text_input is missing"),
    ("max_tokens as a string", {"text_input": "Hi", "max_tokens": "four"}, "Unable to parse"),
    ("stream as a string", {"text_input": "Hi", "stream": "yes"}, "Unable to parse"),
    ("negative max_tokens", {"text_input": "Hi", "max_tokens": -5}, "max_tokens must be between 1 and"),
    ("zero max_tokens", {"text_input": "Hi", "max_tokens": 0}, "max_tokens must be between 1 and"),
    ("huge max_tokens", {"text_input": "Hi", "max_tokens": 10**12}, "got 1000000000000"),
    ("prompt longer than the context", {"text_input": "x" * 600, "max_tokens": 4}, "more than the model's context"),
    ("prompt + max_tokens over the context", {"text_input": "x" * 500, "max_tokens": 100}, "lower max_tokens"),
    ("empty prompt", {"text_input": "", "max_tokens": 4}, "the prompt is empty"),
    ("blank prompt", {"text_input": "   ", "max_tokens": 4}, "the prompt is empty"),
    ("unknown top-level field", {"text_input": "Hi", "temprature": 0.5}, "unknown parameter 'temprature'"),
    ("unknown parameter", {"text_input": "Hi", "parameters": {"beam_width": 2}}, "unknown parameter 'beam_width'"),
    ("negative temperature", {"text_input": "Hi", "temperature": -1}, "temperature must be >= 0"),
    ("top_p out of range", {"text_input": "Hi", "top_p": 1.5}, "top_p must be in (0, 1]"),
    ("parameter of the wrong type", {"text_input": "Hi", "parameters": {"max_tokens": "many"}}, "Unable to parse"),
]


@pytest.mark.parametrize("body,message", [b[1:] for b in BAD_HTTP], ids=[b[0] for b in BAD_HTTP])
def test_bad_http_requests(server, body, message):
    from prefixkv.serving.client import TritonRequestError, generate

    with pytest.raises(TritonRequestError) as caught:
        generate(server.http_url, body=body)
    assert message in str(caught.value)
    assert 400 <= caught.value.status < 600
    assert ready(server) == 200


def test_bad_bytes_and_dtypes_over_http_and_grpc(server, reference):
    import numpy as np
    import tritonclient.grpc as grpcclient

    from prefixkv.serving.client import (
        TritonRequestError,
        generate,
        grpc_generate,
        grpc_inputs,
    )

    with pytest.raises(TritonRequestError, match="not valid UTF-8"):
        generate(server.http_url, body=b'{"text_input": "caf\xe9 \xff", "max_tokens": 4}')
    with pytest.raises(TritonRequestError, match="not valid UTF-8 .byte 0xff at offset 2"):
        grpc_generate(server.grpc_url, b"ok\xff\xfe", max_tokens=4)
    wrong = grpcclient.InferInput("max_tokens", [1], "FP32")
    wrong.set_data_from_numpy(np.array([4.0], dtype=np.float32))
    with pytest.raises(TritonRequestError, match="max_tokens.*FP32.*INT64"):
        grpc_generate(server.grpc_url, "Hi", inputs=[grpc_inputs("Hi")[0], wrong])
    with pytest.raises(TritonRequestError, match="max_tokens must be between"):
        grpc_generate(server.grpc_url, "Hi", max_tokens=-1)
    assert ready(server) == 200
    # and it still serves
    assert generate(server.http_url, PROMPTS[0], max_tokens=MAX_TOKENS)["text_output"] == reference[PROMPTS[0]].text


# -- concurrency ------------------------------------------------------------------------------
def test_eight_clients_five_requests_each(server, reference):
    from prefixkv.serving.client import generate

    results, errors, health = [], [], []
    stop = threading.Event()

    def client(prompt: str):
        for _ in range(5):
            try:
                results.append((prompt, generate(server.http_url, prompt, max_tokens=MAX_TOKENS, timeout=120)))
            except Exception as err:  # noqa: BLE001 - every failure is reported below
                errors.append(repr(err))

    def poll_health():
        for _ in range(2000):  # bounded
            if stop.is_set():
                return
            health.append(ready(server))
            time.sleep(0.05)

    poller = threading.Thread(target=poll_health)
    poller.start()
    clients = [threading.Thread(target=client, args=(p,)) for p in PROMPTS]
    for t in clients:
        t.start()
    for t in clients:
        t.join(timeout=300)
    stop.set()
    poller.join(timeout=30)
    assert errors == []
    assert len(results) == 40
    for prompt, reply in results:
        assert reply["text_output"] == reference[prompt].text, prompt
        assert reply["output_ids"] == reference[prompt].token_ids, prompt
    assert health and set(health) == {200}


# -- the serve command ----------------------------------------------------------------------------
def test_serve_command_starts_and_stops_on_ctrl_c(repository, reference, tmp_path):
    from prefixkv.serving.client import generate
    from prefixkv.serving.server import free_port

    http, grpc, metrics = free_port(), free_port(), free_port()
    log = tmp_path / "tritonserver.log"  # kept: a stop that overruns says why
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefixkv.cli", "serve", str(repository), "--http-port", str(http),
         "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--log-file", str(log)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        # Ctrl-C's default action even where the suite runs with SIGINT ignored (a background
        # `make test`): Python keeps an inherited SIG_IGN, and the command would never see it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        banner = ""
        for _ in range(360):  # bounded: up to ~180 s for readiness
            line = proc.stderr.readline()
            banner += line
            if "Press Ctrl-C" in line or proc.poll() is not None:
                break
        assert f"http://127.0.0.1:{http}" in banner, banner
        assert generate(f"127.0.0.1:{http}", PROMPTS[0], max_tokens=MAX_TOKENS)["text_output"] == reference[PROMPTS[0]].text
        proc.send_signal(signal.SIGINT)
        try:
            # the serve command gives Triton its 30 s exit timeout, then kills it (the known
            # shutdown hang, README), so 60 s is a bound with room, not an expected time
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rest = proc.communicate(timeout=10)[1]
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:]) if log.exists() else "(no log)"
            pytest.fail(f"serve did not exit 60 s after SIGINT; its stderr after the banner:\n{rest}\n"
                        f"the tritonserver log ends with:\n{tail}")
        assert code == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/live", timeout=2)
