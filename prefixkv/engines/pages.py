"""The process's memory as the CPU runner manages it: the heap that loading freed given back,
and an engine's weights in 2 MiB pages (Linux transparent huge pages).

A CPU decode step at batch 1 streams every weight once: SmolLM2's 540 MB through the TLB
in 4 KiB pages.  ONNX Runtime packs the weights into anonymous memory it allocates while
the session loads.  So the runner notes which 2 MiB blocks of the process's anonymous memory
are resident before loading (``resident_blocks``, after giving the freed heap back, so that
memory loading reuses counts as new), and afterwards asks the kernel to collapse the blocks
that became resident into huge pages (``madvise(MADV_COLLAPSE)``, Linux 6.1 on, whatever the
system's THP mode is short of ``never``).  Nothing is copied by prefixkv and nothing changes
but the page size: the same bytes at the same addresses.  Only blocks already almost all
resident are asked for (a thread's stack, mostly untouched, is not), so the resident memory
stays what it was.  Elsewhere (another OS, an older kernel, THP off) the kernel refuses and the
weights stay in small pages, as before.

``anonymous_regions`` and ``block_runs`` are pure; the rest asks the kernel about this
process.  Imports the standard library only (this module runs inside Triton's Python backend).
"""
from __future__ import annotations

import ctypes
import mmap

HUGE_PAGE = 2 << 20  # x86-64 and arm64 with 4 KiB base pages: one page-middle-directory entry maps 2 MiB
MADV_COLLAPSE = 25  # linux/mman.h
RESIDENT = 0.9  # the share of a block's small pages that must be resident for it to count


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


def block_runs(blocks, page: int = HUGE_PAGE) -> list[tuple[int, int]]:
    """The block addresses ``blocks`` (each the start of ``page`` bytes) as [start, stop) runs of adjacent blocks."""
    runs: list[tuple[int, int]] = []
    for a in sorted(blocks):
        if runs and runs[-1][1] == a:
            runs[-1] = (runs[-1][0], a + page)
        else:
            runs.append((a, a + page))
    return runs


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:  # not glibc
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
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


def resident_blocks(page: int = HUGE_PAGE) -> set[int]:
    """The ``page``-aligned blocks of this process's anonymous memory at least ``RESIDENT``
    resident, by ``mincore``; none where the kernel cannot be asked."""
    libc = _libc()
    try:
        with open("/proc/self/maps") as maps:
            regions = anonymous_regions(maps.read())
    except OSError:
        return set()
    if libc is None:
        return set()
    per_block, blocks = page // mmap.PAGESIZE, set()
    for start, stop in regions:
        start, stop = -(-start // page) * page, stop // page * page
        if stop <= start:
            continue
        vector = ctypes.create_string_buffer((stop - start) // mmap.PAGESIZE)
        if libc.mincore(start, stop - start, vector) != 0:  # unmapped meanwhile
            continue
        resident = vector.raw  # a byte per small page, 1 where resident (the other bits are reserved, 0)
        for block in range((stop - start) // page):
            if per_block - resident.count(0, block * per_block, (block + 1) * per_block) >= RESIDENT * per_block:
                blocks.add(start + block * page)
    return blocks


def huge_bytes() -> int:
    """This process's anonymous memory in huge pages (``AnonHugePages``; 0 where it cannot be read)."""
    try:
        with open("/proc/self/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def collapse(blocks) -> int:
    """Ask the kernel to back the blocks (``resident_blocks`` addresses) with huge pages; the
    bytes of the process that moved into huge pages meanwhile (0 where none could: not Linux,
    a kernel before 6.1, THP ``never``).  Each run of adjacent blocks is asked alone, and a
    refusal is not an error: the kernel may collapse most of a run and refuse the rest (no
    huge page free), so what moved is read back rather than taken from the calls' results."""
    libc = _libc()
    if libc is None or not blocks:
        return 0
    start = huge_bytes()
    for a, b in block_runs(blocks):
        libc.madvise(a, b - a, MADV_COLLAPSE)
    return max(0, huge_bytes() - start)
