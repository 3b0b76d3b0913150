"""The exact response cache on real `sipp-gateway serve` processes: a loopback provider
that counts its calls (a hit makes none), every public wire format replaying a hit
(JSON and streamed, the official `openai` and `anthropic` SDKs among the clients),
tenant isolation, Cache-Control, TTL without refresh, failures never stored, limits, and
a restart keeping the SQLite store (two replicas sharing Redis: test_cache_redis.py)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from ..remote.loopback import Action, Chunk, Close, LoopbackServer, Request, Status, Wait
from .limited_gateways import FREE, LIMITED_CALLER, limited_gateway
from .test_server import Gateway
from .upstreams import embeddings_reply, poll

TOKEN = LIMITED_CALLER  # caller "team"; FREE is caller "free"
PIECES = ["The ", "sky ", "is ", "blue."]
USAGE = {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}


# ------------------------------------------------------------------ the provider
def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def provider(req: Request) -> list[Action]:
    """An OpenAI-style provider whose answer the last user message picks: `error` (500),
    `cut` (the connection closes mid-answer), `length` (finish reason length), `tool`
    (a tool call), `hold` (a stream waits for `HOLD` after its first piece), `big`
    (1000 tokens of usage), else "The sky is blue." in four pieces."""
    if req.path.endswith("/embeddings"):
        return embeddings_reply(req)
    body = req.json()
    chat = req.path.endswith("/chat/completions")
    ask = body["messages"][-1]["content"] if chat else body["prompt"]
    if "error" in ask:
        return [Status(500, {"content-type": "application/json"}), Chunk(b'{"error": {}}')]
    finish = "length" if "length" in ask else "stop"
    calls = None
    if "tool" in ask:
        finish = "tool_calls"
        calls = [
            {
                "index": 0,
                "id": "call_1",
                "type": "function",
                "function": {"name": "lookup", "arguments": '{"city": "Oslo"}'},
            }
        ]
    usage = {**USAGE, "completion_tokens": 1000} if "big" in ask else USAGE
    if not body.get("stream"):
        message: dict[str, Any] = {"role": "assistant", "content": "".join(PIECES)}
        if calls:
            message = {"role": "assistant", "content": None, "tool_calls": calls}
        choice = (
            {"index": 0, "message": message, "finish_reason": finish}
            if chat
            else {"index": 0, "text": "".join(PIECES), "finish_reason": finish}
        )
        data = {"id": "c", "object": "x", "created": 1, "model": "m", "choices": [choice]}
        raw = json.dumps({**data, "usage": usage}).encode()
        if "cut" in ask:
            return [Status(200, {"content-type": "application/json"}), Chunk(raw[:20]), Close()]
        return [Status(200, {"content-type": "application/json"}), Chunk(raw)]
    frames: list[Action] = [Status(200, {"content-type": "text/event-stream"})]
    base = {"id": "c", "object": "chunk", "created": 1, "model": "m"}
    if calls:
        delta: dict[str, Any] = {"role": "assistant", "tool_calls": calls}
        frames.append(Chunk(_sse({**base, "choices": [{"index": 0, "delta": delta}]})))
    else:
        for piece in PIECES:
            part = (
                {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
            )
            frames.append(Chunk(_sse({**base, "choices": [part]})))
            if "cut" in ask:
                return [*frames, Close()]
            if "hold" in ask:
                frames.append(Wait(HOLD, timeout=60))
    end = (
        {"index": 0, "delta": {}, "finish_reason": finish}
        if chat
        else {
            "index": 0,
            "text": "",
            "finish_reason": finish,
        }
    )
    frames.append(Chunk(_sse({**base, "choices": [end]})))
    frames.append(Chunk(_sse({**base, "choices": [], "usage": usage})))
    frames.append(Chunk(b"data: [DONE]\n\n"))
    return frames


HOLD = threading.Event()


class Provider(LoopbackServer):
    def __init__(self) -> None:
        super().__init__(provider)

    def calls(self) -> int:
        return len(self.requests)


@contextmanager
def cached_gateway(
    directory: Path,
    upstream: LoopbackServer,
    cache: str,
    state: str = "",
    caller_limits: str = "",
    env: dict[str, str] | None = None,
    name: str = "gateway",
    top: str = "",
    origins: str = "[]",
) -> Iterator[Gateway]:
    """A provider-only gateway (target "remote") with `[targets.cache]` = `cache`; `top`
    adds top-level TOML keys."""
    with limited_gateway(
        directory,
        upstream,
        caller_limits=caller_limits,
        target_limits=f"\n[targets.cache]\n{cache}\n",
        state=state,
        env=env,
        name=name,
        origins=f"{origins}\n{top}",
    ) as gw:
        yield gw


def sqlite_cache(directory: Path, extra: str = "") -> str:
    return f'path = "{directory / "cache"}"\nstore_finish = ["stop", "tool_calls"]\n{extra}'


def chat(gw: Gateway, ask: str, token: str = TOKEN, **kw: Any) -> httpx.Response:
    """A greedy native chat request (non-streamed unless `stream=True`)."""
    headers = {"authorization": f"Bearer {token}", **kw.pop("headers", {})}
    body = {"model": "remote", "messages": [{"role": "user", "content": ask}], "max_tokens": 50}
    body["temperature"] = kw.pop("temperature", 0)
    body.update(kw)
    return httpx.post(f"{gw.public}/v1/chat", json=body, headers=headers, timeout=60)


def stored(gw: Gateway, ask: str, **kw: Any) -> None:
    """Wait until `ask` is answered from the cache (stores finish in the background)."""
    poll(lambda: chat(gw, ask, **kw).headers.get("x-sipp-cache") == "hit", f"{ask!r} cached")


def sse_data(text: str) -> list[dict[str, Any]]:
    return [
        json.loads(line[6:])
        for line in text.splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]


@pytest.fixture(scope="module")
def upstream() -> Iterator[Provider]:
    server = Provider()
    yield server
    server.close()


@pytest.fixture(scope="module")
def gateway(upstream: Provider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("cache")
    with cached_gateway(directory, upstream, sqlite_cache(directory)) as gw:
        yield gw


# ------------------------------------------------------------------ replay
def test_native_json_and_stream_hits_make_no_upstream_call(
    gateway: Gateway, upstream: Provider
) -> None:
    first = chat(gateway, "native json?")
    assert first.status_code == 200 and first.headers["x-sipp-cache"] == "store"
    stored(gateway, "native json?")
    calls = upstream.calls()
    hit = chat(gateway, "native json?")
    assert hit.headers["x-sipp-cache"] == "hit"
    assert hit.json()["text"] == "The sky is blue." and hit.json()["finish_reason"] == "stop"
    assert hit.json()["usage"] == {"input_tokens": 11, "output_tokens": 4, "total_tokens": 15}
    streamed = chat(gateway, "native json?", stream=True)  # stored from JSON, replayed in pieces
    assert streamed.headers["x-sipp-cache"] == "hit"
    tokens = [e["text"] for e in sse_data(streamed.text) if "text" in e and "sequence" in e]
    assert tokens == PIECES
    assert "event: done" in streamed.text and '"finish_reason":"stop"' in streamed.text.replace(
        " ", ""
    )
    assert upstream.calls() == calls


def test_a_streamed_answer_is_stored_in_its_pieces(gateway: Gateway, upstream: Provider) -> None:
    first = chat(gateway, "native stream?", stream=True)
    assert first.headers["x-sipp-cache"] == "miss"  # headers leave before the answer ends
    stored(gateway, "native stream?", stream=True)
    calls = upstream.calls()
    again = chat(gateway, "native stream?", stream=True)
    assert again.headers["x-sipp-cache"] == "hit"
    tokens = [e for e in sse_data(again.text) if "sequence" in e]
    assert tokens == [e for e in sse_data(first.text) if "sequence" in e]
    assert [e["text"] for e in tokens] == PIECES
    assert upstream.calls() == calls


def test_openai_sdk_hits_json_and_stream(gateway: Gateway, upstream: Provider) -> None:
    client = openai.OpenAI(base_url=gateway.public + "/v1", api_key=TOKEN, max_retries=0)
    ask = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "openai?"}]
    first = client.chat.completions.with_raw_response.create(
        model="remote",
        messages=ask,
        temperature=0,
        max_tokens=50,  # type: ignore[arg-type]
    )
    assert first.headers["x-sipp-cache"] == "store"
    poll(
        lambda: (
            client.chat.completions.with_raw_response.create(
                model="remote",
                messages=ask,
                temperature=0,
                max_tokens=50,  # type: ignore[arg-type]
            ).headers["x-sipp-cache"]
            == "hit"
        ),
        "the openai answer cached",
    )
    calls = upstream.calls()
    raw = client.chat.completions.with_raw_response.create(
        model="remote",
        messages=ask,
        temperature=0,
        max_tokens=50,  # type: ignore[arg-type]
    )
    completion = raw.parse()
    assert raw.headers["x-sipp-cache"] == "hit"
    assert completion.choices[0].message.content == "The sky is blue."
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.total_tokens == 15
    with client.chat.completions.with_streaming_response.create(
        model="remote",
        messages=ask,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=50,
        stream=True,
        stream_options={"include_usage": True},
    ) as response:
        assert response.headers["x-sipp-cache"] == "hit"
        chunks = list(response.parse())
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert texts == PIECES  # token frames, not one blob
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 15
    assert upstream.calls() == calls
    client.close()


def test_tool_calls_are_replayed(gateway: Gateway, upstream: Provider) -> None:
    client = openai.OpenAI(base_url=gateway.public + "/v1", api_key=TOKEN, max_retries=0)
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    ask = [{"role": "user", "content": "tool please"}]

    def create(**kw: Any) -> Any:
        return client.chat.completions.with_raw_response.create(
            model="remote",
            messages=ask,
            tools=tools,
            temperature=0,
            **kw,  # type: ignore[arg-type]
        )

    assert create().headers["x-sipp-cache"] == "store"
    poll(lambda: create().headers["x-sipp-cache"] == "hit", "the tool call cached")
    calls = upstream.calls()
    message = create().parse().choices[0]
    assert message.finish_reason == "tool_calls"
    call = message.message.tool_calls[0]  # type: ignore[index]
    assert (call.id, call.function.name, call.function.arguments) == (  # type: ignore[union-attr]
        "call_1",
        "lookup",
        '{"city": "Oslo"}',
    )
    with client.chat.completions.with_streaming_response.create(
        model="remote",
        messages=ask,
        tools=tools,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
    ) as response:
        assert response.headers["x-sipp-cache"] == "hit"
        deltas = [c.choices[0].delta for c in response.parse() if c.choices]
    parts = [d.tool_calls[0] for d in deltas if d.tool_calls]
    assert parts[0].id == "call_1" and parts[0].function.name == "lookup"  # type: ignore[union-attr]
    assert "".join(p.function.arguments or "" for p in parts) == '{"city": "Oslo"}'  # type: ignore[union-attr]
    assert upstream.calls() == calls
    client.close()


def test_responses_and_anthropic_routes_hit(gateway: Gateway, upstream: Provider) -> None:
    auth = {"authorization": f"Bearer {TOKEN}"}
    body = {"model": "remote", "input": "responses?", "temperature": 0}

    def responses(**kw: Any) -> httpx.Response:
        return httpx.post(
            f"{gateway.public}/v1/responses", json={**body, **kw}, headers=auth, timeout=60
        )

    assert responses().headers["x-sipp-cache"] == "store"
    poll(lambda: responses().headers["x-sipp-cache"] == "hit", "the responses answer cached")
    calls = upstream.calls()
    hit = responses()
    assert hit.json()["output"][0]["content"][0]["text"] == "The sky is blue."
    assert hit.json()["usage"]["total_tokens"] == 15
    streamed = responses(stream=True)
    assert streamed.headers["x-sipp-cache"] == "hit"
    pieces = [
        e["delta"] for e in sse_data(streamed.text) if e.get("type") == "response.output_text.delta"
    ]
    assert pieces == PIECES

    client = anthropic.Anthropic(base_url=gateway.public, api_key=TOKEN, max_retries=0)
    ask = [{"role": "user", "content": "anthropic?"}]

    def messages() -> Any:
        return client.messages.with_raw_response.create(
            model="remote",
            messages=ask,
            max_tokens=50,
            extra_body={"temperature": 0},  # type: ignore[arg-type]
        )

    assert messages().headers["x-sipp-cache"] == "store"
    poll(lambda: messages().headers["x-sipp-cache"] == "hit", "the anthropic answer cached")
    calls = upstream.calls()
    message = messages().parse()
    assert message.content[0].text == "The sky is blue." and message.stop_reason == "end_turn"  # type: ignore[union-attr]
    assert (message.usage.input_tokens, message.usage.output_tokens) == (11, 4)
    with client.messages.with_streaming_response.create(
        model="remote",
        messages=ask,
        max_tokens=50,
        stream=True,
        extra_body={"temperature": 0},  # type: ignore[arg-type]
    ) as response:
        assert response.headers["x-sipp-cache"] == "hit"
        text = response.read().decode()
    deltas = [
        e["delta"]["text"]
        for e in sse_data(text)
        if e.get("type") == "content_block_delta" and e["delta"].get("type") == "text_delta"
    ]
    assert deltas == PIECES
    assert upstream.calls() == calls
    client.close()


# ------------------------------------------------------------------ what is (not) cached
def test_cache_control_and_sampled_requests(gateway: Gateway, upstream: Provider) -> None:
    chat(gateway, "control?")
    stored(gateway, "control?")
    calls = upstream.calls()
    fresh = chat(gateway, "control?", headers={"cache-control": "no-cache"})
    assert fresh.headers["x-sipp-cache"] == "store" and upstream.calls() == calls + 1
    kept_out = chat(gateway, "no-store?", headers={"Cache-Control": "no-store"})
    assert kept_out.headers["x-sipp-cache"] == "miss"
    sampled = chat(gateway, "sampled?", temperature=0.7)
    assert sampled.headers["x-sipp-cache"] == "bypass"
    unset = httpx.post(
        f"{gateway.public}/v1/chat",
        json={"model": "remote", "messages": [{"role": "user", "content": "sampled?"}]},
        headers={"authorization": f"Bearer {TOKEN}"},
        timeout=60,
    )
    assert unset.headers["x-sipp-cache"] == "bypass"  # no temperature: the target samples
    chat(gateway, "barrier one?")
    stored(gateway, "barrier one?")  # stores are written in order: the ones above are done
    calls = upstream.calls()
    assert chat(gateway, "no-store?").headers["x-sipp-cache"] == "store"
    assert chat(gateway, "sampled?", temperature=0.7).headers["x-sipp-cache"] == "bypass"
    assert upstream.calls() == calls + 2
    embedded = httpx.post(
        f"{gateway.public}/v1/embeddings",
        json={"model": "remote", "input": "embed me"},
        headers={"authorization": f"Bearer {TOKEN}"},
        timeout=60,
    )
    assert embedded.status_code == 200 and embedded.headers["x-sipp-cache"] == "bypass"


def test_failures_and_cut_streams_are_never_stored(gateway: Gateway, upstream: Provider) -> None:
    failed = chat(gateway, "error?")
    assert failed.status_code == 502 or failed.status_code >= 500
    assert failed.headers["x-sipp-cache"] == "miss"
    cut = chat(gateway, "cut?", stream=True)
    assert "event: error" in cut.text
    cut_json = chat(gateway, "cut json?")
    assert cut_json.status_code >= 500
    long = chat(gateway, "length?")
    assert long.status_code == 200 and long.headers["x-sipp-cache"] == "miss"
    long_stream = chat(gateway, "length stream?", stream=True)
    assert long_stream.status_code == 200
    # a consumer that hangs up mid-stream: the answer is not complete for it
    HOLD.clear()
    hangups = upstream.hangups
    with (
        httpx.Client(timeout=60) as client,
        client.stream(
            "POST",
            f"{gateway.public}/v1/chat",
            json={
                "model": "remote",
                "messages": [{"role": "user", "content": "hold?"}],
                "temperature": 0,
                "max_tokens": 50,
                "stream": True,
            },
            headers={"authorization": f"Bearer {TOKEN}"},
        ) as response,
    ):
        assert response.headers["x-sipp-cache"] == "miss"
    poll(lambda: upstream.hangups > hangups, "the gateway dropped the abandoned upstream call")
    HOLD.set()
    chat(gateway, "barrier two?")
    stored(gateway, "barrier two?")  # stores are written in order: none of the above is
    calls = upstream.calls()
    for ask in ("error?", "cut json?", "length?"):
        assert chat(gateway, ask).headers["x-sipp-cache"] == "miss"
    for ask in ("cut?", "length stream?", "hold?"):
        assert chat(gateway, ask, stream=True).headers["x-sipp-cache"] == "miss"
    assert upstream.calls() >= calls + 6  # each went upstream again (errors may be retried)


def test_one_callers_answer_never_answers_another(
    gateway: Gateway, upstream: Provider, tmp_path: Path
) -> None:
    chat(gateway, "private?")
    stored(gateway, "private?")
    calls = upstream.calls()
    other = chat(gateway, "private?", token=FREE)
    assert other.headers["x-sipp-cache"] == "store" and upstream.calls() == calls + 1
    with cached_gateway(tmp_path, upstream, sqlite_cache(tmp_path, 'scope = "shared"')) as gw:
        chat(gw, "shared?")
        stored(gw, "shared?")
        calls = upstream.calls()
        assert chat(gw, "shared?", token=FREE).headers["x-sipp-cache"] == "hit"
        assert upstream.calls() == calls


def test_ttl_is_absolute(upstream: Provider, tmp_path: Path) -> None:
    """Hit the entry again and again: a refreshed TTL would never let it expire."""
    with cached_gateway(tmp_path, upstream, sqlite_cache(tmp_path, "ttl_seconds = 2")) as gw:
        chat(gw, "short-lived?")
        stored(gw, "short-lived?")
        seen: list[str] = []

        def expired() -> bool:
            seen.append(chat(gw, "short-lived?").headers["x-sipp-cache"])
            return seen[-1] != "hit"

        poll(expired, "the entry expired while being hit", timeout=60)
        assert seen[-1] == "store"  # a miss, answered live and stored afresh


def test_hits_count_as_requests_not_tokens(upstream: Provider, tmp_path: Path) -> None:
    limits = "requests_per_minute = 3\ntokens_per_minute = 100"
    with cached_gateway(tmp_path, upstream, sqlite_cache(tmp_path), caller_limits=limits) as gw:
        # reserves ~55 of the 100 tokens; settles its 1011 reported tokens: deep in debt
        assert chat(gw, "big budget?").status_code == 200
        poll(lambda: gw.metric("sipp_gateway_cache_entries", '{target="remote"}') == 1, "stored")
        calls = upstream.calls()
        hit = chat(gw, "big budget?")  # request 2: no tokens needed
        assert hit.status_code == 200 and hit.headers["x-sipp-cache"] == "hit"
        live = chat(gw, "another?")  # a live request cannot get its tokens (not counted)
        assert live.status_code == 429 and "tokens_per_minute" in live.text
        assert chat(gw, "big budget?").headers["x-sipp-cache"] == "hit"  # request 3
        refused = chat(gw, "big budget?")  # request 4: a hit is still a request
        assert refused.status_code == 429 and "requests_per_minute" in refused.text
        assert upstream.calls() == calls
        # two hits answered, 15 tokens each; the refused one saved nothing
        assert gw.metric("sipp_gateway_cache_tokens_saved_total", '{target="remote"}') == 30


def test_the_sqlite_store_survives_a_restart(upstream: Provider, tmp_path: Path) -> None:
    with cached_gateway(tmp_path, upstream, sqlite_cache(tmp_path), name="first") as gw:
        chat(gw, "remember me?")
        stored(gw, "remember me?")
        assert gw.metric("sipp_gateway_cache_entries", '{target="remote"}') >= 1
    calls = upstream.calls()
    with cached_gateway(tmp_path, upstream, sqlite_cache(tmp_path), name="second") as gw:
        assert gw.metric("sipp_gateway_cache_entries", '{target="remote"}') >= 1
        again = chat(gw, "remember me?")
        assert again.headers["x-sipp-cache"] == "hit" and again.json()["text"] == "The sky is blue."
        assert upstream.calls() == calls
        assert (
            gw.metric(
                "sipp_gateway_cache_requests_total",
                '{result="hit",route="/v1/chat",target="remote"}',
            )
            == 1
        )
        assert gw.metric("sipp_gateway_cache_tokens_saved_total", '{target="remote"}') == 15


def test_a_hit_takes_no_admission_permit(upstream: Provider, tmp_path: Path) -> None:
    top = "max_concurrent_requests = 1"
    with cached_gateway(tmp_path, upstream, sqlite_cache(tmp_path), top=top) as gw:
        chat(gw, "while busy?")
        stored(gw, "while busy?")
        HOLD.clear()
        body = {
            "model": "remote",
            "messages": [{"role": "user", "content": "hold busy?"}],
            "temperature": 0,
            "stream": True,
        }
        try:
            with (
                httpx.Client(timeout=60) as client,
                client.stream(
                    "POST",
                    f"{gw.public}/v1/chat",
                    json=body,
                    headers={"authorization": f"Bearer {TOKEN}"},
                ) as busy,
            ):
                assert busy.status_code == 200  # holds the only permit until HOLD is set
                assert chat(gw, "not cached?").status_code == 429  # admission is full
                hit = chat(gw, "while busy?")
                assert hit.status_code == 200 and hit.headers["x-sipp-cache"] == "hit"
        finally:
            HOLD.set()
        assert gw.metric("sipp_gateway_cache_lookup_seconds_count", '{target="remote"}') >= 2


def test_browsers_may_send_cache_control_and_read_the_verdict(
    upstream: Provider, tmp_path: Path
) -> None:
    origin = "http://app.example"
    with cached_gateway(tmp_path, upstream, sqlite_cache(tmp_path), origins=f'["{origin}"]') as gw:
        preflight = httpx.options(
            f"{gw.public}/v1/chat",
            headers={
                "origin": origin,
                "access-control-request-method": "POST",
                "access-control-request-headers": "authorization,content-type,cache-control",
            },
            timeout=60,
        )
        assert preflight.status_code == 200
        assert "cache-control" in preflight.headers["access-control-allow-headers"].lower()
        answer = chat(
            gw, "from a browser?", headers={"origin": origin, "cache-control": "no-store"}
        )
        assert answer.headers["x-sipp-cache"] == "miss"
        assert "x-sipp-cache" in answer.headers["access-control-expose-headers"].lower()
