"""Two decoders in one process, their decode steps interleaved: a paired measurement.

    python -m prefixkv.bench.paired A B CONTEXT [--blocks N] [--block-steps S] [--threads T] [--genai-huge-pages]

A and B are engine folders, ``genai:FOLDER`` (an onnxruntime-genai model) or
``genai-graph:FOLDER`` (that model's graph run from Python the way the engine runner runs
its decoder, ``prefixkv.bench.genai_graph``: the graph without genai's C++ loop).  Both prefill
the first CONTEXT tokens of the built-in text, then decode greedily in blocks of S steps,
A's block and B's in turn (A first in even blocks, B first in odd ones).  CONTEXT may be
comma-separated counts ("1024,900,700,500"): a batch of rows, each the first that many
tokens, prefilled and decoded together, as in-flight batching runs rows of different
lengths (engines only).  The first step of
a block is not timed: the other decoder's ONNX Runtime threads may still be spinning from
its block, and on a 2-core machine they take a core from that step.  The other S - 1 steps
run back to back, as a decode loop does.  A pair of blocks gives one ratio, A's median step
over B's, and the median of those ratios is the figure (``ratio``, with its quartiles).
Where A is an engine or ``genai-graph``, ``run_ratio`` does the same with A's ONNX Runtime
run alone (its graph, without the Python around it) against B's run, or against B's whole
step where B is ``genai`` (its loop around the run is its own C++): how much of the
difference is in the graphs.

Why: a shared machine's speed drifts over minutes, on this project's CI-like machine by
more than the differences to be measured (``docs/engine_v2.md`` has the figures), so two decoders
measured one after the other, even in rounds of fresh processes, compare two spells of
the machine.  Here the two see the same spell within a second of each other.  Run A
against itself to see what is left of the noise (``bench speed`` does, as
``paired_noise``).  Prints one JSON line.

One process is not enough for a figure: something fixed for the whole process (the cause is
not known) moved a decoder's step by up to 5 % (the keep-1 engine against itself at 4096
tokens: 0.947x to 1.007x over five processes, each with quartiles about 1 % wide), and which
decoder loaded first moved it too.  ``bench speed`` therefore runs each pair in several
processes (1, or an even count so that both orders weigh the same), the other decoder first in
every other one (``PairPlan.processes``), turns the reversed ones round (``reversed_pair``) and
reports the median of the processes' ratios (``combine``).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass

from ..engine_folder import EngineError
from .point import genai_generator, load_genai, open_engine, prompt_ids


GENAI_PREFIXES = ("genai:", "genai-graph:")  # onnxruntime-genai's model, with its own loop or with the Python one


class PlanError(ValueError):
    """A paired point that cannot be measured as asked (its blocks, context or threads)."""


def loaded_in_huge_pages(load):
    """``load()``'s result, the memory it left resident collapsed into 2 MiB pages as the
    engine runner collapses its sessions' (``engines.pages``): an onnxruntime-genai decoder on
    the engine's footing, which genai does not do itself."""
    from ..engines import pages

    before = pages.before_loading()
    loaded = load()
    pages.after_loading(before)
    return loaded


def decoder_steps(target: str, context: int | list[int], threads: int, steps: int, genai_huge_pages: bool = False):
    """A function running one greedy decode step of ``target`` after its prefill of the
    first ``context`` tokens of the built-in text (a list: one row per count, decoded as one
    batch); ``steps``: how many it will be asked for.  It returns the seconds of the ONNX
    Runtime run within the step (an engine, ``genai-graph``), or None (``genai``: its loop is
    its own).  ``genai_huge_pages``: a genai model's loaded memory in huge pages too
    (``loaded_in_huge_pages``); an engine's always is, where the OS allows."""
    load = loaded_in_huge_pages if genai_huge_pages else (lambda loader: loader())
    rows = _rows(context)
    if target.startswith(GENAI_PREFIXES):  # one row (``measure`` refuses more before anything loads)
        from ..tokenizer import Tokenizer

        kind, folder = target.split(":", 1)
        ids = prompt_ids(Tokenizer(folder), rows[0])
        if kind == "genai-graph":
            from .genai_graph import GenaiGraphLoop

            loop = load(lambda: GenaiGraphLoop(folder, threads))
            try:
                held = [loop.prefill(ids, steps)]
            except ValueError as err:  # the prompt and its steps past the model's context
                raise PlanError(f"{target}: {err}") from None

            def graph_step() -> float:
                held[0] = loop.decode(held[0].argmax(-1))
                return loop.run_seconds

            return graph_step
        og, model = load(lambda: load_genai(folder, threads))
        generator = genai_generator(og, model, ids, steps)
        generator.append_tokens([ids])
        return generator.generate_next_token  # returns None: no run of ours to report
    runner = open_engine(target, threads)
    prompts = [prompt_ids(runner.tokenizer, n) for n in rows]
    if max(map(len, prompts)) + steps > runner.max_context:
        raise PlanError(f"{max(rows)} prompt tokens and {steps} steps exceed {target}'s context of {runner.max_context}")
    held = list(runner.prefill(*runner.pad(prompts)))  # [logits, state]

    def step() -> float:
        held[0], held[1] = runner.decode(held[1], held[0].argmax(-1))
        return runner.run_seconds

    return step


def _rows(context: int | list[int]) -> list[int]:
    """The prompt tokens of each row: ``context`` as one row, or its list."""
    return [context] if isinstance(context, int) else list(context)


def parse_context(text: str) -> int | list[int]:
    """CONTEXT on the command line: "1024" -> 1024, "1024,900" -> [1024, 900]."""
    try:
        rows = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"CONTEXT must be a token count or comma-separated counts, got {text!r}") from None
    return rows[0] if len(rows) == 1 else rows


def check_blocks(blocks: int, block_steps: int) -> None:
    """The plan's one rule: at least 1 block, of at least 2 steps (a block's first is not timed)."""
    if blocks < 1 or block_steps < 2:
        raise PlanError(f"need at least 1 block of at least 2 steps (the first is not timed), got {blocks} of {block_steps}")


def check_processes(processes: int) -> None:
    """1 process, or an even count: then both load orders weigh the same in the median."""
    if processes < 1 or (processes > 1 and processes % 2):
        raise PlanError(f"need 1 process or an even count (half of them load the second decoder first), got {processes}")


@dataclass(frozen=True)
class PairPlan:
    """How ``bench speed`` measures a pair: ``processes`` fresh processes (the second decoder
    loaded first in every other one), each interleaving ``blocks`` blocks of ``block_steps``
    steps of both decoders on ``threads`` intra-op threads."""

    threads: int = 2
    blocks: int = 12
    block_steps: int = 8
    processes: int = 2

    def __post_init__(self):
        check_blocks(self.blocks, self.block_steps)
        if self.threads < 1:
            raise PlanError(f"need at least 1 thread, got {self.threads}")
        check_processes(self.processes)

    def arguments(self) -> list[str]:
        """The ``python -m prefixkv.bench.paired`` options of one process."""
        return ["--threads", str(self.threads), "--blocks", str(self.blocks), "--block-steps", str(self.block_steps)]


def interleave(step_a, step_b, blocks: int, block_steps: int, clock=time.perf_counter) -> tuple[list, list, list, list]:
    """Blocks of ``block_steps`` calls of ``step_a`` and of ``step_b`` in turn, A first in
    even blocks and B first in odd ones -> (A's blocks, B's blocks, A's runs, B's runs): per
    block the seconds of each call but the first (untimed), and what those calls returned
    (an engine's run within the step, or None)."""
    check_blocks(blocks, block_steps)
    timed, returned = {"a": [], "b": []}, {"a": [], "b": []}
    for block in range(blocks):
        order = (("a", step_a), ("b", step_b)) if block % 2 == 0 else (("b", step_b), ("a", step_a))
        for name, step in order:
            step()  # untimed: the other decoder's threads may still spin
            seconds, runs = [], []
            for _ in range(block_steps - 1):
                start = clock()
                runs.append(step())
                seconds.append(clock() - start)
            timed[name].append(seconds)
            returned[name].append(runs)
    return timed["a"], timed["b"], returned["a"], returned["b"]


def _ratios(a_blocks: list, b_blocks: list, key: str) -> dict:
    """Per pair of blocks A's median over B's -> those ratios, their median (``key``) and its quartiles."""
    ratios = [statistics.median(a) / statistics.median(b) for a, b in zip(a_blocks, b_blocks)]
    quartiles = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [ratios[0]] * 3
    return {f"{key}s": ratios, key: statistics.median(ratios), f"{key}_quartiles": [quartiles[0], quartiles[2]]}


def summarize(a_blocks: list, b_blocks: list, a_runs: list | None = None, b_runs: list | None = None) -> dict:
    """The paired figures: each decoder's median step (ms, over all its timed steps), the
    per-block ratios (A's median step in a block over B's in the same block), their median
    (``ratio``) and quartiles; where ``a_runs`` holds A's runs within its steps (an engine),
    A's median run and the same figures for A's run over B's run (``b_runs``; B's step where
    B gave none: ``run_ratio``)."""
    out = {"a_ms_per_token": statistics.median(t for block in a_blocks for t in block) * 1e3,
           "b_ms_per_token": statistics.median(t for block in b_blocks for t in block) * 1e3,
           **_ratios(a_blocks, b_blocks, "ratio"), "blocks": len(a_blocks), "block_steps": len(a_blocks[0]) + 1}
    if _given(a_runs):
        out["a_run_ms_per_token"] = statistics.median(r for block in a_runs for r in block) * 1e3
        if _given(b_runs):
            out["b_run_ms_per_token"] = statistics.median(r for block in b_runs for r in block) * 1e3
        out.update(_ratios(a_runs, b_runs if _given(b_runs) else b_blocks, "run_ratio"))
    return out


SWAPPED = (("a", "b"), ("a_ms_per_token", "b_ms_per_token"), ("a_run_ms_per_token", "b_run_ms_per_token"))


def reversed_pair(measured: dict) -> dict:
    """A measurement of (B, A) told as one of (A, B): the names and each decoder's medians
    swapped, every ratio inverted, its quartiles too (the median of an even number of
    per-block ratios inverts to within their middle two).  The run ratio is kept only where
    both decoders gave their runs: against genai's whole step it would turn into a step
    over a run."""
    out = dict(measured)
    if not ("a_run_ms_per_token" in measured and "b_run_ms_per_token" in measured):
        for key in ("a_run_ms_per_token", "b_run_ms_per_token", "run_ratio", "run_ratios", "run_ratio_quartiles"):
            out.pop(key, None)
    for x, y in SWAPPED:
        if x in out:
            out[x], out[y] = out[y], out[x]
    for key in ("ratio", "run_ratio"):
        if key in out:
            low, high = out[f"{key}_quartiles"]
            out.update({key: 1 / out[key], f"{key}s": [1 / r for r in out[f"{key}s"]], f"{key}_quartiles": [1 / high, 1 / low]})
    return out


def balanced_ratio(ratios: list[float], swapped: list[bool]) -> dict:
    """The order-balanced ratio: the geometric mean of the two load orders' geometric means of
    the processes' ratios (each order weighs half, and a load order's effect e, which moves
    one order's ratios by e and the other's by 1 / e, cancels), with its 95 % bootstrap
    interval, each order's processes resampled within that order (``balanced_interval``; none
    with fewer than 2 processes in an order).  {} with one order only."""
    orders = [[math.log(r) for r, s in zip(ratios, swapped) if s == order] for order in (False, True)]
    if not all(orders):
        return {}

    def balanced(groups) -> float:
        return math.exp(sum(statistics.fmean(g) for g in groups) / len(groups))

    if min(map(len, orders)) < 2:
        return {"balanced_ratio": balanced(orders)}
    from .stats import stratified_bootstrap_ci

    interval = stratified_bootstrap_ci(orders, balanced)
    return {"balanced_ratio": interval.value, "balanced_interval": [interval.low, interval.high]}


def combine(processes: list[dict]) -> dict:
    """One pair's measurements in several processes, each told as (A, B) (``reversed_pair``
    for those that loaded B first; ``swapped`` says which) -> the pair's figure: the median
    of the processes' ratios (``ratio``), each process's (``process_ratios``) and their range,
    the order-balanced ratio and its interval (``balanced_ratio``: the figure a load order's
    effect cannot move, from processes in both orders),
    the medians of the decoders' steps and, where processes gave one, of the run ratios
    (``run_ratio_swapped`` says which processes gave them: against ``genai:``, whose loop gives
    no runs, only those that loaded A first, one order, unlike ``ratio``).  A failed process is
    kept under ``errors``; with none measured, the first error stands."""
    measured = [m for m in processes if "ratio" in m]
    errors = [m["error"] for m in processes if "ratio" not in m]
    if not measured:
        return {"error": errors[0] if errors else "no process ran", "errors": errors}
    ratios, swapped = [m["ratio"] for m in measured], [bool(m.get("swapped")) for m in measured]
    out = {"a": measured[0].get("a"), "b": measured[0].get("b"), "ratio": statistics.median(ratios),
           "process_ratios": ratios, "ratio_range": [min(ratios), max(ratios)], **balanced_ratio(ratios, swapped),
           "swapped": swapped, "blocks": measured[0]["blocks"],
           "a_ms_per_token": statistics.median(m["a_ms_per_token"] for m in measured),
           "b_ms_per_token": statistics.median(m["b_ms_per_token"] for m in measured), "processes": processes}
    runs = [m for m in measured if "run_ratio" in m]
    if runs:  # against genai's whole step only the processes that loaded A first give one
        out.update({"run_ratio": statistics.median(m["run_ratio"] for m in runs), "run_ratio_processes": len(runs),
                    "run_ratio_swapped": [bool(m.get("swapped")) for m in runs]})
    if errors:
        out["errors"] = errors
    return out


def _given(runs: list | None) -> bool:
    """Whether every timed step of a decoder returned its run (an engine's do, genai's do not)."""
    return bool(runs) and all(r is not None for block in runs for r in block)


def measure(a: str, b: str, context: int | list[int], threads: int, blocks: int, block_steps: int,
            genai_huge_pages: bool = False) -> dict:
    check_blocks(blocks, block_steps)  # before either decoder loads
    rows = _rows(context)
    if not rows or min(rows) < 1 or threads < 1:
        raise PlanError(f"need a context of at least 1 token per row and at least 1 thread, got {context} and {threads}")
    if len(rows) > 1 and any(t.startswith(GENAI_PREFIXES) for t in (a, b)):
        raise PlanError(f"an onnxruntime-genai decoder takes one row here, not {len(rows)}")
    steps = blocks * block_steps + 1
    step_a, step_b = (decoder_steps(t, context, threads, steps, genai_huge_pages) for t in (a, b))
    step_a()  # one warm step each
    step_b()
    return {"a": a, "b": b, "context": context, "threads": threads, "genai_huge_pages": genai_huge_pages,
            **summarize(*interleave(step_a, step_b, blocks, block_steps))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prefixkv.bench.paired", description=__doc__.splitlines()[0])
    parser.add_argument("a", help="an engine folder, genai:FOLDER or genai-graph:FOLDER")
    parser.add_argument("b", help="an engine folder, genai:FOLDER or genai-graph:FOLDER (the ratio's denominator)")
    parser.add_argument("context", type=parse_context, help="prompt tokens, or comma-separated prompt tokens per row")
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--block-steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--genai-huge-pages", action="store_true",
                        help="collapse a genai model's loaded memory into 2 MiB pages, as the engine runner does its own")
    args = parser.parse_args(argv)
    try:
        measured = measure(args.a, args.b, args.context, args.threads, args.blocks, args.block_steps, args.genai_huge_pages)
    except PlanError as err:  # the plan's rules, or a prompt and its steps past an engine's context
        parser.error(str(err))
    except EngineError as err:  # a folder that is not a usable engine: one line, not a traceback
        parser.exit(1, f"{parser.prog}: error: {err}\n")
    print(json.dumps(measured))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
