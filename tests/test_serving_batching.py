"""Serving v2 on a real Triton server on loopback (nothing mocked): in-flight batching in
prefixkv_llm (outputs, speed against sequential, the queue, cancellation), the LLM metrics,
the OpenAI-compatible front end through the official ``openai`` client, and the lifecycle
of ``prefixkv serve`` (signals, busy ports, bad repositories)."""
from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from pathlib import Path

import pytest

pytestmark = pytest.mark.serving

MAX_TOKENS = 40
PROMPTS = ["Hello world", "The capital of France is", "Once upon a time", "def add(a, b):"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from test_export import tiny_engine

    return tiny_engine(tmp_path_factory.getbasetemp())[0]


@pytest.fixture(scope="module")
def reference(engine):
    from prefixkv.engines import GenerationConfig, load_runner

    runner = load_runner(engine, threads=1)
    return {p: runner.generate(p, GenerationConfig(max_new_tokens=MAX_TOKENS, ignore_eos=False))[0] for p in PROMPTS}


@pytest.fixture(scope="module")
def repository(engine, tmp_path_factory):
    from prefixkv.cli import main

    repo = tmp_path_factory.mktemp("serving-v2") / "triton_repo"
    assert main(["deploy", str(engine), "--repository", str(repo), "--instances", "1", "--threads", "1",
                 "--max-tokens", str(MAX_TOKENS), "--max-batch-size", "4", "--max-queue", "4"]) == 0
    return repo


UNLOAD_HANG = "Exit timeout expired"


@pytest.fixture(scope="module")
def server(repository):
    from prefixkv.serving.server import TritonServer

    srv = TritonServer(repository, log_file=repository.parent / "tritonserver.log").start()
    try:
        srv.wait_ready(timeout=180)
        yield srv
    finally:
        code = srv.stop()
        log = srv.log_tail(400)
        if code != 0 and UNLOAD_HANG in log and "Found 0 model versions that have in-flight inferences" in log:
            # a known defect, open (README, "Serving"): now and then the model stays live at unload
            # although every request was answered; the stubs' stacks are in the log
            stacks = log[log.find("prefixkv: tritonserver has not exited"):] if "prefixkv: tritonserver" in log else log[-3000:]
            warnings.warn(f"tritonserver did not unload prefixkv_llm within its exit timeout (known, open):\n{stacks[:6000]}",
                          stacklevel=1)
        else:
            assert code == 0, f"tritonserver exited with {code}:\n{srv.log_tail(60)}"


@pytest.fixture(scope="module")
def openai_url(server, repository):
    from prefixkv.serving.openai import FrontEnd, OpenAIConfig
    from prefixkv.serving.server import free_port

    front = FrontEnd(OpenAIConfig(grpc_url=server.grpc_url, engine_dir=repository / "prefixkv_llm" / "1" / "engine"),
                     port=free_port()).start()
    try:
        yield front.url
    finally:
        front.stop()


def metrics(server) -> dict[str, float]:
    from prefixkv.serving.client import scrape_metrics

    return scrape_metrics(f"{server.host}:{server.metrics_port}")


def run_all(fn, items) -> list:
    results = [None] * len(items)

    def one(i):
        results[i] = fn(items[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results


# -- in-flight batching ----------------------------------------------------------------------------
def test_concurrent_requests_equal_their_sequential_runs_and_finish_sooner(server, reference):
    from prefixkv.serving.client import grpc_generate

    def ask(prompt):
        return grpc_generate(server.grpc_url, prompt, max_tokens=MAX_TOKENS)[-1]

    ask(PROMPTS[0])  # warm
    alone = concurrent = math.inf
    for _ in range(2):  # the best of two of each: a fraction of a second, so one stall must not decide it
        start = time.perf_counter()
        sequential = [ask(p) for p in PROMPTS]
        alone = min(alone, time.perf_counter() - start)
        start = time.perf_counter()
        together = run_all(ask, PROMPTS)
        concurrent = min(concurrent, time.perf_counter() - start)
    for prompt, a, b in zip(PROMPTS, sequential, together):
        assert a["output_ids"] == b["output_ids"] == reference[prompt].token_ids, prompt
        assert b["text_output"] == reference[prompt].text
    assert concurrent < 0.85 * alone, (concurrent, alone)


def test_the_queue_when_the_pool_is_full(server, reference):
    from prefixkv.serving.client import TritonRequestError, grpc_generate

    long = [p for p in PROMPTS if reference[p].finish_reason == "length"]  # no early EOS: rows stay busy

    def ask(prompt):  # 4 rows, 4 waiting: of 12 at once, some are refused with the queue message
        try:
            return grpc_generate(server.grpc_url, prompt, max_tokens=400)[-1]
        except TritonRequestError as err:
            return str(err)

    before = metrics(server)
    prompts = (long * 12)[:12]
    replies = run_all(ask, prompts)
    refused = [r for r in replies if isinstance(r, str)]
    served = [(p, r) for p, r in zip(prompts, replies) if not isinstance(r, str)]
    assert refused and all("queue is full" in r for r in refused), refused
    assert len(served) >= 5 and len(served) + len(refused) == 12  # at least the rows and the queue
    by_prompt = {}
    for p, r in served:  # every served copy of a prompt has the same greedy output
        assert by_prompt.setdefault(p, r["output_ids"]) == r["output_ids"]
    after = metrics(server)
    key = 'prefixkv_request_failures_total{reason="queue_full"}'
    assert after[key] - before.get(key, 0) == len(refused)


def test_a_cancelled_stream_frees_its_row(server):
    import tritonclient.grpc as grpcclient

    from prefixkv.serving.client import grpc_inputs

    before = metrics(server)
    pieces = []
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: pieces.append((result, error)))
    client.async_stream_infer("prefixkv_llm", grpc_inputs(PROMPTS[2], max_tokens=400, stream=True))
    for _ in range(200):
        if pieces:
            break
        time.sleep(0.02)
    client.stop_stream(cancel_requests=True)
    client.close()
    key = 'prefixkv_request_failures_total{reason="cancelled"}'
    for _ in range(100):
        after = metrics(server)
        # the gauges are set one after another, not at once: wait for all of them
        if (after.get(key, 0) > before.get(key, 0) and after["prefixkv_active_sequences"] == 0
                and after["prefixkv_kv_cache_bytes"] == 0):
            break
        time.sleep(0.1)
    assert after[key] == before.get(key, 0) + 1
    assert after["prefixkv_active_sequences"] == 0 and after["prefixkv_kv_cache_bytes"] == 0, after


def test_metrics_after_real_requests(server, reference):
    from prefixkv.serving.client import TritonRequestError, grpc_generate

    before = metrics(server)
    replies = run_all(lambda p: grpc_generate(server.grpc_url, p, max_tokens=MAX_TOKENS)[-1], PROMPTS)
    with pytest.raises(TritonRequestError):
        grpc_generate(server.grpc_url, "Hi", max_tokens=0)
    after = metrics(server)

    def grew(name):
        return after[name] - before.get(name, 0)

    assert grew("prefixkv_generated_tokens_total") == sum(len(r["output_ids"]) for r in replies)
    assert grew("prefixkv_prompt_tokens_total") == sum(reference[p].prompt_tokens for p in PROMPTS)
    assert grew('prefixkv_request_failures_total{reason="invalid"}') == 1
    assert grew("prefixkv_time_to_first_token_seconds_count") == len(PROMPTS)
    assert grew("prefixkv_queue_wait_seconds_count") == len(PROMPTS)
    assert grew("prefixkv_inter_token_latency_seconds_count") == sum(len(r["output_ids"]) - 1 for r in replies)
    assert after["prefixkv_time_to_first_token_seconds_sum"] > before.get("prefixkv_time_to_first_token_seconds_sum", 0)
    for gauge in ("prefixkv_active_sequences", "prefixkv_queued_requests", "prefixkv_kv_cache_entries", "prefixkv_kv_cache_bytes"):
        assert after[gauge] == 0, gauge  # all finished


def test_the_model_config_tells_the_engines_numbers(server, engine):
    import json

    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/prefixkv_llm/config", timeout=10) as reply:
        params = {k: v["string_value"] for k, v in json.loads(reply.read())["parameters"].items()}
    manifest = json.loads((engine / "manifest.json").read_text())
    assert float(params["keep_fraction"]) == manifest["keep_fraction"]
    assert int(params["max_context"]) == manifest["max_context"]
    assert len(params["layer_capacities"].split(",")) == manifest["layers"]
    assert params["max_batch_size"] == "4"


# -- the OpenAI-compatible API -----------------------------------------------------------------------
def test_openai_completions_and_chat(openai_url, reference, engine):
    import openai

    from prefixkv.tokenizer import Tokenizer

    client = openai.OpenAI(base_url=openai_url, api_key="none")
    assert [m.id for m in client.models.list().data] == ["prefixkv_llm"]
    assert client.models.retrieve("prefixkv_llm").id == "prefixkv_llm"
    prompt = PROMPTS[1]
    done = client.completions.create(model="prefixkv_llm", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    assert done.choices[0].text == reference[prompt].text
    assert done.usage.prompt_tokens == reference[prompt].prompt_tokens
    assert done.usage.completion_tokens == len(reference[prompt].token_ids)
    assert done.choices[0].finish_reason in ("length", "stop")
    stream = client.completions.create(model="prefixkv_llm", prompt=prompt, max_tokens=MAX_TOKENS, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reference[prompt].text
    assert chunks[-1].usage.completion_tokens == len(reference[prompt].token_ids)
    # chat: the engine's chat template over the whole conversation
    tokenizer = Tokenizer(engine)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    from prefixkv.engines import GenerationConfig, load_runner

    runner = load_runner(engine, threads=1)
    want = runner.generate_ids([tokenizer.encode(tokenizer.apply_chat_template(messages))],
                               GenerationConfig(max_new_tokens=12))[0]
    chat = client.chat.completions.create(model="prefixkv_llm", messages=messages, max_tokens=12)
    assert chat.choices[0].message.content == want.text and chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == want.prompt_tokens
    streamed = client.chat.completions.create(model="prefixkv_llm", messages=messages, max_tokens=12, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == want.text


def test_openai_errors(openai_url):
    import openai

    client = openai.OpenAI(base_url=openai_url, api_key="none", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="Hi")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    with pytest.raises(openai.BadRequestError, match="seed"):
        client.completions.create(model="prefixkv_llm", prompt="Hi", seed=2**70)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="prefixkv_llm", prompt="Hi", max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="n"):
        client.completions.create(model="prefixkv_llm", prompt="Hi", n=2)
    with pytest.raises(openai.BadRequestError, match="prompt is empty"):  # the model's own message
        client.completions.create(model="prefixkv_llm", prompt="   ")
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="prefixkv_llm", messages=[])
    request = urllib.request.Request(openai_url + "/completions", data=b"{not json", method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 400 and b'"invalid_request_error"' in err.value.read()


# -- prefixkv serve: signals, ports, bad repositories ----------------------------------------------
def _children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_serve_stops_everything_on_a_signal(repository, sig, tmp_path):
    from prefixkv.serving.server import free_port

    http, grpc, metrics_port, openai_port = (free_port() for _ in range(4))
    env = dict(os.environ, TMPDIR=str(tmp_path))
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefixkv.cli", "serve", str(repository), "--http-port", str(http), "--grpc-port", str(grpc),
         "--metrics-port", str(metrics_port), "--openai-port", str(openai_port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        banner = ""
        for _ in range(400):
            line = proc.stderr.readline()
            banner += line
            if "Press Ctrl-C" in line or proc.poll() is not None:
                break
        assert f"http://127.0.0.1:{openai_port}/v1" in banner, banner
        with urllib.request.urlopen(f"http://127.0.0.1:{openai_port}/v1/models", timeout=10) as reply:
            assert reply.status == 200
        triton = [p for p in _children_of(proc.pid)]
        assert triton and list(tmp_path.glob("prefixkv-*"))  # tritonserver runs; its temp folders exist
        stubs = [c for p in triton for c in _children_of(p)]
        proc.send_signal(sig)
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    time.sleep(0.5)
    assert not [p for p in triton + stubs if _alive(p)]
    assert list(tmp_path.glob("prefixkv-*")) == []  # workspace and log folders removed
    for port in (http, grpc, openai_port):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))  # free again (nothing listens)


def _serve_error(args) -> str:
    proc = subprocess.run([sys.executable, "-m", "prefixkv.cli", "serve", *map(str, args)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    return lines[0]


def test_serve_refuses_a_busy_port_a_missing_repository_and_a_tampered_engine(repository, tmp_path):
    import shutil

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        http = _serve_error([repository, "--http-port", port])  # each call is a fresh process (seconds)
        assert "in use" in http and "--http-port" in http
        assert "--openai-port" in _serve_error([repository, "--openai-port", port])
    assert "no model repository" in _serve_error([tmp_path / "nowhere"])
    copy = tmp_path / "repo"
    shutil.copytree(repository, copy, symlinks=True)
    engine_copy = copy / "prefixkv_llm" / "1" / "engine"
    (engine_copy / "tokenizer.json").write_text("{}")
    tampered = _serve_error([copy])
    assert "rebuild" in tampered or "modified" in tampered
