#!/usr/bin/env python3
"""Decode step of an engine under this tree's code against an engine under another commit's code.

    python scripts/decode_against_commit.py --commit 53ca0f7 --old OLD_ENGINE --new NEW_ENGINE \\
        [--contexts 1024,4096] [--rounds 4] [--steps 32] [--threads 2] [--output FILE.json]

"No slower than today's" compares two versions of prefixkv, each running the engine it built.
``git archive COMMIT`` of this repository is unpacked into a temporary folder; ``OLD_ENGINE``
(built by that commit's ``prefixkv build``) runs with that code first on the Python path,
``NEW_ENGINE`` with this tree's.  Every measurement is a fresh process: the prompt is the
first CONTEXT tokens of the built-in text (this tree's tokenizer and text, the same ids for
both), then 2 untimed greedy decode steps and ``--steps`` timed ones, each the runner's
``decode`` and numpy's argmax; its median is the point.  The two run in turn, the old one
first in even rounds and the new one first in odd ones.  Prints JSON: the commit's hash, this
tree's HEAD and whether it has uncommitted changes, and per context each round's milliseconds,
ratio (new over old) and the ``prefixkv`` each process imported, with the median ratio and
those of either order.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# run in each fresh process, with one version's code first on the path: only what both
# versions have (``load_runner``, ``prefill(ids, mask)``, ``decode(state, tokens)``)
STEP = """
import json, os, statistics, sys, time
import numpy as np
import prefixkv
from prefixkv.engines import load_runner
tree, engine, ids_file, steps, threads = sys.argv[1:6]
code = os.path.realpath(prefixkv.__file__)
if not code.startswith(os.path.realpath(tree) + os.sep):
    raise SystemExit(f"imported prefixkv from {code}, not from {tree}")
ids = np.load(ids_file).reshape(1, -1)
runner = load_runner(engine, threads=int(threads), verify=False)
logits, state = runner.prefill(ids, np.ones_like(ids))
token = np.asarray(logits).argmax(-1)
times = []
for _ in range(int(steps) + 2):
    start = time.perf_counter()
    logits, state = runner.decode(state, token)
    token = np.asarray(logits).argmax(-1)
    times.append(time.perf_counter() - start)
print(json.dumps({"ms": statistics.median(times[2:]) * 1e3, "code": code}))
"""


def failure(done: subprocess.CompletedProcess) -> str:
    """A failed command's last line of stderr, or its exit status where it printed none."""
    lines = done.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit {done.returncode}"


def unpack(commit: str, folder: Path) -> Path:
    """``git archive`` of ``commit`` in this repository, unpacked into ``folder``."""
    archive = folder / "tree.tar"
    done = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", "-o", str(archive), commit],
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"git archive {commit}: {failure(done)}")
    tree = folder / "tree"
    with tarfile.open(archive) as tar:  # the "data" filter where this Python has it (3.11.4, 3.10.12 on)
        tar.extractall(tree, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return tree


def resolved(commit: str) -> str:
    """``commit``'s full hash in this repository (one line and exit 1 if it names none)."""
    done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", commit + "^{commit}"],
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"git archive {commit}: no such commit in {ROOT}")
    return done.stdout.strip()


def step_ms(tree: Path, engine: str, ids_file: Path, steps: int, threads: int) -> dict:
    """The median decode step of ``engine`` with ``tree``'s prefixkv, in a fresh process ->
    {"ms", "code": the prefixkv file it imported}."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    done = subprocess.run([sys.executable, "-c", STEP, str(tree), engine, str(ids_file), str(steps), str(threads)],
                          capture_output=True, text=True, env=env, cwd=tree)
    if done.returncode:
        raise SystemExit(f"{engine} with {tree}: {failure(done)}")
    lines = done.stdout.strip().splitlines()
    if not lines:
        raise SystemExit(f"{engine} with {tree}: no result printed")
    return json.loads(lines[-1])


def compare(trees: dict, engines: dict, ids_file: Path, rounds: int, steps: int, threads: int) -> dict:
    """Both versions' steps in turn for ``rounds`` rounds -> the rounds and the ratios (new / old)."""
    rows = []
    for r in range(rounds):
        order = ("old", "new") if r % 2 == 0 else ("new", "old")
        got = {name: step_ms(trees[name], engines[name], ids_file, steps, threads) for name in order}
        ms = {name: point["ms"] for name, point in got.items()}
        rows.append({"first": order[0], "old_ms": ms["old"], "new_ms": ms["new"], "ratio": ms["new"] / ms["old"],
                     "old_code": got["old"]["code"], "new_code": got["new"]["code"]})
    by_order = {first: [row["ratio"] for row in rows if row["first"] == first] for first in ("old", "new")}
    return {"rounds": rows, "ratio": statistics.median(row["ratio"] for row in rows),
            **{f"ratio_{first}_first": statistics.median(v) for first, v in by_order.items() if v}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commit", required=True, help="the commit whose code runs --old")
    parser.add_argument("--old", required=True, help="an engine folder built by that commit")
    parser.add_argument("--new", required=True, help="an engine folder built by this tree")
    parser.add_argument("--contexts", default="1024,4096", help="comma-separated prompt lengths (default 1024,4096)")
    parser.add_argument("--rounds", type=int, default=4, help="processes of each version per context (default 4)")
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per process (default 32)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", help="also write the JSON here")
    args = parser.parse_args(argv)
    try:
        contexts = [int(c) for c in args.contexts.split(",")]
    except ValueError:
        parser.error(f"--contexts: expected comma-separated integers, got {args.contexts!r}")
    if min(contexts) < 1 or args.rounds < 1 or args.steps < 1 or args.threads < 1:
        parser.error("contexts, --rounds, --steps and --threads must be positive")
    room = {}
    for name in ("old", "new"):
        manifest = Path(getattr(args, name)) / "manifest.json"
        try:
            room[name] = int(json.loads(manifest.read_text()).get("max_context") or 0)
        except (OSError, ValueError):
            parser.error(f"--{name} {getattr(args, name)}: no engine folder (no readable manifest.json)")
    needed = max(contexts) + args.steps + 2  # the prompt, 2 untimed steps and the timed ones
    for name, limit in room.items():
        if limit and needed > limit:
            parser.error(f"--{name}'s context is {limit} tokens, fewer than {max(contexts)} prompt tokens and "
                         f"{args.steps + 2} steps")

    sys.path.insert(0, str(ROOT))  # the prompt ids by this tree's code, not an installed copy's
    from prefixkv.bench.point import prompt_ids
    from prefixkv.tokenizer import Tokenizer

    import numpy as np

    engines = {"old": str(Path(args.old).resolve()), "new": str(Path(args.new).resolve())}
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True).stdout.strip())
    result = {"commit": resolved(args.commit), "new_tree": {"root": str(ROOT), "head": head, "uncommitted_changes": dirty},
              "engines": engines, "steps": args.steps, "threads": args.threads, "contexts": {}}
    with tempfile.TemporaryDirectory(prefix="prefixkv-commit-") as scratch:
        scratch = Path(scratch)
        trees = {"old": unpack(result["commit"], scratch), "new": ROOT}
        ids = prompt_ids(Tokenizer(engines["new"]), max(contexts))
        for context in contexts:
            if len(ids) < context:
                raise SystemExit(f"the built-in text has {len(ids)} tokens, fewer than {context}")
            ids_file = scratch / f"ids-{context}.npy"
            np.save(ids_file, np.asarray(ids[:context], np.int64))
            got = compare(trees, engines, ids_file, args.rounds, args.steps, args.threads)
            result["contexts"][str(context)] = got
            print(f"{context} tokens: new / old {got['ratio']:.3f} (" + ", ".join(
                f"{row['new_ms']:.2f} / {row['old_ms']:.2f} ms" for row in got["rounds"]) + ")", file=sys.stderr)
    text = json.dumps(result, indent=1)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
