#!/usr/bin/env python3
"""Peak memory and time of one prefill of an engine, in a fresh process per setting.

    python scripts/prefill_memory.py ENGINE [--tokens 2048] [--threads 2]

Runs the engine's prefill graph once per ONNX Runtime execution order (the default order
and the priority-based one prefixkv's runner uses) in its own subprocess and prints the
process's peak resident memory (``ru_maxrss``) before and after the prefill, and the
prefill's wall time.  Prompts are the built-in evaluation text.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(engine: str, tokens: int, threads: int, order: str) -> dict:
    import numpy as np
    import onnxruntime as ort

    from prefixkv.data import builtin_text
    from prefixkv.engines.onnxruntime import session_options
    from prefixkv.engine_folder import read_manifest
    from prefixkv.tokenizer import Tokenizer

    manifest = read_manifest(engine, verify=False)
    options = session_options(ort, threads)
    options.execution_order = getattr(ort.ExecutionOrder, order)
    session = ort.InferenceSession(f"{engine}/{manifest['graphs']['prefill']['file']}", options,
                                   providers=["CPUExecutionProvider"])
    ids = Tokenizer(engine).encode(builtin_text("evaluation"))[:tokens]
    if len(ids) < tokens:
        raise SystemExit(f"the built-in text has only {len(ids)} tokens")
    feeds = {"input_ids": np.array([ids], dtype=np.int64), "attention_mask": np.ones((1, tokens), dtype=np.int64)}
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start = time.perf_counter()
    session.run(None, feeds)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"execution_order": order, "tokens": tokens, "threads": threads, "rss_after_load_gib": round(loaded, 2),
            "peak_rss_gib": round(peak, 2), "prefill_s": round(seconds, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--order", help=argparse.SUPPRESS)  # internal: one setting, in this process
    args = parser.parse_args()
    if args.order:
        print(json.dumps(one(args.engine, args.tokens, args.threads, args.order)))
        return 0
    for order in ("DEFAULT", "PRIORITY_BASED"):
        done = subprocess.run([sys.executable, __file__, args.engine, "--tokens", str(args.tokens),
                               "--threads", str(args.threads), "--order", order], capture_output=True, text=True)
        if done.returncode:
            print(done.stderr, file=sys.stderr)
            return done.returncode
        print(done.stdout.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
