"""Token-aware limits on one gateway (the in-memory state): reserve before the call,
settle with the real usage, 429 with Retry-After, and OpenAI's x-ratelimit headers on
every response of a limited caller, JSON and streamed, in every wire format."""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from sipp import InvalidConfigError
from sipp.gateway.config import parse_config
from sipp.gateway.metrics import GatewayMetrics
from sipp.gateway.shaping import build_shaper, open_store

from ..remote.loopback import Action, Chunk, Close, LoopbackServer, Request, Status, Wait
from .limited_gateways import FREE, LIMITED_CALLER, held_upstream, limited_gateway
from .test_config import BASE
from .test_server import TOKEN, Gateway, running_gateway
from .upstreams import embeddings_reply, poll, text_reply

# "hi" as one user message: 3 (conversation) + 4 (message) + ceil(2 / 4) = 8 tokens
# estimated; with max_tokens 10 a request reserves 18. The upstream reports 3 + 3 = 6.
CHAT = {"model": "remote", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
RESERVED, USED = 18, 6
HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
)


def _auth(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}", "anthropic-version": "2023-06-01"}


async def _hammer(
    gw: Gateway, upstream: LoopbackServer, release: threading.Event, n: int
) -> list[int]:
    """`n` chat requests at once; the upstream answers none until every request has either
    reached it or been refused, so all reservations are taken together."""
    refused = 0

    async def one(client: httpx.AsyncClient) -> int:
        nonlocal refused
        r = await client.post("/v1/chat/completions", json=CHAT, headers=_auth(LIMITED_CALLER))
        if r.status_code == 429:
            refused += 1
        return r.status_code

    async def release_when_all_arrived() -> None:
        deadline = time.monotonic() + 120
        while len(upstream.requests) + refused < n and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        release.set()

    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
    async with httpx.AsyncClient(base_url=gw.public, limits=limits, timeout=120) as client:
        releaser = asyncio.ensure_future(release_when_all_arrived())
        statuses = await asyncio.gather(*(one(client) for _ in range(n)))
        await releaser
    return list(statuses)


def _remaining_tokens(gw: Gateway, token: str = LIMITED_CALLER) -> int:
    """The caller's token level after one more request of RESERVED (settled at USED)."""
    r = httpx.post(f"{gw.public}/v1/chat/completions", json=CHAT, headers=_auth(token), timeout=60)
    assert r.status_code == 200, r.text
    return int(r.headers["x-ratelimit-remaining-tokens"])


def test_200_concurrent_requests_take_exactly_the_budget_and_settle_to_real_usage(
    tmp_path: Path,
) -> None:
    """A day budget has no refill: it admits exactly what it holds (all 200 reserve
    before any settles), then settling leaves it at budget - the real usage."""
    budget = RESERVED * 37 + 5
    release = threading.Event()
    with (
        held_upstream(release) as upstream,
        limited_gateway(tmp_path, upstream, f"tokens_per_day = {budget}") as gw,
    ):
        statuses = asyncio.run(_hammer(gw, upstream, release, 200))
        assert statuses.count(200) == 37 and statuses.count(429) == 163
        assert len(upstream.requests) == 37
        # settled before each response went out: the 37 real usages are charged and the
        # estimates refunded; the probe's own reservation is the only estimate left
        assert _remaining_tokens(gw) == budget - 37 * USED - RESERVED
        refused = gw.metric(
            "sipp_gateway_limit_refused_total", '{limit="tokens_per_day",scope="caller"}'
        )
        assert refused == 163


def test_tokens_per_minute_admits_what_it_holds_and_no_more(tmp_path: Path) -> None:
    """A refilling bucket may admit what its refill added while the requests arrived, and
    never more than that plus one request's reservation."""
    per_minute = RESERVED * 20
    release = threading.Event()
    with (
        held_upstream(release) as upstream,
        limited_gateway(tmp_path, upstream, f"tokens_per_minute = {per_minute}") as gw,
    ):
        started = time.monotonic()
        statuses = asyncio.run(_hammer(gw, upstream, release, 200))
        elapsed = time.monotonic() - started
        admitted = statuses.count(200)
        assert statuses.count(200) + statuses.count(429) == 200
        refill = per_minute * elapsed / 60
        assert per_minute - RESERVED < admitted * RESERVED <= per_minute + refill + RESERVED


def _stream_lines(r: httpx.Response) -> list[str]:
    return [line for line in r.iter_lines() if line]


ROUTES: list[tuple[str, dict[str, Any]]] = [
    ("/v1/chat", {"model": "remote", "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/query", {"model": "remote", "prompt": "hi"}),
    ("/v1/chat/completions", CHAT),
    ("/v1/completions", {"model": "remote", "prompt": "hi", "max_tokens": 10}),
    ("/v1/responses", {"model": "remote", "input": "hi", "max_output_tokens": 16}),
    (
        "/v1/messages",
        {"model": "remote", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]},
    ),
]


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with (
        LoopbackServer(text_reply) as upstream,
        limited_gateway(
            tmp_path_factory.mktemp("limited"),
            upstream,
            "requests_per_minute = 1000\ntokens_per_minute = 1000000",
        ) as gw,
    ):
        yield gw


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("route", "body"), ROUTES)
def test_every_response_of_a_limited_caller_carries_the_headers(
    limited: Gateway, route: str, body: dict[str, Any], stream: bool
) -> None:
    with httpx.stream(
        "POST",
        limited.public + route,
        json={**body, "stream": stream},
        headers=_auth(LIMITED_CALLER),
        timeout=60,
    ) as r:
        lines = _stream_lines(r)
        assert r.status_code == 200, lines
        assert int(r.headers["x-ratelimit-limit-requests"]) == 1000
        assert int(r.headers["x-ratelimit-limit-tokens"]) == 1_000_000
        assert 0 < int(r.headers["x-ratelimit-remaining-tokens"]) < 1_000_000
        assert r.headers["x-ratelimit-reset-requests"].endswith("s")
        assert all(name in r.headers for name in HEADERS)
    with httpx.stream(
        "POST",
        limited.public + route,
        json={**body, "stream": stream},
        headers=_auth(FREE),
        timeout=60,
    ) as free:
        _stream_lines(free)
        assert free.status_code == 200
        assert not any(name in free.headers for name in HEADERS)  # no limit: no headers


def test_a_browser_may_read_the_limit_headers(tmp_path: Path) -> None:
    origin = "https://app.example.com"
    with (
        LoopbackServer(text_reply) as upstream,
        limited_gateway(
            tmp_path, upstream, "requests_per_minute = 100", origins=f'["{origin}"]'
        ) as gw,
    ):
        r = httpx.post(
            f"{gw.public}/v1/chat/completions",
            json=CHAT,
            headers={**_auth(LIMITED_CALLER), "origin": origin},
        )
        assert r.status_code == 200
        exposed = r.headers["access-control-expose-headers"].lower()
        assert all(name in exposed for name in (*HEADERS, "retry-after"))


def test_a_target_limit_refuses_with_retry_after(tmp_path: Path) -> None:
    with (
        LoopbackServer(text_reply) as upstream,
        limited_gateway(tmp_path, upstream, target_limits="requests_per_minute = 2") as gw,
    ):
        url = f"{gw.public}/v1/chat/completions"
        for _ in range(2):
            ok = httpx.post(url, json=CHAT, headers=_auth(FREE), timeout=60)
            assert ok.status_code == 200
        refused = httpx.post(url, json=CHAT, headers=_auth(FREE), timeout=60)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(refused.headers["retry-after"]) <= 30  # one request refills in 30 s
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert refused.headers["x-ratelimit-limit-requests"] == "2"
        assert len(upstream.requests) == 2
        # a request that could never fit is told so, not invited to retry
        huge = {**CHAT, "max_tokens": 5000}
        with limited_gateway(tmp_path, upstream, "tokens_per_minute = 1000", name="small") as small:
            never = httpx.post(
                f"{small.public}/v1/chat/completions", json=huge, headers=_auth(LIMITED_CALLER)
            )
            assert never.status_code == 429 and "retry-after" not in never.headers
            assert "max_tokens" in never.json()["error"]["message"]


def _cut_stream_upstream(release: threading.Event, hang_up: bool = False) -> LoopbackServer:
    """Streams one delta of 12 bytes (3 estimated tokens), then waits until `release`
    (or, with `hang_up`, drops the connection mid-stream)."""

    def handler(req: Request) -> list[Action]:
        if not req.json().get("stream"):
            return text_reply(req)
        chunk = {
            "id": "c",
            "object": "chunk",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "delta": {"content": "hello world!"}, "finish_reason": None}],
        }
        frame = b"data: " + json.dumps(chunk).encode() + b"\n\n"
        return [
            Status(200, {"content-type": "text/event-stream"}),
            Chunk(frame),
            Close() if hang_up else Wait(release, 120),
        ]

    return LoopbackServer(handler)


def test_a_stream_cut_by_the_caller_is_charged_what_was_streamed(tmp_path: Path) -> None:
    budget = 10_000
    release = threading.Event()
    with (
        _cut_stream_upstream(release) as upstream,
        limited_gateway(tmp_path, upstream, f"tokens_per_day = {budget}") as gw,
    ):
        with httpx.stream(
            "POST",
            f"{gw.public}/v1/chat/completions",
            json={**CHAT, "stream": True},
            headers=_auth(LIMITED_CALLER),
            timeout=60,
        ) as r:
            assert r.status_code == 200
            assert int(r.headers["x-ratelimit-remaining-tokens"]) == budget - RESERVED
            for line in r.iter_lines():
                if "hello world!" in line:
                    break  # and hang up mid-stream
        poll(
            lambda: (
                gw.metric("sipp_gateway_errors_total", '{code="client_closed",operation="chat"}')
                == 1
            ),
            "the gateway saw the caller hang up",
        )
        release.set()
        # charged: the 3 streamed tokens (12 bytes) and the prompt's 8; then the probe's 18
        assert _remaining_tokens(gw) == budget - (3 + 8) - RESERVED


def test_a_stream_cut_by_the_upstream_is_charged_what_was_streamed(tmp_path: Path) -> None:
    budget = 10_000
    with (
        _cut_stream_upstream(threading.Event(), hang_up=True) as upstream,
        limited_gateway(tmp_path, upstream, f"tokens_per_day = {budget}") as gw,
    ):
        with httpx.stream(
            "POST",
            f"{gw.public}/v1/chat/completions",
            json={**CHAT, "stream": True},
            headers=_auth(LIMITED_CALLER),
            timeout=60,
        ) as r:
            body = "".join(r.iter_lines())
        assert "hello world!" in body and "error" in body  # the stream ended in an error
        assert _remaining_tokens(gw) == budget - (3 + 8) - RESERVED


def test_embeddings_are_charged_their_reported_usage(tmp_path: Path) -> None:
    budget = 10_000
    with (
        LoopbackServer(embeddings_reply) as upstream,
        limited_gateway(tmp_path, upstream, f"tokens_per_day = {budget}") as gw,
    ):
        body = {"model": "remote", "input": ["one input", "another input here"]}
        r = httpx.post(f"{gw.public}/v1/embeddings", json=body, headers=_auth(LIMITED_CALLER))
        assert r.status_code == 200, r.text
        # reserved the inputs' estimate (3 + 5), no output
        assert int(r.headers["x-ratelimit-remaining-tokens"]) == budget - 8
        again = httpx.post(f"{gw.public}/v1/embeddings", json=body, headers=_auth(LIMITED_CALLER))
        # the first settled at the usage the upstream reported: one token per input
        assert int(again.headers["x-ratelimit-remaining-tokens"]) == budget - 2 - 8


def test_a_local_target_reserves_its_exact_prompt_token_count(
    smollm_path: Path, tmp_path: Path
) -> None:
    """The reservation of a local chat is the model's own count of its rendered prompt
    (what the engine reports as prompt tokens), not the byte estimate."""
    budget = 100_000

    def limit(toml: str) -> str:
        return toml.replace(
            'caller = "all-targets"\ntargets = []',
            f'caller = "all-targets"\ntargets = []\nlimits = {{ tokens_per_day = {budget} }}',
        )

    body = {"model": "local", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with running_gateway(smollm_path, tmp_path, limit) as gw:
        r = httpx.post(
            f"{gw.public}/v1/chat/completions", json=body, headers=_auth(TOKEN), timeout=120
        )
        assert r.status_code == 200, r.text
        prompt = r.json()["usage"]["prompt_tokens"]
        assert prompt != 8  # the estimate of "hi" as one message: the template adds more
        assert int(r.headers["x-ratelimit-remaining-tokens"]) == budget - (prompt + 4)


def test_without_limits_nothing_is_opened_and_redis_needs_its_url() -> None:
    """No limit and the memory backend: no store, no shaper, so a request pays nothing.
    Redis configured: its URL's variable must be set, or serve refuses to start."""
    plain = parse_config(copy.deepcopy(BASE))
    assert open_store(plain, {}) is None
    assert build_shaper(plain, None, GatewayMetrics(dict)) is None
    redis = parse_config({**copy.deepcopy(BASE), "state": {"backend": "redis", "url_env": "R"}})
    with pytest.raises(
        InvalidConfigError, match=r"state\.url_env: environment variable R is not set"
    ):
        open_store(redis, {})
    with pytest.raises(InvalidConfigError, match="does not hold a redis") as info:
        open_store(redis, {"R": "http://user:secret-pw@host"})
    assert "secret-pw" not in str(info.value)
