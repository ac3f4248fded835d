"""The process's memory as the CPU runner manages it: the heap that loading freed given back,
and an engine's weights in huge pages (Linux transparent huge pages, 2 MiB on x86-64).

A CPU decode step at batch 1 streams every weight once: SmolLM2's 540 MB through the TLB
in 4 KiB pages.  ONNX Runtime packs the weights into anonymous memory it allocates while
the session loads.  So the runner notes which huge-page blocks of the process's anonymous
memory are resident before loading (``before_loading``, after giving the freed heap back, so
that memory loading reuses counts as new), and afterwards asks the kernel to collapse the
blocks that became resident into huge pages (``after_loading``: ``madvise(MADV_COLLAPSE)``,
Linux 6.1 on).  Nothing is copied by prefixkv and nothing changes but the page size: the same
bytes at the same addresses.  Only blocks already at least ``RESIDENT`` resident are asked
for (a thread's stack, mostly untouched, is not), so the resident memory grows by at most the
rest of those blocks (SmolLM2: 468 kB for 512 MiB collapsed).  Where the system's THP mode is
``never`` nothing is asked (the call itself ignores that mode on many kernels), and where the
kernel refuses (another OS, a kernel before 6.1) the weights stay in small pages, as before.

``anonymous_regions`` and ``block_runs`` are pure; the rest asks the kernel about this
process, and never raises.  Imports the standard library only (this module runs inside
Triton's Python backend).
"""
from __future__ import annotations

import ctypes
import mmap
from functools import lru_cache
from pathlib import Path

MADV_COLLAPSE = 25  # linux/mman.h
RESIDENT = 0.9  # the share of a block's small pages that must be resident for it to count
THP = Path("/sys/kernel/mm/transparent_hugepage")
WINDOW = 1 << 30  # bytes of a region asked about per mincore call (its answer: one byte per small page)


@lru_cache(maxsize=None)
def huge_page_size() -> int:
    """The kernel's transparent huge page (one page-middle-directory entry): 2 MiB on x86-64
    and on arm64 with 4 KiB pages; 2 MiB where the kernel does not say."""
    try:
        return int((THP / "hpage_pmd_size").read_text())
    except (OSError, ValueError):
        return 2 << 20


def thp_mode() -> str | None:
    """The system's THP mode (``always``, ``madvise`` or ``never``), or None where there is none to read."""
    try:
        text = (THP / "enabled").read_text()
    except OSError:
        return None
    start, stop = text.find("["), text.find("]")
    return text[start + 1 : stop] if 0 <= start < stop else None


def anonymous_regions(maps: str) -> list[tuple[int, int]]:
    """The private anonymous read-write mappings, [start, stop), in a ``/proc/PID/maps`` text:
    no file behind them (glibc's heap and its mmap'd chunks, where ONNX Runtime's packed
    weights live)."""
    regions = []
    for line in maps.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        name = fields[5] if len(fields) > 5 else ""
        if fields[1].startswith("rw") and fields[1].endswith("p") and fields[4] == "0" and name in ("", "[heap]"):
            start, stop = (int(x, 16) for x in fields[0].split("-"))
            regions.append((start, stop))
    return regions


def block_runs(blocks, page: int) -> list[tuple[int, int]]:
    """The block addresses ``blocks`` (each the start of ``page`` bytes) as [start, stop) runs of adjacent blocks."""
    runs: list[tuple[int, int]] = []
    for a in sorted(blocks):
        if runs and runs[-1][1] == a:
            runs[-1] = (runs[-1][0], a + page)
        else:
            runs.append((a, a + page))
    return runs


@lru_cache(maxsize=None)
def _libc():
    """glibc with the three calls used here typed, or None (not glibc, or a shim without them);
    opened once per process."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


def release_freed_heap() -> None:
    """Give the heap memory that was freed back to the OS (glibc's ``malloc_trim``; a no-op
    elsewhere).  Creating a session parses, optimizes and packs the graph in temporary
    buffers; glibc keeps such freed memory for later allocations, so it stays resident.
    SmolLM2's engine: 708,882,432 -> 678,612,992 bytes of RSS after loading (``bench.point``,
    ``docs/engine_v2.md``)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def resident_blocks() -> set[int]:
    """The huge-page blocks of this process's anonymous memory at least ``RESIDENT``
    resident, by ``mincore``; none where the kernel cannot be asked."""
    libc, page = _libc(), huge_page_size()
    if libc is None:
        return set()
    try:
        with open("/proc/self/maps") as maps:
            regions = anonymous_regions(maps.read())
        small = mmap.PAGESIZE
        per_block, blocks = page // small, set()
        vector = ctypes.create_string_buffer(WINDOW // small)
        for start, stop in regions:
            start, stop = -(-start // page) * page, stop // page * page
            for window in range(start, stop, WINDOW):
                length = min(WINDOW, stop - window)
                if libc.mincore(window, length, vector) != 0:  # unmapped meanwhile
                    break
                resident = memoryview(vector)[: length // small].tobytes()  # a byte per small page, 1 where resident
                for block in range(length // page):
                    if per_block - resident.count(0, block * per_block, (block + 1) * per_block) >= RESIDENT * per_block:
                        blocks.add(window + block * page)
        return blocks
    except (OSError, ValueError, MemoryError):
        return set()


def huge_page_bytes() -> int:
    """This process's anonymous memory in huge pages (``AnonHugePages``; 0 where it cannot be read)."""
    try:
        with open("/proc/self/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def collapse(blocks) -> int:
    """Ask the kernel to back the blocks (``resident_blocks`` addresses) with huge pages; the
    bytes of the process that moved into huge pages meanwhile (0 where none could: not Linux,
    a kernel before 6.1, THP ``never``, where nothing is asked).  Each run of adjacent blocks
    is asked alone, and a refusal is not an error: the kernel may collapse most of a run and
    refuse the rest (no huge page free), so what moved is read back rather than taken from
    the calls' results."""
    libc = _libc()
    if libc is None or not blocks or thp_mode() == "never":
        return 0
    start = huge_page_bytes()
    for a, b in block_runs(blocks, huge_page_size()):
        libc.madvise(a, b - a, MADV_COLLAPSE)
    return max(0, huge_page_bytes() - start)


def before_loading() -> set[int]:
    """Called before a session loads: the freed heap given back, then ``resident_blocks``."""
    release_freed_heap()
    return resident_blocks()


def after_loading(before: set[int]) -> int:
    """Called after the session loaded (``before``: ``before_loading``'s blocks): the heap
    that loading freed given back, then the blocks that became resident collapsed; the bytes
    that moved into huge pages (``collapse``)."""
    release_freed_heap()
    return collapse(resident_blocks() - before)
