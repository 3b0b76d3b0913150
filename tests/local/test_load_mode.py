"""Placement's `use_mmap` and `use_mlock` reach llama.cpp, as its load mode: the weights
are mapped from the file, read into memory, or locked there, as the config says. Each
case loads in a fresh interpreter, so no model another test keeps loaded is in its maps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sipp.local import _llama

CHILD = """
import json, re, sys
from pathlib import Path
from sipp import (ContextRuntimeConfig, LocalModelDescriptor, NativeRuntimeConfig,
    PlacementRuntimeConfig, SippClient, SippTextOptions)

path = sys.argv[1]
switch = {"unset": None, "on": True, "off": False}
placement = PlacementRuntimeConfig(use_mmap=switch[sys.argv[2]], use_mlock=switch[sys.argv[3]])
context = ContextRuntimeConfig(n_ctx=128, n_parallel=1)
with SippClient() as client:
    ref = client.add("m", LocalModelDescriptor(path, NativeRuntimeConfig(placement=placement, context=context)))
    options = SippTextOptions(max_tokens=6, temperature=0)
    text = client.query("The capital of France is", endpoint=ref, options=options).result().text
    status = Path("/proc/self/status").read_text()
    print(json.dumps({
        "mapped": path in Path("/proc/self/maps").read_text(),
        "locked_kb": int(re.search(r"VmLck:\\s+(\\d+)", status).group(1)),
        "text": text,
    }))
"""


def _load(path: Path, mmap: str, mlock: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), mmap, mlock],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    result: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return result


@pytest.fixture(scope="module")
def mapped_text(smollm_path: Path) -> object:
    return _load(smollm_path, "unset", "unset")["text"]


@pytest.mark.parametrize(
    ("mmap", "mlock", "mapped", "locked"),
    [
        ("unset", "unset", True, False),  # llama.cpp's choice on the CPU: map the file
        ("on", "unset", True, False),
        ("off", "unset", False, False),
        ("off", "on", False, True),
        ("on", "on", True, True),
    ],
)
def test_the_placement_decides_how_the_weights_are_loaded(
    smollm_path: Path, mapped_text: object, mmap: str, mlock: str, mapped: bool, locked: bool
) -> None:
    got = _load(smollm_path, mmap, mlock)
    assert got["mapped"] is mapped
    weights_kb = smollm_path.stat().st_size // 1024
    locked_kb = got["locked_kb"]
    assert isinstance(locked_kb, int)
    assert (locked_kb > weights_kb // 2) is locked, locked_kb
    assert got["text"] == mapped_text  # the same weights, however they got there


def test_a_field_the_binding_lacks_is_refused_not_ignored() -> None:
    params = _llama._lc.llama_model_default_params()
    with pytest.raises(AttributeError, match="use_mmap"):
        _llama.set_fields(params, n_gpu_layers=0, use_mmap=False)
    _llama.set_fields(params, n_gpu_layers=3)
    assert params.n_gpu_layers == 3
