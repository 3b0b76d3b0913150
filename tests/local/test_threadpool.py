"""Contexts keep their ggml worker threads (a pool attached at creation) instead of
ggml starting and joining them on every decode; the pool must come from the ggml CPU
library llama.cpp itself loaded, or its workers run kernels whose tables were never
initialised (Qwen2.5's repacked Q4_K weights then decode to garbage)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sipp import (
    ContextRuntimeConfig,
    LocalModelDescriptor,
    NativeRuntimeConfig,
    PlacementRuntimeConfig,
    SippClient,
    SippTextOptions,
)
from sipp.local import _llama

from .test_engine import PROMPTS

GREEDY = SippTextOptions(max_tokens=24, temperature=0)


def _texts(path: Path, threads: int) -> tuple[list[str], int]:
    config = NativeRuntimeConfig(
        # Weight repacking on, as on every host without AMX: the kernels it picks use
        # ggml's lookup tables.
        placement=PlacementRuntimeConfig(use_extra_bufts=True),
        context=ContextRuntimeConfig(n_ctx=256, n_parallel=4, n_threads=threads),
    )
    with SippClient() as client:
        ref = client.add("m", LocalModelDescriptor(path, config))
        # One at a time: requests batched together get float sums that depend on
        # how they happened to share steps, and a near-tie can then flip.
        texts = [client.query(p, endpoint=ref, options=GREEDY).result().text for p in PROMPTS[:4]]
        engine = client._registry._endpoints[ref.id]._engine  # type: ignore[attr-defined]
        pools = len(engine.ctx._pools)
    return texts, pools


def test_a_pooled_context_decodes_what_ggml_default_threads_decode(
    qwen_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pooled, pools = _texts(qwen_path, 2)
    assert pools == 1
    with monkeypatch.context() as patch:
        patch.setattr(_llama, "attach_threadpools", lambda *args: [])
        reference, none = _texts(qwen_path, 2)
    assert none == 0
    assert pooled == reference
    assert all(text.strip("!") for text in pooled)  # garbage decodes to token 0, "!"


def test_no_second_copy_of_the_ggml_cpu_library_is_loaded(qwen_path: Path) -> None:
    _texts(qwen_path, 2)
    maps = Path("/proc/self/maps").read_text().splitlines()
    cpu_libs = {line.split()[-1] for line in maps if "libggml-cpu" in line}
    assert len(cpu_libs) == 1, cpu_libs


def test_a_one_thread_context_needs_no_pool(smollm_path: Path) -> None:
    texts, pools = _texts(smollm_path, 1)
    assert pools == 0 and all(texts)
