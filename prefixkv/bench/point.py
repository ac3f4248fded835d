"""One measurement in a fresh process: its peak RSS is its own, and no other engine shares its time.

    python -m prefixkv.bench.point ENGINE_DIR CONTEXT [--chunk N] [--threads T] [--steps S] [--no-huge-pages]
    python -m prefixkv.bench.point torch:MODEL CONTEXT [--threads T]
    python -m prefixkv.bench.point genai:FOLDER CONTEXT [--threads T] [--steps S]

Prints one JSON line: prefill seconds, peak RSS (the process's high-water mark, ``VmHWM``
on Linux), RSS after loading (before the text is read; for an engine also its anonymous part,
without the weights' file-backed pages) and, for an engine, the median decode
step after the prefill (as many steps as fit the engine's context: none after a prompt
of the whole context), and the median of ONNX Runtime's own decoder run within it (the rest
is the runner's Python, binding the step's small inputs and outputs, and a layer's
occasional buffer compaction).  ``torch:MODEL`` is
the plain PyTorch prefill ``model(ids)`` with SDPA attention (it holds every position's
logits, as ``transformers`` computes them); ``genai:FOLDER`` an onnxruntime-genai model's
prefill and decode steps (its own full cache).  An engine's point also gives the bytes its
runner moved into huge pages (``huge_page_bytes``, ``engines.pages``; 0 with ``--no-huge-pages``).
The prompt is the first CONTEXT tokens of the built-in text.  ``speed.point`` runs this for
``bench speed``'s prefill points and its weight-precision decode points.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time


def rss_bytes(field: str = "VmRSS") -> int:
    """The resident set size now (Linux /proc; 0 elsewhere).  ``field="RssAnon"``: its anonymous
    part, without the file-backed pages (memory-mapped weights the kernel can drop and re-read)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss_bytes() -> int:
    """The process's resident high-water mark.  Linux: ``VmHWM``, which starts afresh at exec;
    ``getrusage``'s ``ru_maxrss`` does not, so a point started by a large parent (``bench
    speed``, holding the model and its engines) read the parent's RSS at the fork."""
    hwm = rss_bytes("VmHWM")
    if hwm:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def prompt_text() -> str:
    """The text the prompts are cut from (read after the RSS after loading: it is not the model's)."""
    from ..data import builtin_text

    return builtin_text("evaluation") + "\n\n" + builtin_text("calibration")


def prompt_ids(tokenizer, context: int) -> list[int]:
    """The first ``context`` tokens of the built-in text, by ``tokenizer`` (prefixkv's ``Tokenizer``)."""
    return tokenizer.encode(prompt_text())[:context]


def open_engine(target: str, threads: int, chunk: int | None = None, huge_pages: bool = True):
    """An engine folder's ONNX Runtime runner as every point runs it: ``threads`` intra-op
    threads, the files not hashed (the point measures the run, not the check), its weights in
    huge pages where the OS allows unless ``huge_pages`` is False (``engines.pages``)."""
    from ..engines.onnxruntime import OnnxRuntimeRunner

    return OnnxRuntimeRunner(target, threads=threads, verify=False, prefill_chunk=chunk, huge_pages=huge_pages)


def measure(target: str, context: int, chunk: int | None, threads: int, steps: int, huge_pages: bool = True) -> dict:
    if target.startswith("genai:"):
        return measure_genai(target.split(":", 1)[1], context, threads, steps)
    if target.startswith("torch:"):
        import torch

        from ..models import load_model

        torch.set_num_threads(threads)
        model, tokenizer = load_model(target.split(":", 1)[1], attention="sdpa")
        loaded = rss_bytes()
        ids = list(tokenizer(prompt_text(), add_special_tokens=False)["input_ids"])[:context]
        with torch.no_grad():
            start = time.perf_counter()
            model(torch.tensor([ids]))
            prefill = time.perf_counter() - start
        return {"prefill_s": prefill, "rss_after_load": loaded, "peak_rss": peak_rss_bytes(), "tokens": len(ids)}
    runner = open_engine(target, threads, chunk, huge_pages)
    loaded, anonymous = rss_bytes(), rss_bytes("RssAnon")
    ids = prompt_ids(runner.tokenizer, context)
    start = time.perf_counter()
    logits, state = runner.prefill(*runner.pad([ids]))
    prefill = time.perf_counter() - start
    peak = peak_rss_bytes()
    times, runs = [], []
    steps = max(0, min(steps, runner.max_context - len(ids)))  # no token past the engine's context
    for _ in range(steps):
        token = logits.argmax(-1)
        start = time.perf_counter()
        logits, state = runner.decode(state, token)
        times.append(time.perf_counter() - start)
        runs.append(runner.run_seconds)
    return {"prefill_s": prefill, "rss_after_load": loaded, "rss_anon_after_load": anonymous, "peak_rss": peak,
            "tokens": len(ids), "chunk": runner.prefill_chunk, "decode_steps": steps, "decode_ms_per_token": statistics.median(times) * 1e3 if times else None,
            "decode_run_ms_per_token": statistics.median(runs) * 1e3 if runs else None,
            "huge_page_bytes": runner.huge_page_bytes}


def load_genai(folder, threads: int | None):
    """(the onnxruntime_genai module, its model of ``folder``) on ``threads`` intra-op threads.
    Without a thread count onnxruntime-genai 0.18 ran one thread here (35 ms per step where
    2 threads took 22), so a comparison with an engine must give both the same count."""
    from ..optional import optional_import

    og = optional_import("onnxruntime_genai", "pip install onnxruntime-genai")
    config = og.Config(str(folder))
    if threads:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads,
                                                                             "inter_op_num_threads": 1}}}}))
    return og, og.Model(config)


def genai_generator(og, model, ids: list[int], steps: int):
    """An onnxruntime-genai greedy generator for the prompt ``ids``, with room for ``steps`` new tokens."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + steps + 1, do_sample=False)
    return og.Generator(model, params)


def genai_generate(og, model, ids: list[int], steps: int, warmup: int = 0) -> tuple[float, list[float]]:
    """Greedy generation with an onnxruntime-genai model: (the prompt's seconds, the seconds of
    each of ``steps`` decode steps after ``warmup`` untimed ones)."""
    generator = genai_generator(og, model, ids, warmup + steps)
    start = time.perf_counter()
    generator.append_tokens([ids])
    prefill = time.perf_counter() - start
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        generator.generate_next_token()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return prefill, times


def measure_genai(folder: str, context: int, threads: int, steps: int) -> dict:
    """An onnxruntime-genai model folder (its model builder's output): the prefill and the median
    decode step of greedy generation, on ``threads`` intra-op threads (CPU)."""
    from ..tokenizer import Tokenizer

    og, model = load_genai(folder, threads)
    loaded = rss_bytes()
    ids = prompt_ids(Tokenizer(folder), context)
    prefill, times = genai_generate(og, model, ids, steps)
    return {"prefill_s": prefill, "rss_after_load": loaded, "peak_rss": peak_rss_bytes(), "tokens": len(ids),
            "decode_ms_per_token": statistics.median(times) * 1e3 if times else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m prefixkv.bench.point", description=__doc__.splitlines()[0])
    p.add_argument("target", help="an engine folder, torch:MODEL or genai:FOLDER (an onnxruntime-genai model)")
    p.add_argument("context", type=int)
    p.add_argument("--chunk", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--no-huge-pages", dest="huge_pages", action="store_false",
                   help="an engine's weights stay in the OS's small pages (engines.pages)")
    args = p.parse_args(argv)
    print(json.dumps(measure(args.target, args.context, args.chunk, args.threads, args.steps, args.huge_pages)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
