"""Contexts take turns on the cores: a compute call first takes as many cores as it
runs threads, so two 2-thread contexts on 2 cores never spin against each other, while
two 1-thread contexts still run side by side."""

from __future__ import annotations

import threading
from pathlib import Path

from sipp.local._llama import CPU, CpuBudget


def _max_together(budget: CpuBudget, threads: int, callers: int, rounds: int) -> int:
    inside = peak = 0
    lock = threading.Lock()

    def work() -> None:
        nonlocal inside, peak
        for _ in range(rounds):
            with budget.use(threads):
                with lock:
                    inside += 1
                    peak = max(peak, inside)
                threading.Event().wait(0.001)  # hold the cores a moment, as a decode does
                with lock:
                    inside -= 1

    workers = [threading.Thread(target=work) for _ in range(callers)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert not any(w.is_alive() for w in workers)
    return peak


def test_calls_that_need_every_core_take_turns() -> None:
    assert _max_together(CpuBudget(2), threads=2, callers=4, rounds=50) == 1
    # asking for more threads than there are cores takes them all, never waits forever
    assert _max_together(CpuBudget(2), threads=8, callers=3, rounds=20) == 1


def test_calls_whose_threads_fit_together_run_side_by_side() -> None:
    budget = CpuBudget(2)
    both_inside = threading.Barrier(2, timeout=30)  # breaks unless both hold a core at once

    def work() -> None:
        with budget.use(1):
            both_inside.wait()

    workers = [threading.Thread(target=work) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert not both_inside.broken


def test_the_process_budget_is_its_cores() -> None:
    import os

    assert CPU.cores == max(1, os.cpu_count() or 1)


def test_decodes_take_turns_only_once_a_second_context_is_alive() -> None:
    budget = CpuBudget(2)
    budget.join()
    assert not budget.shared  # one context: nobody to take turns with
    budget.join()
    assert budget.shared
    budget.leave()
    assert not budget.shared


def test_two_loaded_models_share_the_budget(smollm_path: Path) -> None:
    from sipp import (
        ContextRuntimeConfig,
        LocalModelDescriptor,
        NativeRuntimeConfig,
        SippClient,
        SippTextOptions,
    )

    config = NativeRuntimeConfig(context=ContextRuntimeConfig(n_ctx=256, n_threads=2))
    greedy = SippTextOptions(max_tokens=24, temperature=0)
    alone = CPU.shared
    with SippClient() as client:
        solo = client.add("solo", LocalModelDescriptor(smollm_path, config))
        expected = client.query("The capital of Japan is", endpoint=solo, options=greedy)
        expected_text = expected.result().text
    with SippClient() as client:
        first = client.add("a", LocalModelDescriptor(smollm_path, config))
        second = client.add("b", LocalModelDescriptor(smollm_path, config))
        # Loads are lazy: both run, at once, taking turns on the cores; a decode that
        # another one waits for pauses its thread pool first, and its next one wakes it.
        runs = [
            client.query("The capital of Japan is", endpoint=ref, options=greedy)
            for ref in (first, second)
        ]
        assert [run.result().text for run in runs] == [expected_text] * 2
        assert CPU.shared
    assert CPU.shared is alone  # both contexts freed with the client
