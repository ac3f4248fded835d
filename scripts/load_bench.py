#!/usr/bin/env python3
"""Load benchmark of prefixkv engines served by Triton (in-flight batching): requests/s,
output and decode tokens/s, TTFT, ITL, queue wait, sequences at once, server peak RSS.

    python scripts/load_bench.py --engine engines/smollm2-k100 --engine engines/smollm2-k20 \\
        --prompt-tokens 2048 --max-tokens 128 --concurrency 1,4,8,16 --max-batch-size 16 \\
        --kv-cache-memory-mib 440 --output results/load_bench.json [--route openai]

For every engine: ``prefixkv deploy`` into a temporary repository (one instance), start
tritonserver on free loopback ports (and with ``--route openai`` the OpenAI front end, driven
by the official ``openai`` client), one warm-up request, then for each concurrency C: the
same ``--requests`` prompts (``--prompt-tokens`` tokens each, cut from the built-in
evaluation text, a different passage per request) sent by C clients that take the next
prompt when their previous request is done.  Greedy; ``--ignore-eos`` is not available over
the endpoint, so a request may stop early at EOS (generated token counts are reported).

Per request (client side): TTFT = first text piece - send; ITL = (last piece - first piece) /
(pieces - 1); latency.  Per level: requests/s and output tokens/s over the wall time; decode
tokens/s = the model's decode-step tokens / decode-step seconds (its metrics
``prefixkv_decode_tokens_total`` / ``prefixkv_decode_seconds_total``: prefill excluded);
mean queue wait (``prefixkv_queue_wait_seconds``); the most sequences active at once (the
``prefixkv_active_sequences`` gauge, polled every 0.1 s); the server's peak RSS (tritonserver
and its Python stub, polled); failures; and whether every output equals the same prompt's
output at concurrency 1 (run one at a time).  JSON on stdout (and in ``--output``), a table
on stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path


def percentile(values, q):
    values = sorted(values)
    if not values:
        return None
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summary(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "p50": percentile(values, 0.5), "p90": percentile(values, 0.9)}


def prompts_for(engine: str, tokens: int, count: int) -> list[str]:
    from prefixkv.data import builtin_samples
    from prefixkv.tokenizer import Tokenizer

    tokenizer = Tokenizer(engine)
    return [s["prompt"] for s in builtin_samples(tokenizer, "evaluation", n=count, tokens=tokens, reference_tokens=0)]


def one_request(target: dict, prompt: str, max_tokens: int) -> dict:
    sent = time.perf_counter()
    times, ids, text = [], None, []
    if target["route"] == "openai":
        import openai

        client = openai.OpenAI(base_url=target["openai_url"], api_key="none", max_retries=0, timeout=1800)
        stream = client.completions.create(model="prefixkv_llm", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True})
        tokens = 0
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                times.append(time.perf_counter())
                text.append(chunk.choices[0].text)
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        output = "".join(text)
    else:
        from prefixkv.serving.client import grpc_generate

        for event in grpc_generate(target["grpc_url"], prompt, max_tokens=max_tokens, stream=True, timeout=1800):
            if event.get("text_output"):
                times.append(event["_time"])
                text.append(event["text_output"])
            if event.get("final"):
                ids = event.get("output_ids")
        tokens, output = len(ids or []), "".join(text)
    done = time.perf_counter()
    return {
        "ttft_s": times[0] - sent if times else None,
        "itl_s": (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None,
        "latency_s": done - sent,
        "output_tokens": tokens,
        "output": output,
    }


def scrape(target: dict) -> dict[str, float]:
    from prefixkv.serving.client import scrape_metrics

    return scrape_metrics(target["metrics_url"])


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            status = (entry / "status").read_text()
        except OSError:
            continue
        children.setdefault(int(stat[1]), []).append(int(entry.name))
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss[int(entry.name)] = int(line.split()[1]) * 1024
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo += children.get(p, [])
    return total


def run_level(target: dict, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    results, errors = {}, []
    lock = threading.Lock()
    pending = list(range(len(prompts)))
    peak = {"active": 0, "rss": 0}
    stop = threading.Event()

    def monitor():
        while not stop.is_set():
            try:
                peak["active"] = max(peak["active"], int(scrape(target).get("prefixkv_active_sequences", 0)))
                if target.get("pid"):
                    peak["rss"] = max(peak["rss"], tree_rss(target["pid"]))
            except OSError:
                pass
            stop.wait(0.1)

    def client():
        while True:
            with lock:
                if not pending:
                    return
                index = pending.pop(0)
            try:
                r = one_request(target, prompts[index], max_tokens)
            except Exception as err:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(repr(err))
                continue
            with lock:
                results[index] = r

    before = scrape(target)
    watcher = threading.Thread(target=monitor, daemon=True)
    watcher.start()
    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    stop.set()
    watcher.join()
    after = scrape(target)

    def grew(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    done = list(results.values())
    tokens = sum(r["output_tokens"] for r in done)
    waits = grew("prefixkv_queue_wait_seconds_count")
    return {
        "concurrency": concurrency,
        "requests": len(done),
        "errors": errors,
        "failed_requests": {k.split('"')[1]: grew(k) for k in after if k.startswith("prefixkv_request_failures_total{") and grew(k)},
        "wall_s": wall,
        "requests_per_s": len(done) / wall,
        "output_tokens_per_s": tokens / wall,
        "decode_tokens_per_s": grew("prefixkv_decode_tokens_total") / max(grew("prefixkv_decode_seconds_total"), 1e-9),
        "mean_output_tokens": tokens / max(1, len(done)),
        "ttft_s": summary([r["ttft_s"] for r in done]),
        "itl_s": summary([r["itl_s"] for r in done]),
        "latency_s": summary([r["latency_s"] for r in done]),
        "queue_wait_mean_s": grew("prefixkv_queue_wait_seconds_sum") / waits if waits else None,
        "most_active_sequences": peak["active"],
        "server_peak_rss_mib": peak["rss"] / 2**20 if peak["rss"] else None,
        "outputs": [results[i]["output"] if i in results else None for i in range(len(prompts))],
    }


def admitted(engine: str, prompt_tokens: int, max_tokens: int, budget_mib: float | None, rows: int) -> int:
    """Sequences of that size the model admits at once under the budget (its own rule)."""
    from prefixkv.defaults import CACHE_SLACK
    from prefixkv.engine_folder import read_manifest
    from prefixkv.engines.batching import MIB, CacheLayout

    layout = CacheLayout.from_manifest(read_manifest(engine, verify=False), CACHE_SLACK)
    need = layout.slots(prompt_tokens, max_tokens)
    k = 0
    while k < rows and (budget_mib is None or layout.batch_bytes([need] * (k + 1), prefill_tokens=prompt_tokens) <= budget_mib * MIB):
        k += 1
    return k


def bench_engine(engine: str, args) -> dict:
    from prefixkv.engine_folder import read_manifest
    from prefixkv.serving.repository import ModelSettings, write_repository
    from prefixkv.serving.server import TritonServer

    levels = [int(c) for c in args.concurrency.split(",")]
    prompts = prompts_for(engine, args.prompt_tokens, args.requests)
    manifest = read_manifest(engine, verify=False)
    info = {"engine": engine, "keep_fraction": manifest["keep_fraction"], "model": manifest["model"]["source"],
            "route": args.route, "threads": args.threads, "max_batch_size": args.max_batch_size,
            "kv_cache_memory_mib": args.kv_cache_memory_mib,
            "admits_at_once": admitted(engine, args.prompt_tokens, args.max_tokens, args.kv_cache_memory_mib, args.max_batch_size)}
    workspace = tempfile.TemporaryDirectory(prefix="prefixkv-bench-")
    repo = Path(workspace.name) / "repo"
    settings = ModelSettings(instances=1, threads=args.threads, max_batch_size=args.max_batch_size,
                             kv_cache_memory_mib=args.kv_cache_memory_mib, max_queue=max(256, args.requests))
    write_repository(engine, repo, settings, link=True)
    server, front = TritonServer(repo).start(), None
    try:
        server.wait_ready(timeout=600)
        target = {"route": args.route, "grpc_url": server.grpc_url, "pid": server.process.pid,
                  "metrics_url": f"{server.host}:{server.metrics_port}"}
        if args.route == "openai":
            from prefixkv.serving.openai import FrontEnd, OpenAIConfig
            from prefixkv.serving.server import free_port

            front = FrontEnd(OpenAIConfig(grpc_url=server.grpc_url, engine_dir=engine), port=free_port()).start()
            target["openai_url"] = front.url
        one_request(target, prompts[0], 4)  # warm-up
        info["levels"] = []
        for c in levels:
            level = run_level(target, prompts, c, args.max_tokens)
            print(f"[{Path(engine).name}] concurrency {c}: {level['requests']} requests, {level['requests_per_s']:.3f} req/s, "
                  f"decode {level['decode_tokens_per_s']:.1f} tok/s, at once {level['most_active_sequences']}",
                  file=sys.stderr, flush=True)
            info["levels"].append(level)
        first = info["levels"][0]["outputs"] if levels[0] == 1 else None
        for level in info["levels"]:
            level["identical_to_concurrency_1"] = None if first is None else level["outputs"] == first
    finally:
        if front is not None:
            front.stop()
        server.stop()
        workspace.cleanup()
    return info


def markdown(report: dict) -> str:
    """The results as a markdown table (for the README)."""
    rows = ["| keep | route | concurrency | requests | req/s | output tok/s | decode tok/s | TTFT p50 / p90 (s) "
            "| ITL p50 / p90 (ms) | queue wait mean (s) | at once | server peak RSS (MiB) | failed | same as C=1 |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    nan = float("nan")
    for result in report["results"]:
        for level in result["levels"]:
            ttft, itl = level["ttft_s"] or {}, level["itl_s"] or {}
            wait = level["queue_wait_mean_s"]
            rows.append(
                f"| {result['keep_fraction']} | {result['route']} | {level['concurrency']} | {level['requests']} "
                f"| {level['requests_per_s']:.3f} | {level['output_tokens_per_s']:.1f} | {level['decode_tokens_per_s']:.1f} "
                f"| {ttft.get('p50', nan):.1f} / {ttft.get('p90', nan):.1f} "
                f"| {1000 * itl.get('p50', nan):.0f} / {1000 * itl.get('p90', nan):.0f} "
                f"| {nan if wait is None else wait:.1f} | {level['most_active_sequences']} "
                f"| {level['server_peak_rss_mib'] or nan:.0f} | {sum(level['failed_requests'].values()) + len(level['errors']):.0f} "
                f"| {level['identical_to_concurrency_1']} |"
            )
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", action="append", required=True, help="engine folder (repeatable): deploy and serve it")
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", default="1,4,8,16", help="client counts; start with 1 (the outputs are compared with it)")
    parser.add_argument("--requests", type=int, default=16, help="requests per level (the same prompts at every level)")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--kv-cache-memory-mib", type=float, default=None)
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of the one instance")
    parser.add_argument("--route", choices=("triton", "openai"), default="triton",
                        help="triton: the model's streaming gRPC call; openai: the OpenAI front end, official client")
    parser.add_argument("--output", help="also write the JSON here")
    args = parser.parse_args(argv)
    report = {
        "command": "python scripts/load_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()},
        "settings": {k: v for k, v in vars(args).items() if k != "engine"},
        "results": [bench_engine(e, args) for e in args.engine],
    }
    text = json.dumps(report, indent=2)
    print(text)
    print(markdown(report), file=sys.stderr)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
