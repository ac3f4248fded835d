"""``bench speed``'s prefill points and targets: a fresh process per point, targets from hand-made numbers."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from test_export import one_torch_thread, tiny  # noqa: F401  (fixtures)


def test_a_point_runs_in_its_own_process_and_reports_memory(tiny):  # noqa: F811 (the fixture)
    engine_dir = tiny[0]
    proc = subprocess.run([sys.executable, "-m", "prefixkv.bench.point", str(engine_dir), "200", "--chunk", "64",
                           "--threads", "1", "--steps", "3"], capture_output=True, text=True, check=True)
    point = json.loads(proc.stdout.strip().splitlines()[-1])
    assert point["tokens"] <= 200 and point["chunk"] == 64 and point["decode_steps"] == 3
    assert point["prefill_s"] > 0 and point["decode_ms_per_token"] > 0
    assert 0 < point["decode_run_ms_per_token"] <= point["decode_ms_per_token"]  # the run is part of the step
    assert 0 < point["rss_after_load"] <= point["peak_rss"]
    assert 0 < point["rss_anon_after_load"] <= point["rss_after_load"]  # Linux: /proc/self/status


def test_the_prefill_memory_script_prefills_once_per_execution_order(tiny):  # noqa: F811 (the fixture)
    """``scripts/prefill_memory.py``: a fresh process per ONNX Runtime execution order, each one
    JSON line of ``bench.point``'s figures; a folder that is no engine: its one line, exit 1."""
    from pathlib import Path

    script = str(Path(__file__).resolve().parents[1] / "scripts" / "prefill_memory.py")
    proc = subprocess.run([sys.executable, script, str(tiny[0]), "--tokens", "100", "--chunk", "32", "--threads", "1"],
                          capture_output=True, text=True, check=True)
    lines = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert [line["execution_order"] for line in lines] == ["DEFAULT", "PRIORITY_BASED"]
    for line in lines:  # every session the runner opened ran with the line's order
        assert line["session_orders"] == [line["execution_order"]]
        assert line["tokens"] == 100 and line["chunk"] == 32 and line["decode_steps"] == 0
        assert line["peak_rss"] >= line["rss_after_load"] > 0 and line["prefill_s"] > 0
    missing = subprocess.run([sys.executable, script, str(tiny[0]) + "-missing", "--tokens", "10"],
                             capture_output=True, text=True)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "DEFAULT:" in missing.stderr


def test_the_commit_script_times_two_versions_in_turn_in_fresh_processes(tiny):  # noqa: F811 (the fixture)
    """``scripts/decode_against_commit.py`` against this repository's HEAD: HEAD's code unpacked
    by ``git archive``, each round's two processes in turn, the first of them alternating."""
    import shutil
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                                                     capture_output=True).returncode:
        pytest.skip("not a git checkout: the script archives a commit of it")
    script = str(root / "scripts" / "decode_against_commit.py")
    engine = str(tiny[0])
    proc = subprocess.run([sys.executable, script, "--commit", "HEAD", "--old", engine, "--new", engine, "--contexts",
                           "60,100", "--rounds", "2", "--steps", "3", "--threads", "1"], capture_output=True, text=True,
                          check=True)
    got = json.loads(proc.stdout)
    assert list(got["contexts"]) == ["60", "100"]
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert got["commit"] == head and got["new_tree"]["head"] == head
    for point in got["contexts"].values():
        assert [row["first"] for row in point["rounds"]] == ["old", "new"]
        for row in point["rounds"]:
            assert row["old_ms"] > 0 and row["new_ms"] > 0 and row["ratio"] == pytest.approx(row["new_ms"] / row["old_ms"])
            # the old engine ran the archived commit's code, the new one this tree's
            assert not row["old_code"].startswith(str(root) + "/") and row["old_code"].endswith("prefixkv/__init__.py")
            assert row["new_code"] == str(root / "prefixkv" / "__init__.py")
        assert point["ratio_old_first"] == point["rounds"][0]["ratio"]
        assert point["ratio_new_first"] == point["rounds"][1]["ratio"]
        assert point["ratio"] == pytest.approx((point["rounds"][0]["ratio"] + point["rounds"][1]["ratio"]) / 2)
    refused = subprocess.run([sys.executable, script, "--commit", "HEAD", "--old", engine + "-missing", "--new", engine],
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "no engine folder" in refused.stderr.strip().splitlines()[-1]
    too_long = subprocess.run([sys.executable, script, "--commit", "HEAD", "--old", engine, "--new", engine, "--contexts",
                               "500", "--steps", "32"], capture_output=True, text=True)  # the tiny engine holds 512
    assert too_long.returncode == 2 and "context is 512 tokens" in too_long.stderr.strip().splitlines()[-1]
    bad = subprocess.run([sys.executable, script, "--commit", "no-such-commit", "--old", engine, "--new", engine,
                          "--contexts", "60", "--rounds", "1"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip().startswith("git archive no-such-commit:") and bad.stderr.count("\n") == 1


def test_a_point_at_the_whole_context_decodes_no_token_past_it(tiny):  # noqa: F811 (the fixture)
    """A prompt of the tiny engine's whole context (512 tokens) leaves no position for a decode
    step: the point reports its prefill and no decode step, not the runner's refusal."""
    proc = subprocess.run([sys.executable, "-m", "prefixkv.bench.point", str(tiny[0]), "512", "--threads", "1",
                           "--steps", "3"], capture_output=True, text=True, check=True)
    point = json.loads(proc.stdout.strip().splitlines()[-1])
    assert point["tokens"] == 512 and point["prefill_s"] > 0
    assert point["decode_steps"] == 0 and point["decode_ms_per_token"] is None


def test_targets_compare_with_the_measured_numbers():
    from prefixkv.bench.speed import targets

    gib = 2**30
    results = {
        "prefill": {
            "window:keep 0.2": {"2048": {"prefill_s": 3.3, "peak_rss": 1 * gib, "rss_after_load": 600},
                                "8192": {"prefill_s": 30.0, "peak_rss": 2.5 * gib, "rss_after_load": 700}},
            "accumulated:keep 0.2": {"2048": {"prefill_s": 4.2, "peak_rss": gib, "rss_after_load": 600}},
            "torch-sdpa": {"2048": {"prefill_s": 3.0}, "8192": {"prefill_s": 20.0}},
        },
        "sizes": {"safetensors": 1000, "engines": {"window:keep 0.2": {"folder": 1050, "weights": 500}}},
        "onnxruntime": {"1": {"512": {"decode_ms_per_token": 30.0}}, "0.2": {"512": {"decode_ms_per_token": 20.0}}},
        "genai": {"512": {"decode_ms_per_token": 33.0}},
    }
    got = {row["target"]: (row["value"], row["met"]) for row in targets(results)}
    assert all(row["limit"] > 0 for row in targets(results))
    assert got == {
        "window:keep 0.2 prefill at 2048 <= 1.1x PyTorch SDPA": (1.1, True),  # 3.3 / 3.0
        "window:keep 0.2 prefill at 8192 <= 1.1x PyTorch SDPA": (1.5, False),
        "window:keep 0.2 peak RSS at 8192 <= 2.0 GiB": (2.5, False),
        "window:keep 0.2 folder <= 1.1x safetensors": (1.05, True),
        "window:keep 0.2 RSS after load <= 1.3x weights": (1.4, False),  # 700 / 500
        "accumulated:keep 0.2 prefill at 2048 <= 1.4x PyTorch SDPA": (1.4, True),
        "keep 1 decode at 512 <= onnxruntime-genai's (one point each in the bench's process, genai loaded second)":
            (0.909, True),
    }


def test_the_anonymous_rss_is_reported_beside_the_rss_target():
    """The file-backed pages (the mapped weights) aside: its own row, the RSS row unchanged."""
    from prefixkv.bench.speed import targets

    results = {"prefill": {"window:keep 0.2": {"2048": {"rss_after_load": 700, "rss_anon_after_load": 600}}},
               "sizes": {"safetensors": 1000, "engines": {"window:keep 0.2": {"folder": 1050, "weights": 500}}}}
    got = {row["target"]: (row["value"], row["met"]) for row in targets(results)}
    assert got["window:keep 0.2 RSS after load <= 1.3x weights"] == (1.4, False)
    assert got["window:keep 0.2 anonymous RSS after load <= 1.3x weights (file-backed pages aside)"] == (1.2, True)


def test_the_peak_rss_is_the_processs_own_not_its_parents():
    """A point started by a large process (``bench speed`` holds the model) reports its own peak:
    ``getrusage``'s high-water mark survives exec, ``VmHWM`` does not."""
    import numpy as np

    parent = np.ones(640 << 20, dtype=np.uint8)  # 640 MiB, resident
    code = "from prefixkv.bench.point import peak_rss_bytes; print(peak_rss_bytes())"
    peak = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert parent.sum() == 640 << 20
    assert 0 < peak < 320 << 20  # a Python importing the module: well under the parent's 640 MiB


def test_weight_points_compare_each_round_with_its_own_fp32_step():
    """Each round runs every precision in turn; a round's ratio is against that round's fp32
    step, and the figure is the median of the rounds' ratios (hand-computed), not a ratio of
    medians: a slow round slows both of its points."""
    from prefixkv.bench.speed import targets, weight_points

    timings = iter([30.0, 12.0, 20.0, 9.0, 25.0, 9.0])  # (fp32, int4) per round: 0.4, 0.45, 0.36
    calls = []

    def measure(path, context, threads, steps=None):
        calls.append((path, context, threads, steps))
        return {"decode_ms_per_token": next(timings)}

    got = weight_points({"fp32": "A", "int4": "B"}, 1024, 3, 64, 2, lambda m: None, measure=measure)
    assert calls == [("A", 1024, 2, 64), ("B", 1024, 2, 64)] * 3
    assert [round(r["int4"]["vs_fp32"], 3) for r in got["rounds"]] == [0.4, 0.45, 0.36]
    assert got["median_vs_fp32"] == {"int4": 0.4} and got["vs_fp32_rounds"] == {"int4": 3}
    rows = {row["target"]: (row["value"], row["met"]) for row in targets({"weights": got})}
    assert rows == {"int4 decode at 1024 <= 0.4x fp32 (median of 3 rounds)": (0.4, True)}
    # a failed point is reported, not divided by
    failed = weight_points({"fp32": "A", "int4": "B"}, 1024, 1, 64, 2, lambda m: None,
                           measure=lambda p, c, t, steps=None: {"error": "boom"} if p == "B" else {"decode_ms_per_token": 1.0})
    assert failed["rounds"][0]["int4"] == {"error": "boom"} and "median_vs_fp32" not in failed
    assert targets({"weights": failed}) == []


def test_weight_points_put_onnxruntime_genai_beside_in_the_same_rounds():
    """onnxruntime-genai's fp32 and int4 run in the same rounds: its own int4 against its own
    fp32, and this engine's steps against its steps at the same precision (hand-computed)."""
    from prefixkv.bench.speed import targets, weight_points

    timings = {"fp32": [20.0, 24.0], "int4": [9.0, 12.0], "genai fp32": [30.0, 36.0], "genai int4": [12.0, 15.0]}
    calls = {name: iter(values) for name, values in timings.items()}
    names = {f"T:{name}": name for name in timings}

    def measure(target, context, threads, steps=None):
        return {"decode_ms_per_token": next(calls[names[target]])}

    got = weight_points({name: f"T:{name}" for name in timings}, 1024, 2, 64, 2, lambda m: None, measure=measure)
    assert got["median_vs_fp32"] == pytest.approx({"int4": 0.475, "genai int4": 0.40833333})  # (0.45, 0.5), (0.4, 0.41667)
    assert got["median_vs_genai"] == pytest.approx({"fp32": 0.66666667, "int4": 0.775})  # (0.66667, 0.66667), (0.75, 0.8)
    rows = {row["target"]: (row["value"], row["met"]) for row in targets({"weights": got})}
    assert rows == {"int4 decode at 1024 <= 0.4x fp32 (median of 2 rounds)": (0.475, False),
                    "fp32 decode at 1024 <= onnxruntime-genai's fp32 (median of 2 rounds)": (0.667, True),
                    "int4 decode at 1024 <= onnxruntime-genai's int4 (median of 2 rounds)": (0.775, True)}


def test_decode_rounds_compare_each_engine_with_genai_in_the_same_round():
    """At every context each round runs the engines and onnxruntime-genai in turn; a round's
    ratio is against that round's genai step, the figure the median of the rounds' ratios
    (hand-computed), and it stands for the context in the targets instead of the one-shot
    in-process step (which stays in the results)."""
    from prefixkv.bench.speed import decode_rounds, targets

    timings = {(512, "keep 1"): [33.0, 30.0, 36.0], (512, "keep 0.2"): [30.0, 33.0, 34.0], (512, "genai"): [30.0, 33.0, 34.0],
               (2048, "keep 1"): [44.0, 40.0, 41.0], (2048, "keep 0.2"): [30.0, 32.0, 31.0], (2048, "genai"): [40.0, 40.0, 40.0]}
    left = {key: iter(values) for key, values in timings.items()}
    calls = []

    def measure(target, context, threads, steps=None):
        calls.append((target, context))
        return {"decode_ms_per_token": next(left[(context, target)])}

    got = decode_rounds({n: n for n in ("keep 1", "keep 0.2", "genai")}, [512, 2048], 3, 64, 2, lambda m: None, measure=measure)
    assert calls == [(n, c) for c in (512, 2048) for _ in range(3) for n in ("keep 1", "keep 0.2", "genai")]
    # 512: keep 1 (1.1, 0.90909, 1.05882) -> 1.05882; keep 0.2 (1, 1, 1) -> 1
    # 2048: keep 1 (1.1, 1, 1.025) -> 1.025; keep 0.2 (0.75, 0.8, 0.775) -> 0.775
    assert got["512"]["median_vs_genai"] == pytest.approx({"keep 1": 36 / 34, "keep 0.2": 1.0})
    assert got["2048"]["median_vs_genai"] == pytest.approx({"keep 1": 1.025, "keep 0.2": 0.775})
    results = {"decode_rounds": got, "genai": {"512": {"decode_ms_per_token": 40.0}, "1024": {"decode_ms_per_token": 40.0}},
               "onnxruntime": {"1": {"512": {"decode_ms_per_token": 20.0}, "1024": {"decode_ms_per_token": 44.0}}}}
    rows = {row["target"]: (row["value"], row["met"]) for row in targets(results)}
    assert rows == {"keep 1 decode at 512 <= onnxruntime-genai's (median of 3 rounds)": (1.059, False),
                    "keep 0.2 decode at 512 <= onnxruntime-genai's (median of 3 rounds)": (1.0, True),
                    "keep 1 decode at 2048 <= onnxruntime-genai's (median of 3 rounds)": (1.025, False),
                    "keep 0.2 decode at 2048 <= onnxruntime-genai's (median of 3 rounds)": (0.775, True),
                    "keep 1 decode at 1024 <= onnxruntime-genai's (one point each in the bench's process, genai loaded "
                    "second)": (1.1, False)}  # no rounds at 1024: the one-shot step
    # a failed genai point gives that round no ratio; a skipped run gives no row
    failed = decode_rounds({"keep 1": "A", "genai": "G"}, [512], 1, 64, 2, lambda m: None,
                           measure=lambda t, c, th, steps=None: {"error": "boom"} if t == "G" else {"decode_ms_per_token": 1.0})
    assert "median_vs_genai" not in failed["512"]
    assert targets({"decode_rounds": {"skipped": "no genai"}}) == []


def test_prefill_rounds_compare_each_engine_with_sdpa_in_the_same_round():
    """Each round runs every target at one length before the next length, in reverse order
    every other round; a round's ratio is against that round's SDPA (hand-computed), the
    target reads the median of the rounds' ratios, and the peak RSS target reads the highest
    round.  A round that failed gives no ratio and leaves the point's fields to a round that
    measured it."""
    from prefixkv.bench.speed import prefill_points, targets

    gib = 2**30
    seconds = {("W", 2048): [3.3, 3.0, 3.6], ("S", 2048): [3.0, 3.0, 3.0],
               ("W", 8192): [30.0, 22.0, None], ("S", 8192): [20.0, 20.0, 20.0]}
    left = {key: iter(values) for key, values in seconds.items()}
    calls = []

    def measure(target, context, threads, chunk=None):
        calls.append((target, context))
        s = next(left[(target, context)])
        if s is None:
            return {"error": "boom"}
        return {"prefill_s": s, "peak_rss": (1.5 + s / 100) * gib, "rss_after_load": 600}

    got = prefill_points({"window:keep 0.2": "W", "torch-sdpa": "S"}, [2048, 8192], None, 2, lambda m: None, rounds=3,
                         measure=measure)
    assert calls == [("W", 2048), ("S", 2048), ("W", 8192), ("S", 8192), ("S", 2048), ("W", 2048), ("S", 8192),
                     ("W", 8192), ("W", 2048), ("S", 2048), ("W", 8192), ("S", 8192)]
    window = got["window:keep 0.2"]
    # 2048: 1.1, 1.0, 1.2 -> 1.1; 8192: 1.5, 1.1 (the third round failed) -> 1.3
    assert window["2048"]["vs_sdpa_rounds"] == pytest.approx([1.1, 1.0, 1.2])
    assert window["8192"]["median_vs_sdpa"] == pytest.approx(1.3)
    assert window["8192"]["prefill_s"] == 30.0 and window["8192"]["prefill_s_rounds"] == [30.0, 22.0, None]
    assert "vs_sdpa_rounds" not in got["torch-sdpa"]["2048"]
    rows = {row["target"]: (row["value"], row["met"]) for row in targets({"prefill": got})}
    assert rows["window:keep 0.2 prefill at 2048 <= 1.1x PyTorch SDPA (median of 3 rounds)"] == (1.1, True)
    assert rows["window:keep 0.2 prefill at 8192 <= 1.1x PyTorch SDPA (median of 2 rounds)"] == (1.3, False)
    assert rows["window:keep 0.2 peak RSS at 8192 <= 2.0 GiB"] == (1.8, True)  # the highest round: 1.5 + 30 / 100
    # the first round failed: the point is the second round's
    left = {("W", 2048): iter([None, 4.0]), ("S", 2048): iter([2.0, 2.0])}
    again = prefill_points({"window:keep 0.2": "W", "torch-sdpa": "S"}, [2048], None, 2, lambda m: None, rounds=2,
                           measure=measure)["window:keep 0.2"]["2048"]
    assert again["prefill_s"] == 4.0 and again["vs_sdpa_rounds"] == [2.0] and "error" not in again


def test_a_paired_point_interleaves_two_engines_in_one_process(tiny):  # noqa: F811 (the fixture)
    engine_dir = str(tiny[0])
    proc = subprocess.run([sys.executable, "-m", "prefixkv.bench.paired", engine_dir, engine_dir, "100", "--blocks", "3",
                           "--block-steps", "3", "--threads", "1"], capture_output=True, text=True, check=True)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["blocks"] == 3 and got["block_steps"] == 3 and len(got["ratios"]) == 3
    assert got["a_ms_per_token"] > 0 and got["b_ms_per_token"] > 0
    assert got["ratio_quartiles"][0] <= got["ratio"] <= got["ratio_quartiles"][1]
    # A is an engine: its ONNX Runtime run within each step, shorter than the step
    assert 0 < got["a_run_ms_per_token"] < got["a_ms_per_token"] and len(got["run_ratios"]) == 3
    assert 0 < got["b_run_ms_per_token"] < got["b_ms_per_token"]  # B an engine too: run against run
    refused = subprocess.run([sys.executable, "-m", "prefixkv.bench.paired", engine_dir, engine_dir, "100",
                              "--block-steps", "1"], capture_output=True, text=True)
    assert refused.returncode == 2 and "at least 2 steps" in refused.stderr.strip().splitlines()[-1]
    missing = subprocess.run([sys.executable, "-m", "prefixkv.bench.paired", engine_dir + "-missing", engine_dir, "100"],
                             capture_output=True, text=True)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "no engine folder" in missing.stderr
    # a batch of rows of different lengths, decoded together; onnxruntime-genai takes one row
    # (refused before any decoder loads: the folder does not exist)
    proc = subprocess.run([sys.executable, "-m", "prefixkv.bench.paired", engine_dir, engine_dir, "100,60,30", "--blocks",
                           "2", "--block-steps", "2", "--threads", "1"], capture_output=True, text=True, check=True)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["context"] == [100, 60, 30] and len(got["ratios"]) == 2 and got["a_ms_per_token"] > 0
    for context, message in (("100,60", "takes one row here, not 2"), ("100,x", "comma-separated counts")):
        refused = subprocess.run([sys.executable, "-m", "prefixkv.bench.paired", "genai:" + engine_dir + "-missing",
                                  engine_dir, context], capture_output=True, text=True)
        assert refused.returncode == 2 and message in refused.stderr.strip().splitlines()[-1]


def test_interleave_alternates_the_order_and_leaves_each_blocks_first_step_untimed():
    """A first in even blocks, B first in odd ones; each block's first call is not timed (a
    fake clock that only the steps move: A's steps take 2, B's 1, and every 4th call of a
    step, counted from its first, 100: the calls that must go untimed).  What A's timed calls
    return (its run) is kept per block beside their times."""
    from prefixkv.bench.paired import interleave

    now, calls = [0.0], []

    def stepper(name, seconds):
        count = [0]

        def step():
            calls.append(name)
            now[0] += 100.0 if count[0] % 4 == 0 else seconds
            count[0] += 1
            return count[0] % 4 if name == "a" else -count[0]  # the untimed calls return 1 and -1, -5, ...: never kept
        return step

    a_blocks, b_blocks, a_runs, b_runs = interleave(stepper("a", 2.0), stepper("b", 1.0), blocks=3, block_steps=4,
                                            clock=lambda: now[0])
    assert "".join(calls) == "aaaabbbb" "bbbbaaaa" "aaaabbbb"
    assert a_blocks == [[2.0] * 3] * 3 and b_blocks == [[1.0] * 3] * 3
    assert a_runs == [[2, 3, 0]] * 3 and b_runs == [[-2, -3, -4], [-6, -7, -8], [-10, -11, -12]]
    with pytest.raises(ValueError, match="at least 2 steps"):
        interleave(stepper("a", 1), stepper("b", 1), blocks=1, block_steps=1)


def test_a_paired_figure_is_the_median_of_the_per_block_ratios():
    """Hand-computed: per-block medians A 3, 10, 1 and B 1, 5, 2 -> ratios 3, 2, 0.5, median 2,
    quartiles (inclusive) 1.25 and 2.5; each side's step is the median over all its steps."""
    from prefixkv.bench.paired import summarize

    got = summarize([[2, 4, 3], [10, 10, 10], [1, 1, 1]], [[1, 1, 1], [5, 5, 5], [2, 2, 2]])
    assert got["ratios"] == [3.0, 2.0, 0.5]
    assert got["ratio"] == 2.0 and got["ratio_quartiles"] == [1.25, 2.5]
    assert got["a_ms_per_token"] == 3000.0 and got["b_ms_per_token"] == 2000.0
    assert got["blocks"] == 3 and got["block_steps"] == 4
    assert "run_ratio" not in got  # A returned no runs (onnxruntime-genai)
    # A's runs within those steps: per-block medians 2, 5, 0.5 over B's steps 1, 5, 2 (B gave no
    # runs: onnxruntime-genai) -> 2, 1, 0.25
    a_steps, b_steps = [[2, 4, 3], [10, 10, 10], [1, 1, 1]], [[1, 1, 1], [5, 5, 5], [2, 2, 2]]
    a_runs = [[1, 2, 3], [5, 5, 5], [0.5, 0.5, 0.5]]
    runs = summarize(a_steps, b_steps, a_runs, [[None] * 3] * 3)
    assert runs["ratio"] == 2.0 and runs["run_ratios"] == [2.0, 1.0, 0.25]
    assert runs["run_ratio"] == 1.0 and runs["run_ratio_quartiles"] == [0.625, 1.5]
    assert runs["a_run_ms_per_token"] == 2000.0 and "b_run_ms_per_token" not in runs
    # B an engine too: A's runs over B's runs, per-block medians 0.5, 2.5, 1 -> 4, 2, 0.5
    both = summarize(a_steps, b_steps, a_runs, [[0.5, 0.5, 0.5], [2, 2.5, 3], [1, 1, 1]])
    assert both["run_ratios"] == [4.0, 2.0, 0.5] and both["b_run_ms_per_token"] == 1000.0
    assert "run_ratio" not in summarize([[1]], [[1]], [[None]], [[None]])


def test_paired_points_become_target_rows_beside_the_rounds():
    """Each pair is measured once (a failed one is kept as its error and gives no row); the
    paired figures stand as their own target rows, labelled with their processes' ratios."""
    from prefixkv.bench.paired import PairPlan
    from prefixkv.bench.speed import paired_points, targets

    seen = []

    def measure(a, b, context, plan):
        seen.append((a, b, context, plan))
        if a == "broken":
            return {"error": "boom"}
        ratio = {"E1": 1.04, "E2": 0.8, "I4": 0.39}[a]
        return {"ratio": ratio, "process_ratios": [ratio - 0.01, ratio + 0.01], "swapped": [False, True],
                "blocks": plan.blocks, "a_ms_per_token": 10.0, "b_ms_per_token": 10.0}

    lines, plan = [], PairPlan(threads=2, blocks=12, block_steps=8, processes=2)
    decode = paired_points({"keep 1": ("E1", "G"), "keep 0.2": ("E2", "G"), "keep 0.5": ("broken", "G")}, 2048, plan,
                           lines.append, measure=measure)
    weights = paired_points({"int4": ("I4", "F32")}, 1024, plan, lines.append, measure=measure)
    assert seen[0] == ("E1", "G", 2048, plan) and decode["keep 0.5"] == {"error": "boom"} and len(lines) == 4
    assert "1.040x (median of 2 processes of 12 blocks: 1.030, 1.050 B first)" in lines[0]
    # the bench's one-shot in-process points: a paired figure stands for its context instead; where
    # the pair failed (4096), the one-shot row stays
    one_shot = {"onnxruntime": {"1": {"2048": {"decode_ms_per_token": 9.0}, "4096": {"decode_ms_per_token": 12.0}}},
                "genai": {"2048": {"decode_ms_per_token": 10.0}, "4096": {"decode_ms_per_token": 10.0}}}
    paired = {"2048": decode, "4096": {"keep 1": {"error": "boom"}}}
    rows = {row["target"]: (row["value"], row["met"])
            for row in targets({"paired": paired, "weights": {"context": 1024, "paired": weights}, **one_shot})}
    label = "paired, median of 2 processes of 12 blocks: {:.3f}, {:.3f} B first"
    assert rows == {f"int4 decode at 1024 <= 0.4x fp32 ({label.format(0.38, 0.40)})": (0.39, True),
                    f"keep 1 decode at 2048 <= onnxruntime-genai's ({label.format(1.03, 1.05)})": (1.04, False),
                    f"keep 0.2 decode at 2048 <= onnxruntime-genai's ({label.format(0.79, 0.81)})": (0.8, True),
                    "keep 1 decode at 4096 <= onnxruntime-genai's (one point each in the bench's process, genai loaded "
                    "second)": (1.2, False)}
    assert targets({"paired": {"skipped": "no genai"}}) == []


def test_a_pair_runs_in_processes_that_load_either_decoder_first_in_turn():
    """``speed.paired``: process 0 loads A first, process 1 B first (its measurement of (B, A)
    told as one of (A, B)), and so on; the figure is the median of the processes' ratios.
    Here A's step is 2 % slower than B's in truth, and whichever decoder a process loads
    first runs 4 % slower: one process per order gives 1.02 * 1.04 and 1.02 / 1.04, whose
    median is 1.02 to within the order effect's second order."""
    from prefixkv.bench.paired import PairPlan
    from prefixkv.bench.speed import paired, process_figures, run_figure

    true_step = {"A": 10.2, "B": 10.0}
    calls = []

    def run(first, second):
        calls.append((first, second))
        a_ms, b_ms = true_step[first] * 1.04, true_step[second]
        return {"a": first, "b": second, "ratio": a_ms / b_ms, "ratios": [a_ms / b_ms] * 2,
                "ratio_quartiles": [a_ms / b_ms] * 2, "blocks": 2, "block_steps": 8,
                "a_ms_per_token": a_ms, "b_ms_per_token": b_ms, "a_run_ms_per_token": a_ms - 1, "b_run_ms_per_token": b_ms - 1,
                "run_ratio": (a_ms - 1) / (b_ms - 1), "run_ratios": [(a_ms - 1) / (b_ms - 1)] * 2,
                "run_ratio_quartiles": [(a_ms - 1) / (b_ms - 1)] * 2}

    got = paired("A", "B", 1024, PairPlan(blocks=2, processes=4), run=run)
    assert calls == [("A", "B"), ("B", "A"), ("A", "B"), ("B", "A")]
    first, second, third, fourth = got["process_ratios"]
    assert first == third == pytest.approx(10.2 * 1.04 / 10.0) and second == fourth == pytest.approx(10.2 / (10.0 * 1.04))
    assert got["ratio"] == pytest.approx(1.02, abs=0.001) and got["swapped"] == [False, True, False, True]
    assert got["a"] == "A" and got["processes"][1]["a"] == "A" and got["processes"][1]["a_ms_per_token"] == pytest.approx(10.2)
    assert got["processes"][1]["run_ratio"] == pytest.approx(9.2 / 9.4) and got["run_ratio_processes"] == 4
    assert run_figure(got) == f"its run alone {got['run_ratio']:.3f}x"
    # balanced over the orders: sqrt(1.02 * 1.04 * 1.02 / 1.04) is the true 1.02 exactly (the
    # median, 1.0208, is not), and every resample within the orders gives the same
    assert got["balanced_ratio"] == pytest.approx(1.02) and got["balanced_interval"] == pytest.approx([1.02, 1.02])
    assert "balanced over the orders 1.020 (95 % interval 1.020 to 1.020)" in process_figures(got)
    failing = paired("A", "B", 1024, PairPlan(blocks=2, processes=2), run=lambda a, b: {"error": f"{a} broke"})
    assert failing == {"error": "A broke", "errors": ["A broke", "B broke"]}
    half = paired("A", "B", 1024, PairPlan(blocks=2, processes=2), run=lambda a, b: run(a, b) if a == "A" else {"error": "B broke"})
    assert half["ratio"] == pytest.approx(10.2 * 1.04 / 10.0) and half["errors"] == ["B broke"] and "balanced_ratio" not in half
    assert process_figures(half) == f"median of 1 processes of 2 blocks: {half['ratio']:.3f}; 1 more failed: B broke"


def test_a_run_ratio_against_genai_says_it_comes_from_one_load_order():
    """genai's loop gives no runs, so against it only the processes that loaded the engine
    first have a run ratio: the combined figure keeps it but says which processes gave it."""
    from prefixkv.bench.paired import PairPlan
    from prefixkv.bench.speed import paired, run_figure

    def run(first, second):
        ratio = 0.95 if first == "E" else 1 / 1.05
        out = {"a": first, "b": second, "ratio": ratio, "ratios": [ratio], "ratio_quartiles": [ratio, ratio],
               "blocks": 2, "block_steps": 8, "a_ms_per_token": 10.0, "b_ms_per_token": 10.0}
        if first == "E":  # the engine's runs against genai's whole step
            out.update({"a_run_ms_per_token": 9.0, "run_ratio": 0.9, "run_ratios": [0.9], "run_ratio_quartiles": [0.9, 0.9]})
        return out

    got = paired("E", "genai:G", 512, PairPlan(blocks=2, processes=2), run=run)
    assert got["ratio"] == pytest.approx(1.0) and got["run_ratio"] == 0.9 and got["run_ratio_swapped"] == [False]
    assert run_figure(got) == "its run alone 0.900x (median of the 1 processes that loaded A first only)"


def test_a_reversed_pair_swaps_its_decoders_and_inverts_its_ratios():
    """A measurement of (B, A) as one of (A, B); the run ratio against genai's whole step (no
    runs of B) cannot be turned round and is dropped."""
    from prefixkv.bench.paired import PairPlan, PlanError, reversed_pair

    measured = {"a": "G", "b": "E", "context": 512, "blocks": 4, "block_steps": 8, "a_ms_per_token": 20.0,
                "b_ms_per_token": 25.0, "ratio": 0.8, "ratios": [0.5, 0.8, 1.0, 1.25], "ratio_quartiles": [0.5, 1.25]}
    got = reversed_pair(measured)
    assert got == {"a": "E", "b": "G", "context": 512, "blocks": 4, "block_steps": 8, "a_ms_per_token": 25.0,
                   "b_ms_per_token": 20.0, "ratio": 1.25, "ratios": [2.0, 1.25, 1.0, 0.8], "ratio_quartiles": [0.8, 2.0]}
    graph_first = {**measured, "a_run_ms_per_token": 19.0, "run_ratio": 0.76, "run_ratios": [0.76], "run_ratio_quartiles": [0.7, 0.8]}
    assert "run_ratio" not in reversed_pair(graph_first) and "b_run_ms_per_token" not in reversed_pair(graph_first)
    for bad in (dict(blocks=0), dict(block_steps=1), dict(processes=0), dict(processes=3), dict(threads=0)):
        with pytest.raises(PlanError):
            PairPlan(**bad)


def test_the_attention_point_times_every_variant_against_sdpa():
    """``bench.attention``: each variant of the fused op over every chunk of a prompt, and
    PyTorch's SDPA over the whole prompt, in the same rounds; ratios per round, medians."""
    from prefixkv.bench.attention import VARIANTS, measure

    got = measure(64, heads=4, kv_heads=2, head_dim=16, chunk=16, threads=1, rounds=2)
    assert set(got["seconds"]) == {*VARIANTS, "sdpa"} and all(len(s) == 2 and min(s) > 0 for s in got["seconds"].values())
    assert set(got["median_vs_sdpa"]) == set(VARIANTS) and set(got["median_vs_plain"]) == set(VARIANTS) - {"plain"}
    first = got["seconds"]["bias"][0] / got["seconds"]["sdpa"][0]
    second = got["seconds"]["bias"][1] / got["seconds"]["sdpa"][1]
    assert got["median_vs_sdpa"]["bias"] == pytest.approx((first + second) / 2)
    for flags, message in ((["--heads", "4", "--kv-heads", "3"], "--heads must be a multiple of --kv-heads, got 4 and 3"),
                           (["--chunk", "0"], "--chunk must be at least 1, got 0")):
        proc = subprocess.run([sys.executable, "-m", "prefixkv.bench.attention", "64", *flags], capture_output=True, text=True)
        assert proc.returncode == 2 and message in proc.stderr


def test_the_genai_graph_pairs_put_genais_graph_between_its_loop_and_the_full_cache_engine():
    """``paired_genai_graph``: genai's graph run from Python against genai's own loop, and the
    keep 1 engine (only a full cache: the same cache as genai's) against that graph."""
    from pathlib import Path

    from prefixkv.bench.speed import genai_graph_pairs

    engines = {1.0: Path("/e/k100"), 0.2: Path("/e/k20")}
    assert genai_graph_pairs(engines, "genai:/g/model") == {
        "genai-graph against genai": ("genai-graph:/g/model", "genai:/g/model"),
        "keep 1 against genai-graph": ("/e/k100", "genai-graph:/g/model")}
    assert list(genai_graph_pairs({0.2: Path("/e/k20")}, "genai:/g")) == ["genai-graph against genai"]
