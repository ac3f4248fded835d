"""Calibration-prefill overhead: PyTorch prefill with importance scoring vs a plain SDPA prefill.

    prefixkv bench scoring [--model smollm2-135m] [--lengths 512,1024,2048] [--repeat 3] [--output results/scoring]

Target (issue 2): at 2048 tokens the scoring prefill takes at most 1.3x the plain SDPA prefill.
Writes scoring.json and scoring.png; prints a markdown table.  Timings are medians of
``--repeat`` runs after one warm-up, on this machine, at the time of the run.
"""
from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from ..cache import PrefixKVCache, cache_argument
from ..data import builtin_text
from ..models import load_model


def _median_seconds(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(args) -> int:
    """The benchmark ``args`` (the namespace of ``prefixkv bench scoring``, ``cli.bench``) describe."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    lengths, scorers = list(args.lengths), list(args.scorers)
    text_ids = tokenizer(builtin_text("calibration"), return_tensors="pt")["input_ids"]
    rows = []
    with torch.no_grad():
        for n in lengths:
            ids = text_ids[:, :n]
            model.set_attn_implementation("sdpa")
            sdpa = _median_seconds(lambda: model(input_ids=ids, logits_to_keep=1), args.repeat)
            model.set_attn_implementation("prefixkv")
            row = {"tokens": n, "sdpa_ms": round(sdpa * 1e3, 1)}
            for name in scorers:
                def scored():
                    cache = PrefixKVCache(method="full", keep_fraction=1.0, record=[name])
                    model(input_ids=ids, logits_to_keep=1, **cache_argument(model, cache))

                seconds = _median_seconds(scored, args.repeat)
                row[f"{name}_ms"] = round(seconds * 1e3, 1)
                row[f"{name}_overhead"] = round(seconds / sdpa, 3)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    command = "prefixkv " + " ".join(getattr(args, "argv", []))
    result = {"command": command.strip(), "model": args.model, "repeat": args.repeat,
              "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "target": "accumulated_overhead <= 1.3 at 2048 tokens", "rows": rows}
    (out / "scoring.json").write_text(json.dumps(result, indent=2) + "\n")
    header = "| tokens | SDPA prefill ms | " + " | ".join(f"{s} ms (x SDPA)" for s in scorers) + " |"
    lines = [header, "|" + "---|" * (2 + len(scorers))]
    for row in rows:
        cells = [f"{row[f'{s}_ms']} ({row[f'{s}_overhead']}x)" for s in scorers]
        lines.append(f"| {row['tokens']} | {row['sdpa_ms']} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (out / "scoring.md").write_text(f"`{result['command']}`\n\n{table}\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for s in scorers:
            ax.plot(lengths, [r[f"{s}_overhead"] for r in rows], marker="o", label=s)
        ax.axhline(1.3, color="gray", linestyle="--", label="target 1.3x")
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("prefill time / SDPA prefill")
        ax.set_title("Scoring overhead of a calibration prefill")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "scoring.png", dpi=120)
        plt.close(fig)
    except ImportError:
        pass
    print(table)
    print(f"written: {out}/scoring.json, scoring.md, scoring.png", file=sys.stderr)
    return 0

