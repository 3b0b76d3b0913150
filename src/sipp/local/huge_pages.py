"""Model weights and KV caches in transparent huge pages (Linux).

A decode reads every weight once per step, so a small model's step is a stream over
its whole file: in 4 KiB pages that is one TLB entry per 4 KiB, in 2 MiB pages one
per 2 MiB. In a virtual machine each TLB miss walks two page tables (the guest's and
the host's). Measured on SmolLM2-135M (2 vCPUs, Firecracker): weights collapsed into
2 MiB pages decoded about 4 % faster than the same weights mapped from the file or
read into 4 KiB pages (`bench/huge_page_weights.py`). A step over many sequences also
reads each one's KV cells, which llama.cpp clears (so fills) when it makes a context:
the same is done for the context's buffers.

llama.cpp has no hook between allocating its buffers and filling them, so the pages
are collapsed afterwards: `MADV_COLLAPSE` (Linux 6.1+) copies each huge-page range into
a huge page there and then. The ranges are those of the address space that became
anonymous memory during the load or the context's creation (llama.cpp's buffers:
weights read into memory or repacked for the CPU's kernels, KV caches), 16 MiB at
least, and only where every base page is already resident: a range that is mostly empty
(a heap arena, a buffer another thread has only begun to fill) would grow to whole huge
pages. The one exception is a context's compute buffer, which only its first decode
writes: the ranges new at a context's creation are marked `MADV_HUGEPAGE` as a whole, so
its pages fault in huge, and the kernel may later fill a range of it that is partly
written (at most the buffer llama.cpp sized for its largest step). Wherever any of this
is missing (another OS, THP `never` or disabled for the process, a kernel without
MADV_COLLAPSE), `available()` is False and models stay mapped from their files.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import mmap
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

__all__ = ["available", "collapsed", "fits_in_memory"]

logger = logging.getLogger("sipp.local")

MIN_REGION = 16 << 20  # smaller new mappings are not buffers worth a copy
_MADV_HUGEPAGE = 14
_MADV_COLLAPSE = 25
_THP = Path("/sys/kernel/mm/transparent_hugepage")
_SHARD = re.compile(r"-\d{5}-of-\d{5}\.gguf$")  # a split model: the other files load too
_Madvise = Callable[[int, int, int], int]


def available() -> bool:
    """Huge pages can hold weights here: Linux, THP not `never`, and MADV_COLLAPSE works
    (tried once on a scratch range)."""
    return _huge_page_size() > 0


@functools.cache
def _huge_page_size() -> int:
    """The PMD size when MADV_COLLAPSE works in this process, else 0."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        if "[never]" in (_THP / "enabled").read_text():
            return 0
        size = int((_THP / "hpage_pmd_size").read_text())
    except (OSError, ValueError):
        return 0
    madvise = _madvise()
    if madvise is None or size <= 0:
        return 0
    scratch = mmap.mmap(-1, 2 * size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        scratch.write(b"\1" * (2 * size))
        view = ctypes.c_char.from_buffer(scratch)
        start = -(-ctypes.addressof(view) // size) * size
        del view
        works = madvise(start, size, _MADV_COLLAPSE) == 0
    finally:
        scratch.close()
    return size if works else 0


def fits_in_memory(path: Path) -> bool:
    """Reading the file into memory leaves at least as much again available, in the
    machine and in the process's cgroup: a model near either limit stays mapped from its
    file, where the kernel can drop and reread its pages. A split model stays mapped."""
    if _SHARD.search(path.name):
        return False
    try:
        room = _mem_available()
        size = path.stat().st_size
    except (OSError, ValueError, IndexError):
        return False
    return size * 2 <= room


def _mem_available() -> int:
    room = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            room = int(line.split()[1]) * 1024
    # cgroup v2: what the process's group may still charge before its limit.
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            group = Path("/sys/fs/cgroup") / line[3:].lstrip("/")
            try:
                limit = (group / "memory.max").read_text().strip()
                if limit != "max":
                    used = int((group / "memory.current").read_text())
                    room = min(room, int(limit) - used)
            except (OSError, ValueError):
                pass
    return room


def _anonymous_regions() -> list[tuple[int, int]]:
    regions = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            name = fields[5].strip() if len(fields) == 6 else ""
            if fields[1].startswith("rw") and (not name or name.startswith("[anon:")):
                low, high = (int(x, 16) for x in fields[0].split("-"))
                regions.append((low, high))
    return regions


def _new_ranges(
    before: list[tuple[int, int]], after: list[tuple[int, int]]
) -> list[tuple[int, int]]:
    """The parts of `after` that no region of `before` covered: a new buffer that merged
    with an older neighbour in /proc/self/maps brings only its own addresses."""
    new = []
    old = sorted(before)
    for low, high in sorted(after):
        at = low
        for old_low, old_high in old:
            if old_high <= at or old_low >= high:
                continue
            if old_low > at:
                new.append((at, old_low))
            at = max(at, old_high)
        if at < high:
            new.append((at, high))
    return new


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        libc.madvise.restype = libc.mincore.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def _madvise() -> _Madvise | None:
    libc = _libc()
    return None if libc is None else libc.madvise


def _resident_runs(start: int, end: int, huge: int) -> list[tuple[int, int]]:
    """Runs of whole huge-page ranges in [start, end) whose every base page is resident."""
    page = mmap.PAGESIZE
    n = (end - start) // page
    vec = (ctypes.c_ubyte * n)()
    libc = _libc()
    if libc is None or libc.mincore(start, end - start, vec) != 0:
        return []
    resident = bytes(vec)
    per = huge // page
    runs: list[tuple[int, int]] = []
    for i in range(0, n, per):
        if all(b & 1 for b in resident[i : i + per]):
            low = start + i * page
            if runs and runs[-1][1] == low:
                runs[-1] = (runs[-1][0], low + huge)
            else:
                runs.append((low, low + huge))
    return runs


@contextmanager
def collapsed(enabled: bool, *, untouched: bool = False) -> Iterator[None]:
    """Around a model load or a context's creation: afterwards, put the anonymous memory
    that appeared and was filled during the body in huge pages (see the module
    docstring). With `untouched`, the rest of each new range is marked for huge pages
    too, so what a buffer is first written later comes in huge pages: a context's compute
    buffer, which its first decode fills. A failure leaves 4 KiB pages."""
    huge = _huge_page_size() if enabled else 0
    before = None
    if huge:
        with suppress(OSError):
            before = _anonymous_regions()
    yield
    madvise = _madvise()
    if before is None or madvise is None:
        return
    try:
        moved = _collapse(madvise, huge, _new_ranges(before, _anonymous_regions()), untouched)
    except (OSError, ValueError) as exc:
        logger.debug("buffers left in base pages: %s", exc)
        return
    if moved:
        logger.debug("buffers in huge pages: %d MiB", moved >> 20)


def _collapse(madvise: _Madvise, huge: int, ranges: list[tuple[int, int]], untouched: bool) -> int:
    collapsed = 0
    for low, high in ranges:
        start, end = -(-low // huge) * huge, high // huge * huge
        if end - start < MIN_REGION:
            continue
        if untouched:  # the whole range: what is written later faults in huge pages
            madvise(start, end - start, _MADV_HUGEPAGE)
        for run_start, run_end in _resident_runs(start, end, huge):
            length = run_end - run_start
            if not untouched:  # pages the run gains later come huge
                madvise(run_start, length, _MADV_HUGEPAGE)
            if madvise(run_start, length, _MADV_COLLAPSE) == 0:
                collapsed += length
            else:
                logger.debug("MADV_COLLAPSE: %s", os.strerror(ctypes.get_errno()))
    return collapsed
