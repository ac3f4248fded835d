#!/usr/bin/env python3
"""Peak memory and time of one engine prefill under each ONNX Runtime execution order, a fresh process each.

    python scripts/prefill_memory.py ENGINE [--tokens 2048] [--chunk N] [--threads 2]

Why the runner asks for the priority-based order: ONNX Runtime's default order is built
backwards from the graph's outputs, so work that no later node needs (a layer's scoring)
can run late and keep its inputs alive.  For each order, a fresh process opens the engine
with the runner's session options and that order, prefills the first ``--tokens`` tokens of
the built-in text in chunks of ``--chunk`` (default: the runner's), and prints one JSON line:
``bench.point``'s figures (prefill seconds, RSS after loading, peak RSS in bytes) with the
order.  ``prefixkv bench speed`` measures the runner's own order the same way.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ORDERS = ("DEFAULT", "PRIORITY_BASED")


def one(engine: str, tokens: int, chunk: int | None, threads: int, order: str) -> dict:
    """One prefill in this process, the runner's sessions opened with ``order``; the result
    names the orders its sessions report, so a patch that did not take shows."""
    import onnxruntime as ort

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this tree's prefixkv, not an installed copy's
    from prefixkv.bench import point
    from prefixkv.engines import onnxruntime as backend

    runner_options, open_engine, opened = backend.session_options, point.open_engine, []

    def with_order(ort_module, threads_=None):
        options = runner_options(ort_module, threads_)
        options.execution_order = getattr(ort.ExecutionOrder, order)
        return options

    def open_and_keep(*args, **kwargs):
        opened.append(open_engine(*args, **kwargs))
        return opened[-1]

    # this process measures one order: every session the runner opens gets it
    backend.session_options, point.open_engine = with_order, open_and_keep
    measured = point.measure(engine, tokens, chunk, threads, steps=0)
    if measured["tokens"] < tokens:
        raise SystemExit(f"the built-in text has {measured['tokens']} tokens, fewer than --tokens {tokens}")
    sessions = [*opened[0].sessions.values(), opened[0]._compactor]
    reported = sorted({s.get_session_options().execution_order.name for s in sessions})
    return {"execution_order": order, "session_orders": reported, **measured}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=None, help="prompt tokens per decoder run (default: the runner's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--order", choices=ORDERS, help=argparse.SUPPRESS)  # internal: one order, in this process
    args = parser.parse_args(argv)
    if args.order:
        print(json.dumps(one(args.engine, args.tokens, args.chunk, args.threads, args.order)))
        return 0
    for order in ORDERS:
        command = [sys.executable, __file__, args.engine, "--tokens", str(args.tokens), "--threads", str(args.threads),
                   "--order", order] + (["--chunk", str(args.chunk)] if args.chunk is not None else [])
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            lines = done.stderr.strip().splitlines()
            print(f"{order}: {lines[-1] if lines else f'exit {done.returncode}'}", file=sys.stderr)
            return done.returncode
        lines = done.stdout.strip().splitlines()
        if not lines:
            print(f"{order}: no result printed", file=sys.stderr)
            return 1
        print(lines[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
