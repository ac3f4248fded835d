#!/usr/bin/env python3
"""Load benchmark of prefixkv engines served by Triton: requests/s, time to first token,
inter-token latency, at several concurrencies.  A tritonclient-free driver over Triton's
``generate_stream`` (SSE) endpoint: each client thread sends streaming requests back to back.

    python scripts/load_bench.py --engine engines/smollm2-k100 --engine engines/smollm2-k20 \\
        --prompt-tokens 2048 --max-tokens 32 --concurrency 1,4,8 --output results/load_bench.json

For every engine: ``prefixkv deploy`` into a temporary repository, start tritonserver on
free loopback ports, one warm-up request, then for each concurrency C: C clients x
``--requests-per-client`` requests (default max(2, 8 // C) each), with prompts of
``--prompt-tokens`` tokens cut from the built-in evaluation text (a different passage per
request).  Or ``--url HOST:PORT`` to measure a server that is already running.

Per request: TTFT = first non-empty text piece - send; ITL = (last piece - first piece) /
(generated tokens - 1); latency = final response - send.  Per concurrency: requests/s =
requests / wall time, output tokens/s, and mean / p50 / p90 of each latency.  JSON on stdout
(and in ``--output``).  ``--ignore-eos`` is not available over the endpoint, so an engine
may stop early at EOS: generated token counts are reported.
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


def one_request(url: str, prompt: str, max_tokens: int) -> dict:
    from prefixkv.serving.client import generate_stream

    sent = time.perf_counter()
    first = last = None
    ids = []
    for event in generate_stream(url, prompt, max_tokens=max_tokens, timeout=600):
        if event.get("text_output"):
            first = first or event["_time"]
            last = event["_time"]
        if event.get("output_ids"):
            ids = event["output_ids"]
        done = event["_time"]
    n = len(ids)
    return {
        "ttft_s": None if first is None else first - sent,
        "itl_s": (last - first) / (n - 1) if first is not None and n > 1 else None,
        "latency_s": done - sent,
        "output_tokens": n,
    }


def run_level(url: str, prompts: list[str], concurrency: int, per_client: int, max_tokens: int) -> dict:
    results, errors = [], []
    lock = threading.Lock()

    def client(index: int):
        for k in range(per_client):
            prompt = prompts[(index * per_client + k) % len(prompts)]
            try:
                r = one_request(url, prompt, max_tokens)
            except Exception as err:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(repr(err))
                continue
            with lock:
                results.append(r)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = sum(r["output_tokens"] for r in results)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "errors": errors,
        "wall_s": wall,
        "requests_per_s": len(results) / wall,
        "output_tokens_per_s": tokens / wall,
        "mean_output_tokens": tokens / max(1, len(results)),
        "ttft_s": summary([r["ttft_s"] for r in results]),
        "itl_s": summary([r["itl_s"] for r in results]),
        "latency_s": summary([r["latency_s"] for r in results]),
    }


def bench_engine(engine: str | None, url: str | None, args) -> dict:
    from prefixkv.serving.client import generate

    levels = [int(c) for c in args.concurrency.split(",")]
    total = max(c * (args.requests_per_client or max(2, 8 // c)) for c in levels)
    prompts = prompts_for(engine or args.tokenizer, args.prompt_tokens, total)
    server = None
    info = {"engine": engine, "url": url}
    if engine is not None:
        from prefixkv.engine_folder import read_manifest
        from prefixkv.serving.repository import write_repository
        from prefixkv.serving.server import TritonServer

        manifest = read_manifest(engine, verify=False)
        info["keep_fraction"] = manifest["keep_fraction"]
        info["model"] = manifest["model"]["source"]
        workspace = tempfile.TemporaryDirectory(prefix="prefixkv-bench-")
        repo = Path(workspace.name) / "repo"
        write_repository(engine, repo, instances=args.instances, threads=args.threads, link=True)
        server = TritonServer(repo).start()
        info["instances"], info["threads_per_instance"] = args.instances, args.threads
    try:
        if server is not None:
            server.wait_ready(timeout=600)
            url = server.http_url
        generate(url, prompts[0], max_tokens=4, timeout=600)  # warm-up
        info["levels"] = []
        for c in levels:
            per_client = args.requests_per_client or max(2, 8 // c)
            level = run_level(url, prompts, c, per_client, args.max_tokens)
            print(f"[{Path(engine).name if engine else url}] concurrency {c}: {level['requests']} requests, "
                  f"{level['requests_per_s']:.3f} req/s, TTFT p50 {level['ttft_s']['p50']:.3f} s, "
                  f"ITL p50 {1000 * level['itl_s']['p50']:.1f} ms", file=sys.stderr, flush=True)
            info["levels"].append(level)
    finally:
        if server is not None:
            server.stop()
            workspace.cleanup()
    return info


def markdown(report: dict) -> str:
    """The results as a markdown table (for docs/serving.md)."""
    rows = ["| engine | keep fraction | concurrency | requests | requests/s | output tokens/s | TTFT p50 (s) | TTFT p90 (s) | ITL p50 (ms) | ITL p90 (ms) | latency p50 (s) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for result in report["results"]:
        name = Path(result["engine"]).name if result.get("engine") else result.get("url")
        for level in result["levels"]:
            ttft, itl, lat = level["ttft_s"] or {}, level["itl_s"] or {}, level["latency_s"] or {}
            rows.append(
                f"| {name} | {result.get('keep_fraction', '?')} | {level['concurrency']} | {level['requests']} "
                f"| {level['requests_per_s']:.3f} | {level['output_tokens_per_s']:.2f} "
                f"| {ttft.get('p50', float('nan')):.2f} | {ttft.get('p90', float('nan')):.2f} "
                f"| {1000 * itl.get('p50', float('nan')):.0f} | {1000 * itl.get('p90', float('nan')):.0f} "
                f"| {lat.get('p50', float('nan')):.2f} |"
            )
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--engine", action="append", help="engine folder (repeatable): deploy and serve it")
    target.add_argument("--url", help="HOST:PORT of a running Triton HTTP endpoint serving prefixkv_llm")
    parser.add_argument("--tokenizer", help="with --url: a folder holding tokenizer.json (e.g. the engine)")
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--requests-per-client", type=int, default=None, help="default: max(2, 8 // concurrency)")
    parser.add_argument("--instances", type=int, default=2, help="model instances of the deployed repository")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per instance")
    parser.add_argument("--output", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.url and not args.tokenizer:
        parser.error("--url needs --tokenizer (a folder with tokenizer.json) to make the prompts")

    report = {
        "command": "python scripts/load_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_average_at_start": os.getloadavg()},
        "settings": {k: v for k, v in vars(args).items() if k not in ("engine", "url")},
        "results": [bench_engine(e, None, args) for e in args.engine] if args.engine else [bench_engine(None, args.url, args)],
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
