"""Placement's `use_mmap` and `use_mlock` reach llama.cpp, as its load mode: the weights
are mapped from the file, read into memory, or locked there, as the config says; left
unset, a model that fits in memory is read into it and put in huge pages. Each case
loads in a fresh interpreter, so no model another test keeps loaded is in its maps."""

from __future__ import annotations

import ctypes
import json
import mmap
import subprocess
import sys
from pathlib import Path

import llama_cpp
import pytest

from sipp.local import _llama, huge_pages

# Linux with THP not "never" and MADV_COLLAPSE: the hosts CI runs on. Where it is
# False, the cases below expect weights mapped from the file.
HUGE_PAGES = huge_pages.available()
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
THP_MADVISE, THP_ALWAYS = "[madvise]" in THP_ENABLED, "[always]" in THP_ENABLED

CHILD = """
import json, re, sys
from pathlib import Path
from sipp import (ContextRuntimeConfig, LocalModelDescriptor, NativeRuntimeConfig,
    PlacementRuntimeConfig, SippClient, SippTextOptions)

path = sys.argv[1]
switch = {"unset": None, "on": True, "off": False}
placement = PlacementRuntimeConfig(use_mmap=switch[sys.argv[2]], use_mlock=switch[sys.argv[3]])
context = ContextRuntimeConfig(n_ctx=int(sys.argv[4]), n_parallel=1)
with SippClient() as client:
    ref = client.add("m", LocalModelDescriptor(path, NativeRuntimeConfig(placement=placement, context=context)))
    options = SippTextOptions(max_tokens=6, temperature=0)
    text = client.query("The capital of France is", endpoint=ref, options=options).result().text
    status = Path("/proc/self/status").read_text()
    rollup = Path("/proc/self/smaps_rollup").read_text()
    print(json.dumps({
        "mapped": path in Path("/proc/self/maps").read_text(),
        "locked_kb": int(re.search(r"VmLck:\\s+(\\d+)", status).group(1)),
        "huge_kb": int(re.search(r"AnonHugePages:\\s+(\\d+)", rollup).group(1)),
        "text": text,
    }))
"""


def _load(path: Path, mmap: str, mlock: str, n_ctx: int = 128) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), mmap, mlock, str(n_ctx)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    result: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return result


@pytest.fixture(scope="module")
def default_text(smollm_path: Path) -> object:
    return _load(smollm_path, "unset", "unset")["text"]


@pytest.mark.parametrize(
    ("mmap", "mlock", "mapped", "locked", "huge"),
    [
        # Unset: read into memory and put in huge pages where the host has them, else
        # llama.cpp's choice on the CPU (map the file).
        ("unset", "unset", not HUGE_PAGES, False, HUGE_PAGES),
        ("on", "unset", True, False, False),
        ("off", "unset", False, False, HUGE_PAGES),
        ("off", "on", False, True, HUGE_PAGES),
        ("on", "on", True, True, False),
    ],
)
def test_the_placement_decides_how_the_weights_are_loaded(
    smollm_path: Path,
    default_text: object,
    mmap: str,
    mlock: str,
    mapped: bool,
    locked: bool,
    huge: bool,
) -> None:
    got = _load(smollm_path, mmap, mlock)
    assert got["mapped"] is mapped
    weights_kb = smollm_path.stat().st_size // 1024
    locked_kb, huge_kb = got["locked_kb"], got["huge_kb"]
    assert isinstance(locked_kb, int) and isinstance(huge_kb, int)
    assert (locked_kb > weights_kb // 2) is locked, locked_kb
    # Mapped weights stay in the file's 4 KiB pages (a few MiB of other memory may be
    # huge anyway: the Python heap, a KV cache).
    assert (huge_kb > weights_kb * 3 // 4) is huge, huge_kb
    assert got["text"] == default_text  # the same weights, however they got there


def test_a_context_s_kv_cache_goes_in_huge_pages_with_the_weights(smollm_path: Path) -> None:
    # SmolLM2-135M keeps 30 layers x (K + V) x 192 f16 values a cell: 4,096 cells take
    # 90 MiB, 128 cells 2.8 MiB (too small a buffer to copy). Mapped weights too: the
    # context's memory is the process's own either way.
    small = _load(smollm_path, "on", "unset", n_ctx=128)["huge_kb"]
    large = _load(smollm_path, "on", "unset", n_ctx=4096)["huge_kb"]
    assert isinstance(small, int) and isinstance(large, int)
    kv_kb = 30 * 2 * 192 * 2 * 4096 // 1024
    if HUGE_PAGES:
        assert large - small >= kv_kb * 3 // 4, (small, large)
    elif not THP_ALWAYS:  # nothing asked the kernel for huge pages
        assert large - small < kv_kb // 4, (small, large)


def test_a_field_the_binding_lacks_is_refused_not_ignored() -> None:
    params = llama_cpp.llama_model_default_params()
    with pytest.raises(AttributeError, match="use_mmap"):
        _llama.set_fields(params, n_gpu_layers=0, use_mmap=False)
    _llama.set_fields(params, n_gpu_layers=3)
    assert params.n_gpu_layers == 3


def test_anonymous_memory_allocated_during_the_body_ends_in_huge_pages() -> None:
    size = 32 << 20
    control = _filled(size)  # outside: under THP "madvise" it keeps its 4 KiB pages
    with huge_pages.collapsed(True):
        region = _filled(size)  # populated in 4 KiB pages, as a file read leaves it
    if THP_MADVISE:
        assert _huge_kb_of(_address(control)) == 0
    assert _huge_kb_of(_address(region)) >= 28 << 10  # all but the unaligned ends
    assert region[:1] == b"w" and region[size - 1 :] == b"w"  # the contents moved intact
    control.close()
    region.close()


def test_untouched_new_memory_gets_huge_pages_when_it_is_first_written() -> None:
    """A context's compute buffer is only written by its first decode: with
    `untouched`, the pages it gets then come huge."""
    size = 32 << 20
    control = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with huge_pages.collapsed(True, untouched=True):
        region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    assert _resident_pages(region) == 0  # nothing was filled on its behalf
    for m in (control, region):
        m.write(b"c" * size)
    if THP_MADVISE:
        assert _huge_kb_of(_address(control)) == 0
    if HUGE_PAGES:
        assert _huge_kb_of(_address(region)) >= 28 << 10
    control.close()
    region.close()


def test_a_sparse_neighbour_of_a_new_buffer_is_not_filled() -> None:
    """A new buffer may merge in /proc/self/maps with an older region next to it; only
    the new addresses are collapsed, and never a range with pages missing, which a
    collapse would fill to a whole huge page."""
    sparse = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for offset in range(0, 64 << 20, 2 << 20):
        sparse[offset] = 1  # one base page in each 2 MiB
    before = _resident_pages(sparse)
    with huge_pages.collapsed(True):
        region = _filled(32 << 20)
        half = mmap.mmap(-1, 32 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        half.write(b"h" * (16 << 20))  # a buffer only half filled by the end of the load
    assert _resident_pages(sparse) == before == 32
    assert _resident_pages(half) <= (16 << 20) // mmap.PAGESIZE + 1
    assert _huge_kb_of(_address(region)) >= 28 << 10
    for m in (sparse, region, half):
        m.close()


def test_fits_in_memory_only_with_as_much_again_to_spare(tmp_path: Path) -> None:
    small = tmp_path / "small.gguf"
    small.write_bytes(b"GGUF")
    assert huge_pages.fits_in_memory(small)
    # A split model's first file stands for files the check does not see.
    assert not huge_pages.fits_in_memory(tmp_path / "model-00001-of-00003.gguf")
    total_kb = int(Path("/proc/meminfo").read_text().split()[1])  # MemTotal, first line
    large = tmp_path / "large.gguf"
    with large.open("wb") as sparse:  # takes no disk space
        sparse.truncate(total_kb * 1024)
    assert not huge_pages.fits_in_memory(large)


def _filled(size: int) -> mmap.mmap:
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.write(b"w" * size)
    return region


def _address(region: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(region))


def _resident_pages(region: mmap.mmap) -> int:
    n = len(region) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * n)()
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mincore(ctypes.c_void_p(_address(region)), ctypes.c_size_t(len(region)), vec) == 0
    return sum(b & 1 for b in bytes(vec))


def _huge_kb_of(address: int) -> int:
    """AnonHugePages of the mapping that holds `address`, from /proc/self/smaps."""
    found, huge = False, 0
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            low, high = (int(x, 16) for x in head.split("-"))
            found = low <= address < high
        elif found and line.startswith("AnonHugePages:"):
            huge = int(line.split()[1])
    return huge
