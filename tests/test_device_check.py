"""scripts/device_check.py --dry-run: the GPU check's code runs on the CPU (tiny shapes, the Triton
interpreter) and reports only passes or skips with a reason, in a JSON and a PNG."""
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "device_check.py"


def _triton_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_check")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    # run from outside the repository: the script puts the repo root on sys.path itself
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--output", str(out / "results")],
                          cwd=out, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    data = json.loads((out / "results" / "device_check.json").read_text())
    return out / "results", data, done.stdout


def test_json_structure(dry_run):
    _, data, _ = dry_run
    assert data["schema"] == "prefixkv.device-check" and data["mode"] == "dry-run"
    datetime.datetime.fromisoformat(data["date"])
    env = data["environment"]
    for key in ("torch", "triton", "transformers", "device_name", "device"):
        assert key in env, key
    assert env["device"] == "cpu" and env["torch"]
    assert data["config"]["dry_run"] is True
    assert {c["section"] for c in data["checks"]} >= {"kernels", "cache", "speed", "output"}
    for check in data["checks"]:
        assert set(check) >= {"name", "section", "status", "reason", "seconds", "details"}, check
    counts = data["summary"]
    assert counts["passed"] + counts["failed"] + counts["skipped"] == len(data["checks"])
    assert len(counts["lines"]) == len(data["checks"])
    paper = data["speed"]["paper"]
    assert (paper["full_s"], paper["prefixkv_s"]) == (30.7, 16.8)
    assert paper["speedup"] == pytest.approx(30.7 / 16.8)


def test_every_check_passed_or_skipped_with_a_reason(dry_run):
    _, data, stdout = dry_run
    failed = [(c["name"], c["reason"]) for c in data["checks"] if c["status"] == "failed"]
    assert not failed, failed
    for check in data["checks"]:
        assert check["status"] in ("passed", "skipped"), check
        if check["status"] == "skipped":
            assert check["reason"] and len(check["reason"]) > 10, check
    for line in data["summary"]["lines"]:  # one summary line per check, printed
        assert line in stdout
    assert "summary:" in stdout and " 0 failed" in stdout


@pytest.mark.skipif(not _triton_available(), reason="without triton the kernel checks are skipped (reason checked above)")
def test_the_kernels_really_ran_in_the_interpreter(dry_run):
    _, data, _ = dry_run
    assert data["environment"]["triton_interpreter"] is True
    by_name = {c["name"]: c for c in data["checks"]}
    kernels = [c for c in data["checks"] if c["section"] == "kernels"]
    assert kernels and all(c["status"] == "passed" for c in kernels), [c["name"] for c in kernels if c["status"] != "passed"]
    for check in kernels:
        details = check["details"]
        assert isinstance(details["max_abs_error"], float) and details["parts"], check["name"]
    assert any(n.startswith("cache/kernel_path_vs_reference[") and c["status"] == "passed" for n, c in by_name.items())


def test_speed_points_measured(dry_run):
    _, data, _ = dry_run
    measured = [c for c in data["checks"] if c["name"].startswith(("speed/paper_setting[", "speed/sweep["))
                and c["status"] == "passed"]
    assert measured, "no speed point was measured in the dry run"
    for check in measured:
        d = check["details"]
        assert d["prefill_s"] > 0 and d["decode_tokens_per_s"] > 0 and d["kv_bytes_after_prefill"] > 0, check["name"]
        assert d["point"]["path"] in ("reference", "kernels", "profile")
    assert data["speed"]["table"], "the speed table is empty"
    reference = [c for c in measured if c["details"]["point"]["path"] == "reference"]
    assert {c["details"]["point"]["keep"] for c in reference} >= {1.0, 0.2}


def test_png_written(dry_run):
    folder, data, _ = dry_run
    png = folder / "device_check.png"
    assert data["outputs"]["png"] == str(png)
    head = png.read_bytes()[:8]
    assert head == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_without_cuda_and_without_dry_run_is_a_one_line_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the real check would run")
    done = subprocess.run([sys.executable, str(SCRIPT), "--output", str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--dry-run" in lines[0], done.stderr
    assert not (tmp_path / "device_check.json").exists()
