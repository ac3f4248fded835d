"""engines.pages: the anonymous memory the runner collapses into huge pages, and only that."""
from __future__ import annotations

import ctypes
import json
import mmap
import platform
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from prefixkv.engines import pages

MiB = 1 << 20
HUGE = pages.huge_page_size()
MADV_NOHUGEPAGE = 15  # linux/mman.h


def linux_why_not() -> str | None:
    """Why this machine cannot answer which pages are resident, or None."""
    if sys.platform != "linux" or pages._libc() is None:
        return "resident pages are asked on Linux with glibc only"
    if HUGE > 8 * MiB:
        return f"huge pages of {HUGE >> 20} MiB are more than these tests map"
    return None


def thp_why_not() -> str | None:
    """Why this machine cannot collapse memory into huge pages, or None."""
    why = linux_why_not()
    if why:
        return why
    release = tuple(int(p) for p in platform.release().split("-")[0].split(".")[:2] if p.isdigit())
    if release < (6, 1):
        return f"MADV_COLLAPSE needs Linux 6.1, this is {platform.release()}"
    if pages.thp_mode() in (None, "never"):
        return "transparent huge pages are off on this machine"
    return None


def address(buffer) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def test_only_private_anonymous_read_write_mappings_count():
    maps = "\n".join([
        "55d0c0000000-55d0c0400000 rw-p 00000000 00:00 0                          [heap]",
        "7f0000000000-7f0000800000 rw-p 00000000 00:00 0 ",
        "7f0000800000-7f0000a00000 r--p 00000000 00:00 0 ",  # read-only
        "7f0000a00000-7f0000c00000 rw-s 00000000 00:01 1234                       /dev/shm/x",  # shared, a file
        "7f0000c00000-7f0000e00000 rw-p 00001000 08:01 42                         /usr/lib/libfoo.so",  # a file's data
        "7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]",
        "7f0001000000-7f0001200000 rw-p 00000000 00:00 0                          [anon:some name]",
        "",
    ])
    assert pages.anonymous_regions(maps) == [(0x55D0C0000000, 0x55D0C0400000), (0x7F0000000000, 0x7F0000800000)]


def test_adjacent_blocks_are_asked_for_as_one_run():
    two = 2 * MiB
    assert pages.block_runs([6 * MiB, 0, two, 10 * MiB, 8 * MiB], two) == [(0, 4 * MiB), (6 * MiB, 12 * MiB)]
    assert pages.block_runs(set(), two) == []


def test_a_block_counts_once_it_is_resident_and_a_barely_touched_one_does_not():
    why = linux_why_not()
    if why:
        pytest.skip(why)
    before = pages.resident_blocks()
    region = mmap.mmap(-1, 6 * HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # untouched: nothing resident
    start = address(region)
    # small pages only, so that a touched byte is a small page's worth whatever the THP mode (``always`` would fault in a huge one)
    pages._libc().madvise(start, 6 * HUGE, MADV_NOHUGEPAGE)
    first = -(-start // HUGE) * HUGE  # the region's first whole block
    blocks = [first + k * HUGE for k in range(4)]
    region[first - start] = 1  # one small page of the first block
    region[first - start + HUGE : first - start + 3 * HUGE] = b"\x01" * (2 * HUGE)  # the second and third whole
    new = pages.resident_blocks() - before
    assert blocks[1] in new and blocks[2] in new
    assert blocks[0] not in new and blocks[3] not in new
    region.close()


def in_fresh_process(body: str) -> dict:
    """Run ``body`` (Python printing one JSON line last) in a fresh interpreter, so that the
    process's huge-page count is the test's alone: in the suite's own process, memory that
    earlier tests collapsed is freed and given back meanwhile, and the count falls."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(body)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_collapsing_keeps_the_bytes_and_moves_them_into_huge_pages():
    why = thp_why_not()
    if why:
        pytest.skip(why)
    got = in_fresh_process("""
        import ctypes, json, mmap
        import numpy as np
        from prefixkv.engines import pages
        size = 5 * pages.huge_page_size()
        data = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
        before, huge = pages.resident_blocks(), pages.huge_page_bytes()
        region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        region[:] = data
        start = ctypes.addressof(ctypes.c_char.from_buffer(region))
        ours = {b for b in pages.resident_blocks() - before if start <= b < start + size}
        pages.collapse(ours)
        print(json.dumps({"blocks": len(ours), "gained": pages.huge_page_bytes() - huge, "same": region[:] == data}))
    """)
    assert got["blocks"] >= 4  # five pages' worth hold at least four whole blocks
    # in huge pages now: by the collapse, or (THP ``always``) already when the pages were written
    assert got["gained"] >= HUGE, "none of a resident anonymous region is in huge pages"
    assert got["same"]


def test_an_onnx_runtime_sessions_packed_weights_become_huge_pages_and_compute_the_same():
    why = thp_why_not()
    if why:
        pytest.skip(why)
    got = in_fresh_process("""
        import json
        import numpy as np
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
        from prefixkv.engines import pages
        weight = np.random.default_rng(1).standard_normal((1024, 2048)).astype(np.float32)  # 8 MiB, packed by the session
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1024])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2048])],
            [numpy_helper.from_array(weight, "w")])
        serialized = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()
        x = np.random.default_rng(2).standard_normal((1, 1024)).astype(np.float32)
        huge = pages.huge_page_bytes()
        before = pages.before_loading()  # the graph's bytes are older: only the session's memory is new
        session = ort.InferenceSession(serialized, providers=["CPUExecutionProvider"])
        want = session.run(None, {"x": x})[0]
        pages.after_loading(before)
        same = bool(np.array_equal(session.run(None, {"x": x})[0], want))
        print(json.dumps({"gained": pages.huge_page_bytes() - huge, "same": same}))
    """)
    assert got["gained"] >= HUGE  # of the 8 MiB it packed
    assert got["same"]


def test_the_runner_collapses_only_where_asked_and_decodes_the_same(tmp_path_factory, monkeypatch):
    from test_export import tiny_engine

    from prefixkv.engines.onnxruntime import OnnxRuntimeRunner

    engine_dir = tiny_engine(tmp_path_factory.getbasetemp())[0]
    asked = []
    collapse = pages.collapse
    monkeypatch.setattr(pages, "collapse", lambda blocks: asked.append(len(blocks)) or collapse(blocks))
    small = OnnxRuntimeRunner(engine_dir, threads=1, huge_pages=False)
    assert asked == [] and small.huge_page_bytes == 0
    huge = OnnxRuntimeRunner(engine_dir, threads=1)
    assert len(asked) == 1 and huge.huge_page_bytes >= 0
    ids, mask = small.pad([[5, 6, 7, 8, 9, 10, 11, 12]])
    (a, state_a), (b, state_b) = small.prefill(ids, mask), huge.prefill(ids, mask)
    for _ in range(4):
        np.testing.assert_array_equal(a, b)
        (a, state_a), (b, state_b) = small.decode(state_a, a.argmax(-1)), huge.decode(state_b, b.argmax(-1))
    np.testing.assert_array_equal(a, b)
