"""engines.pages: the anonymous memory the runner collapses into huge pages, and only that."""
from __future__ import annotations

import ctypes
import mmap
import platform
import sys
from pathlib import Path

import numpy as np
import pytest

from prefixkv.engines import pages

MiB = 1 << 20
HUGE = pages.HUGE_PAGE


def thp_why_not() -> str | None:
    """Why this machine cannot collapse memory into huge pages, or None."""
    if sys.platform != "linux":
        return "huge pages are collapsed on Linux only"
    release = tuple(int(p) for p in platform.release().split("-")[0].split(".")[:2] if p.isdigit())
    if release < (6, 1):
        return f"MADV_COLLAPSE needs Linux 6.1, this is {platform.release()}"
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not mode.exists() or "[never]" in mode.read_text():
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
    assert pages.block_runs([6 * MiB, 0, HUGE, 10 * MiB, 8 * MiB]) == [(0, 4 * MiB), (6 * MiB, 12 * MiB)]
    assert pages.block_runs(set()) == []


def test_a_block_counts_once_it_is_resident_and_a_barely_touched_one_does_not():
    if sys.platform != "linux":
        pytest.skip("mincore and /proc/self/maps are Linux's")
    before = pages.resident_blocks()
    region = mmap.mmap(-1, 12 * MiB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # untouched: nothing resident
    start = address(region)
    first = -(-start // HUGE) * HUGE  # the region's first whole block
    blocks = [first + k * HUGE for k in range(4)]
    region[first - start] = 1  # one small page of the first block
    region[first - start + HUGE : first - start + 3 * HUGE] = b"\x01" * (2 * HUGE)  # the second and third whole
    new = pages.resident_blocks() - before
    assert blocks[1] in new and blocks[2] in new
    assert blocks[0] not in new and blocks[3] not in new
    region.close()


def test_collapsing_keeps_the_bytes_and_moves_them_into_huge_pages():
    why = thp_why_not()
    if why:
        pytest.skip(why)
    before = pages.resident_blocks()
    region = mmap.mmap(-1, 10 * MiB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    data = np.random.default_rng(0).integers(0, 256, 10 * MiB, dtype=np.uint8).tobytes()
    region[:] = data
    new = pages.resident_blocks() - before
    start = address(region)
    ours = {b for b in new if start <= b < start + 10 * MiB}
    assert len(ours) >= 4  # 10 MiB hold at least four whole 2 MiB blocks
    moved = pages.collapse(ours)
    assert moved >= HUGE, "the kernel collapsed none of a resident anonymous region"
    assert region[:] == data
    region.close()


def test_an_onnx_runtime_sessions_packed_weights_become_huge_pages_and_compute_the_same(tmp_path):
    why = thp_why_not()
    if why:
        pytest.skip(why)
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(1).standard_normal((1024, 2048)).astype(np.float32)  # 8 MiB, packed by the session
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1024])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2048])],
        [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = np.random.default_rng(2).standard_normal((1, 1024)).astype(np.float32)
    pages.release_freed_heap()
    before = pages.resident_blocks()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = session.run(None, {"x": x})[0]
    new = pages.resident_blocks() - before
    assert len(new) >= 2
    assert pages.collapse(new) >= HUGE
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], want)


def test_the_runner_collapses_only_where_asked_and_decodes_the_same(tmp_path_factory):
    from test_export import tiny_engine

    from prefixkv.engines.onnxruntime import OnnxRuntimeRunner

    engine_dir = tiny_engine(tmp_path_factory.getbasetemp())[0]
    small = OnnxRuntimeRunner(engine_dir, threads=1, huge_pages=False)
    huge = OnnxRuntimeRunner(engine_dir, threads=1)
    assert small.huge_page_bytes == 0 and huge.huge_page_bytes >= 0
    ids, mask = small.pad([[5, 6, 7, 8, 9, 10, 11, 12]])
    (a, state_a), (b, state_b) = small.prefill(ids, mask), huge.prefill(ids, mask)
    for _ in range(4):
        np.testing.assert_array_equal(a, b)
        (a, state_a), (b, state_b) = small.decode(state_a, a.argmax(-1)), huge.decode(state_b, b.argmax(-1))
    np.testing.assert_array_equal(a, b)
