"""A streamed run's queued batches joined into one frame (`sipp.gateway.joined`), read
off a real `RunChannel` through the async run handle the gateway streams from."""

from __future__ import annotations

import asyncio

from sipp import SippTextResponse, TokenBatch, TokenLogprob, ToolCallDelta
from sipp._channel import RunChannel
from sipp._errors import ExecutionError, SippError
from sipp._runs import AsyncTextRun
from sipp.gateway.joined import MAX_JOINED, joined


def _lp(token: str) -> TokenLogprob:
    return TokenLogprob(token, tuple(token.encode()), -0.5)


def _read(
    pushes: list[TokenBatch], outcome: SippTextResponse | SippError | None = None
) -> list[TokenBatch | SippError]:
    """Everything `pushes` streams, each pushed before the reader looks (all queued), then
    the run's outcome: the error it ended with, if it failed."""

    async def main() -> list[TokenBatch | SippError]:
        channel: RunChannel[SippTextResponse] = RunChannel()
        run = AsyncTextRun(channel, emit_tokens=True)
        for batch in pushes:
            channel.push(batch)
        channel.finish(outcome or SippTextResponse("".join(b.text for b in pushes), "stop"))
        out: list[TokenBatch | SippError] = []
        try:
            async for b in joined(aiter(run), lambda: run._batch_waiting):
                out.append(b)
        except SippError as exc:
            out.append(exc)
        return out

    return asyncio.run(main())


def test_queued_text_batches_become_one() -> None:
    pushes = [
        TokenBatch("Hel", (1,), 0, (_lp("Hel"),)),
        TokenBatch("lo", (2,), 1, (_lp("lo"),)),
        TokenBatch(" there", (3, 4), 2, (_lp(" th"), _lp("ere"))),
    ]
    [one] = _read(pushes)
    assert one == TokenBatch(
        "Hello there", (1, 2, 3, 4), 0, (_lp("Hel"), _lp("lo"), _lp(" th"), _lp("ere"))
    )


def test_tool_call_deltas_and_remote_deltas_stay_whole_and_sequences_stay_contiguous() -> None:
    call = ToolCallDelta(0, "call_1", "lookup")
    pushes = [
        TokenBatch("a", (1,), 0),
        TokenBatch("b", (2,), 1),
        TokenBatch("", (3,), 2, tool_calls=(call,)),  # a tool call's first delta
        TokenBatch("c", (4,), 3),
        TokenBatch("remote text", (), 4),  # no token ids: counted from its own text
        TokenBatch("d", (5,), 5),
        TokenBatch("e", (6,), 6),
    ]
    assert _read(pushes) == [
        TokenBatch("ab", (1, 2), 0),
        TokenBatch("", (3,), 1, tool_calls=(call,)),
        TokenBatch("c", (4,), 2),
        TokenBatch("remote text", (), 3),
        TokenBatch("de", (5, 6), 4),
    ]


def test_a_batch_nobody_queued_behind_goes_out_alone() -> None:
    async def main() -> list[TokenBatch]:
        channel: RunChannel[SippTextResponse] = RunChannel()
        run = AsyncTextRun(channel, emit_tokens=True)
        out: list[TokenBatch] = []
        stream = joined(aiter(run), lambda: run._batch_waiting)
        channel.push(TokenBatch("x", (1,), 0))
        out.append(await anext(stream))  # out before the next batch exists
        channel.push(TokenBatch("y", (2,), 1))
        channel.push(TokenBatch("z", (3,), 2))
        channel.finish(SippTextResponse("xyz", "stop"))
        out.extend([b async for b in stream])
        return out

    assert asyncio.run(main()) == [TokenBatch("x", (1,), 0), TokenBatch("yz", (2, 3), 1)]


def test_text_queued_ahead_of_a_failure_goes_out_before_the_error() -> None:
    failure = ExecutionError("llama_decode failed with status 1")
    out = _read([TokenBatch("a", (1,), 0), TokenBatch("b", (2,), 1)], failure)
    assert out == [TokenBatch("ab", (1, 2), 0), failure]


def test_a_long_queue_is_sent_in_pieces_of_at_most_max_joined() -> None:
    pushes = [TokenBatch(str(i % 10), (i,), i) for i in range(2 * MAX_JOINED + 3)]
    out = _read(pushes)
    assert [len(b.token_ids) for b in out if isinstance(b, TokenBatch)] == [
        MAX_JOINED,
        MAX_JOINED,
        3,
    ]
    assert "".join(b.text for b in out if isinstance(b, TokenBatch)) == "".join(
        b.text for b in pushes
    )
