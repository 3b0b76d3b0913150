"""Event-loop lag while 1 MiB prompts are submitted through `AsyncSippClient`.

A ticker on the loop sleeps 10 ms at a time and records how late each wake-up is.
Meanwhile `--prompts` prompts of 1 MiB each are submitted to the default local
model (they fail with `context_overflow` once tokenized: the CPU work is the
template-free tokenization of the whole MiB). Three phases in the same run:

* idle: the ticker alone (the floor of this machine);
* on-loop: the old path, preparation inside `start_text` on the loop thread;
* off-loop: the current path, preparation on the endpoint's preparation thread.

Prints p50/p99/max lateness per phase (goal: off-loop p99 under 20 ms).

    ./dev bench loop_lag [--prompts 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

from _stats import percentile, spread
from sipp import (
    AsyncSippClient,
    ContextOverflowError,
    ContextRuntimeConfig,
    EndpointRef,
    LocalModelDescriptor,
    NativeRuntimeConfig,
)
from sipp import models as sipp_models

TICK_S = 0.010
MIB_PROMPT = ("lorem ipsum dolor sit amet " * (1 << 20))[: 1 << 20]


async def ticker(stop: asyncio.Event, lags: list[float]) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        due = loop.time() + TICK_S
        await asyncio.sleep(TICK_S)
        lags.append(max(0.0, loop.time() - due))


async def phase(
    client: AsyncSippClient | None, ref: EndpointRef | None, prompts: int
) -> list[float]:
    """Ticker lateness while `prompts` 1 MiB prompts are submitted one after another
    (or for a fixed quiet spell when `client` is None)."""
    stop, lags = asyncio.Event(), []
    tick = asyncio.create_task(ticker(stop, lags))
    await asyncio.sleep(0.1)
    if client is None:
        await asyncio.sleep(1.0)
    else:
        for _ in range(prompts):
            try:
                await client.query(MIB_PROMPT, endpoint=ref)
            except ContextOverflowError:
                pass
            else:
                raise AssertionError("a 1 MiB prompt should not fit the context")
    stop.set()
    await tick
    return lags


def line(name: str, lags: list[float]) -> str:
    ms = [v * 1000 for v in lags]
    return (
        f"{name:9s} lag p50 {percentile(ms, 0.5):6.2f} ms  p99 {percentile(ms, 0.99):7.2f} ms  "
        f"max {max(ms):7.2f} ms  ({len(ms)} ticks)"
    )


async def run(model: Path, prompts: int, rounds: int) -> None:
    config = NativeRuntimeConfig(context=ContextRuntimeConfig(n_ctx=2048, n_parallel=2))
    async with AsyncSippClient() as client:
        ref = await client.add("bench", LocalModelDescriptor(model, config))
        endpoint: Any = client._registry._endpoints[ref.id]
        p99: dict[str, list[float]] = {"idle": [], "on-loop": [], "off-loop": []}
        for i in range(rounds):
            results = {"idle": await phase(None, None, prompts)}
            # The old path: the async entry point prepared in the caller's (loop) thread.
            endpoint.start_text_async = endpoint.start_text
            results["on-loop"] = await phase(client, ref, prompts)
            del endpoint.start_text_async
            results["off-loop"] = await phase(client, ref, prompts)
            print(f"round {i + 1}:")
            for name, lags in results.items():
                print("  " + line(name, lags))
                p99[name].append(percentile(lags, 0.99))
        print(f"{prompts} x 1 MiB prompts per phase, {rounds} rounds; p99 lag over rounds:")
        for name, values in p99.items():
            print(f"  {name:9s} {spread(values, '.2f', 'ms', 1000)}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = args.model or sipp_models.pull(sipp_models.DEFAULT_MODEL)
    started = time.perf_counter()
    asyncio.run(run(model, args.prompts, args.rounds))
    print(f"({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
