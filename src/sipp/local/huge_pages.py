"""Model weights in transparent huge pages (Linux).

A decode reads every weight once per step, so a small model's step is a stream over
its whole file: in 4 KiB pages that is one TLB entry per 4 KiB, in 2 MiB pages one
per 2 MiB. In a virtual machine each TLB miss walks two page tables (the guest's and
the host's). Measured on SmolLM2-135M (2 vCPUs, Firecracker): weights collapsed into
2 MiB pages decode about 3 % faster than the same weights mapped from the file or
read into 4 KiB pages (`bench/huge_page_weights.py`).

llama.cpp has no hook between allocating its weight buffers and filling them, so the
pages are collapsed after loading: `MADV_COLLAPSE` (Linux 6.1+) copies each 2 MiB
range into a huge page there and then. The regions are the anonymous mappings that
appeared during the load and are large enough to be weight buffers (read into memory,
or repacked for the CPU's kernels). Wherever any of this is missing (another OS, THP
set to `never`, an older kernel), loading goes on as before.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["available", "fits_in_memory", "weights_collapsed"]

logger = logging.getLogger("sipp.local")

HUGE = 2 << 20  # x86-64 and arm64 (4 KiB base pages) PMD size
MIN_REGION = 16 << 20  # smaller new mappings are not weight buffers worth a copy
_MADV_HUGEPAGE = 14
_MADV_COLLAPSE = 25
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def available() -> bool:
    """Transparent huge pages are on for regions that ask for them."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return "[never]" not in _THP.read_text()
    except OSError:
        return False


def fits_in_memory(path: Path) -> bool:
    """Reading the file into memory leaves at least as much again available: a model
    near the machine's memory stays mapped from its file, where the kernel can page it."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return path.stat().st_size * 2 <= int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return False


def _anonymous_regions() -> set[tuple[int, int]]:
    regions = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) == 5 and fields[1].startswith("rw"):  # no path: anonymous
                low, high = (int(x, 16) for x in fields[0].split("-"))
                regions.add((low, high))
    return regions


def _madvise() -> Callable[[int, int, int], int] | None:
    try:
        call = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    call.restype = ctypes.c_int
    return call


@contextmanager
def weights_collapsed(enabled: bool) -> Iterator[None]:
    """Around a model load: afterwards, put the large anonymous regions that appeared
    during the body into huge pages. Anything that fails only leaves 4 KiB pages."""
    if not enabled:
        yield
        return
    try:
        before = _anonymous_regions()
    except OSError:
        yield
        return
    yield
    madvise = _madvise()
    if madvise is None:
        return
    collapsed = 0
    for low, high in sorted(_anonymous_regions() - before):
        start, end = -(-low // HUGE) * HUGE, high // HUGE * HUGE
        if end - start < MIN_REGION:
            continue
        # MADV_HUGEPAGE first: where MADV_COLLAPSE is missing, khugepaged may still
        # collapse the region later; and pages the region gains later come huge.
        madvise(start, end - start, _MADV_HUGEPAGE)
        if madvise(start, end - start, _MADV_COLLAPSE) == 0:
            collapsed += end - start
        else:
            logger.debug("MADV_COLLAPSE: %s", os.strerror(ctypes.get_errno()))
    if collapsed:
        logger.debug("weights in huge pages: %d MiB", collapsed >> 20)
