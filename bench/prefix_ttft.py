"""Time to first token of a follow-up turn with the same `context_key`,
over a ~1,500-token conversation, vs the same request cold.

Cold: the conversation arrives on an endpoint that has never seen it (a fresh
context key on an idle slot that holds something else). Warm: the next turn of
the same conversation with its `context_key`, so only the new suffix is
prefilled. TTFT is wall time from submit to the first streamed token. Rounds
alternate; prints medians, spread and the ratio warm/cold (target <= 0.05).

    ./dev bench prefix_ttft [--rounds 5]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _stats import spread
from sipp import (
    ChatMessage,
    ContextRuntimeConfig,
    EndpointRef,
    LocalModelDescriptor,
    LocalTextOptions,
    NativeRuntimeConfig,
    SippClient,
    SippTextOptions,
)
from sipp import models as sipp_models

PARAGRAPH = (
    "The lighthouse keeper wrote in his log every evening, describing the colour of the sea, "
    "the ships that passed, the birds that rested on the rail and the weather coming in from the west. "
)


def conversation(turns: int, tag: int) -> list[ChatMessage]:
    # `tag` makes each round's conversation new from its first tokens: a truly cold start.
    messages = [
        ChatMessage("system", f"Archive {tag}. You are a patient archivist who answers briefly.")
    ]
    for i in range(turns):
        messages.append(ChatMessage("user", f"Log entry {i}: " + PARAGRAPH * 2))
        messages.append(ChatMessage("assistant", f"Noted entry {i}. " + PARAGRAPH))
    return messages


def ttft(
    client: SippClient, ref: EndpointRef, messages: list[ChatMessage], key: str
) -> tuple[float, int, int]:
    start = time.perf_counter()
    run = client.chat(
        messages,
        endpoint=ref,
        options=SippTextOptions(max_tokens=8, temperature=0),
        local=LocalTextOptions(context_key=key),
        emit_tokens=True,
    )
    first = None
    for _ in run:
        if first is None:
            first = time.perf_counter() - start
    response = run.result()
    assert response.local_stats is not None and response.usage is not None
    return (
        first if first is not None else time.perf_counter() - start,
        response.usage.input_tokens,
        response.local_stats.cached_prompt_tokens,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--turns", type=int, default=11)
    args = parser.parse_args()
    model = args.model or sipp_models.pull(sipp_models.DEFAULT_MODEL)
    config = NativeRuntimeConfig(context=ContextRuntimeConfig(n_ctx=4096, n_parallel=2))
    cold_times, warm_times = [], []
    with SippClient() as client:
        ref = client.add("bench", LocalModelDescriptor(model, config))
        for i in range(args.rounds):
            key = f"conversation-{i}"
            base = conversation(args.turns, i)
            # fill both slots with unrelated work so the cold request reuses nothing
            client.query(
                f"Unrelated warm-up {i}", endpoint=ref, options=SippTextOptions(max_tokens=2)
            ).result()
            cold, n_prompt, cached_cold = ttft(client, ref, base, key)
            follow_up = [*base, ChatMessage("user", "Summarise entry 3 in five words.")]
            warm, n_follow, cached_warm = ttft(client, ref, follow_up, key)
            cold_times.append(cold)
            warm_times.append(warm)
            print(
                f"round {i + 1}: cold {cold * 1000:7.1f} ms ({n_prompt} prompt tok, {cached_cold} cached)   "
                f"follow-up {warm * 1000:6.1f} ms ({n_follow} prompt tok, {cached_warm} cached)   "
                f"ratio {warm / cold:.3f}"
            )
    ratios = [w / c for w, c in zip(warm_times, cold_times)]
    print(f"cold      {spread(cold_times, unit='ms', scale=1000)}")
    print(f"follow-up {spread(warm_times, unit='ms', scale=1000)}")
    print(f"ratio follow-up/cold {spread(ratios, '.3f')}")


if __name__ == "__main__":
    main()
