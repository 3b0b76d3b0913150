"""Provider endpoints against loopback servers speaking OpenAI's and Anthropic's wire formats.

Response bodies and stream chunks follow the shapes the providers send
(including role-only first deltas, usage-only last chunks, `data: [DONE]`,
Anthropic's named events and `ping`s). Every case runs sync and async.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from sipp import (
    AuthenticationError,
    ChatMessage,
    InvalidConfigError,
    InvalidRequestError,
    LocalTextOptions,
    ProviderDescriptor,
    RateLimitedError,
    RemoteError,
    SippTextOptions,
    UnsupportedOperationError,
)

from .anthropic_wire import (
    block_delta,
    block_start,
    block_stop,
    event,
    message,
    message_end,
    message_start,
)
from .harness import call
from .loopback import (
    Action,
    Chunk,
    LoopbackServer,
    Request,
    Reset,
    Sleep,
    Status,
    json_reply,
    sse_reply,
)

MODES = ["sync", "async"]
CHAT = [
    ChatMessage("system", "Answer concisely."),
    ChatMessage("system", "Use British spelling."),
    ChatMessage("user", "Explain provider inference."),
]
OPTS = SippTextOptions(max_tokens=64, temperature=0.2, top_p=0.9, stop=["END"])


def _data(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _openai(server: LoopbackServer, provider: str = "openai", **kw: Any) -> ProviderDescriptor:
    return ProviderDescriptor(
        provider, "gpt-test", api_key="sk-test", base_url=server.url + "/v1", **kw
    )  # type: ignore[arg-type]


def _anthropic(server: LoopbackServer) -> ProviderDescriptor:
    return ProviderDescriptor(
        "anthropic", "claude-test", api_key="ak-test", base_url=server.url + "/v1"
    )


def _chat_chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    return _data(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "gpt-test",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
    )


OPENAI_CHAT_STREAM = [
    _chat_chunk({"role": "assistant", "content": "", "refusal": None}),
    _chat_chunk({"content": "Providers"}),
    _chat_chunk({"content": " run models."}),
    _chat_chunk({}, "stop"),
    _data(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "gpt-test",
            "choices": [],
            "usage": {"prompt_tokens": 21, "completion_tokens": 3, "total_tokens": 24},
        }
    ),
    b"data: [DONE]\n\n",
]


# ------------------------------------------------------------------------- OpenAI
@pytest.mark.parametrize("mode", MODES)
def test_openai_query_uses_completions(mode: str) -> None:
    reply = json_reply(
        {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 1,
            "model": "gpt-test",
            "choices": [
                {"text": " a sentence.", "index": 0, "logprobs": None, "finish_reason": "length"}
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
        }
    )
    with LoopbackServer(lambda req: reply) as server:
        response, _ = call(mode, _openai(server), "query", "Write one", options=OPTS)
        req = server.requests[0]
    assert (req.path, req.headers["authorization"]) == ("/v1/completions", "Bearer sk-test")
    assert req.json() == {
        "model": "gpt-test",
        "prompt": "Write one",
        "max_tokens": 64,
        "temperature": 0.2,
        "top_p": 0.9,
        "stop": ["END"],
    }
    assert (response.text, response.finish_reason, response.usage.total_tokens) == (
        " a sentence.",
        "length",
        8,
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "provider, max_key", [("openai", "max_completion_tokens"), ("openai_compatible", "max_tokens")]
)
def test_openai_chat(mode: str, provider: str, max_key: str) -> None:
    reply = json_reply(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": "gpt-test",
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": "Providers run models.",
                        "refusal": None,
                    },
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 21, "completion_tokens": 4, "total_tokens": 25},
        }
    )
    with LoopbackServer(lambda req: reply) as server:
        response, _ = call(
            mode,
            _openai(server, provider),
            "chat",
            CHAT,
            options=SippTextOptions(max_tokens=32),
            provider_options={"reasoning_effort": "low"},
        )
        body = server.requests[0].json()
    assert server.requests[0].path == "/v1/chat/completions"
    assert body == {
        "model": "gpt-test",
        "messages": [{"role": m.role, "content": m.content} for m in CHAT],
        max_key: 32,
        "reasoning_effort": "low",
    }
    assert response.text == "Providers run models." and response.usage.output_tokens == 4


@pytest.mark.parametrize("mode", MODES)
def test_openai_chat_stream(mode: str) -> None:
    with LoopbackServer(lambda req: sse_reply(OPENAI_CHAT_STREAM)) as server:
        response, batches = call(mode, _openai(server), "chat", CHAT, emit_tokens=True)
        body = server.requests[0].json()
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert [b.text for b in batches] == ["Providers", " run models."]
    assert (response.text, response.finish_reason, response.usage.total_tokens) == (
        "Providers run models.",
        "stop",
        24,
    )


@pytest.mark.parametrize("mode", MODES)
def test_openai_completions_stream(mode: str) -> None:
    chunks = [
        _data(
            {
                "id": "c",
                "object": "text_completion",
                "choices": [{"text": t, "index": 0, "finish_reason": f}],
            }
        )
        for t, f in (("Once", None), (" upon", None), ("", "length"))
    ]
    with LoopbackServer(lambda req: sse_reply([*chunks, b"data: [DONE]\n\n"])) as server:
        response, batches = call(mode, _openai(server), "query", "x", emit_tokens=True)
    assert [b.text for b in batches] == ["Once", " upon"]
    assert (response.text, response.finish_reason, response.usage) == ("Once upon", "length", None)


@pytest.mark.parametrize("mode", MODES)
def test_openai_embeddings(mode: str) -> None:
    reply = json_reply(
        {
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1, -0.2, 0.3]}],
            "model": "text-embedding-test",
            "usage": {"prompt_tokens": 4, "total_tokens": 4},
        }
    )
    with LoopbackServer(lambda req: reply) as server:
        response, _ = call(mode, _openai(server), "embed", "Sipp embedding input.")
        req = server.requests[0]
    assert req.path == "/v1/embeddings"
    assert req.json() == {
        "model": "gpt-test",
        "input": "Sipp embedding input.",
        "encoding_format": "float",
    }
    assert response.values == [0.1, -0.2, 0.3] and response.usage.input_tokens == 4


@pytest.mark.parametrize("mode", MODES)
def test_provider_options_cannot_override_typed_fields(mode: str) -> None:
    with LoopbackServer(lambda req: json_reply({})) as server:
        for bad in ({"model": "other"}, {"temperature": 2}, {"messages": []}, {"stream": True}):
            with pytest.raises(InvalidRequestError, match="cannot override typed fields"):
                call(mode, _openai(server), "chat", CHAT, provider_options=bad)
        with pytest.raises(InvalidRequestError, match="local options"):
            call(mode, _openai(server), "query", "x", local=LocalTextOptions(grammar="root ::= x"))
        with pytest.raises(InvalidRequestError, match="endpoint_options are for gateway"):
            call(mode, _openai(server), "query", "x", endpoint_options={"a": 1})
        assert server.requests == []


@pytest.mark.parametrize("mode", MODES)
def test_openai_errors_are_typed_with_status_message_and_request_id(mode: str) -> None:
    def handler(req: Request) -> list[Any]:
        status = {"a": 401, "b": 429, "c": 500, "d": 400}[req.json()["prompt"]]
        return json_reply(
            {
                "error": {
                    "message": f"problem {status}",
                    "type": "some_error",
                    "param": None,
                    "code": "x",
                }
            },
            status,
            {"x-request-id": f"req_{status}"},
        )

    with LoopbackServer(handler) as server:
        d = _openai(server)
        with pytest.raises(AuthenticationError) as auth:
            call(mode, d, "query", "a")
        with pytest.raises(RateLimitedError) as limited:
            call(mode, d, "query", "b")
        with pytest.raises(RemoteError) as server_error:
            call(mode, d, "query", "c")
        with pytest.raises(InvalidRequestError) as bad:
            call(mode, d, "query", "d")
    assert (auth.value.status, auth.value.request_id, auth.value.retryable) == (
        401,
        "req_401",
        False,
    )
    assert "problem 401" in auth.value.message
    assert (limited.value.status, limited.value.request_id, limited.value.retryable) == (
        429,
        "req_429",
        True,
    )
    assert (server_error.value.status, server_error.value.retryable) == (500, True)
    assert (bad.value.status, bad.value.retryable) == (400, False)


@pytest.mark.parametrize("mode", MODES)
def test_openai_broken_bodies_and_streams(mode: str) -> None:
    with (
        LoopbackServer(
            lambda req: [Status(200, {"content-type": "application/json"}), Chunk(b"<html>")]
        ) as server,
        pytest.raises(RemoteError, match="response is not JSON"),
    ):
        call(mode, _openai(server), "chat", CHAT)
    with LoopbackServer(lambda req: sse_reply(OPENAI_CHAT_STREAM[:3])) as server:
        with pytest.raises(RemoteError, match=r"ended before data: \[DONE\]") as info:
            call(mode, _openai(server), "chat", CHAT, emit_tokens=True)
        assert info.value.retryable and info.value.partial_text == "Providers run models."
    with LoopbackServer(
        lambda req: [*sse_reply(OPENAI_CHAT_STREAM[:2]), Sleep(0.05), Reset()]
    ) as server:
        with pytest.raises(RemoteError) as reset:
            call(mode, _openai(server), "chat", CHAT, emit_tokens=True)
        assert reset.value.retryable and reset.value.partial_text == "Providers"


@pytest.mark.parametrize("mode", MODES)
def test_openai_compatible_correlation_header(mode: str) -> None:
    def handler(req: Request) -> list[Any]:
        return json_reply(
            {"error": {"message": "nope"}},
            503,
            {"x-correlation-id": req.headers["x-correlation-id"]},
        )

    with LoopbackServer(handler) as server:
        d = ProviderDescriptor(
            "openai_compatible",
            "local-model",
            base_url=server.url,
            correlation_header="x-correlation-id",
        )
        with pytest.raises(RemoteError) as info:
            call(mode, d, "query", "x")
        sent = server.requests[0].headers
    assert "authorization" not in sent
    assert len(sent["x-correlation-id"]) == 32 and info.value.request_id == sent["x-correlation-id"]
    assert info.value.retryable and info.value.status == 503


# ------------------------------------------------------------------------- Anthropic
ANTHROPIC_STREAM = [
    message_start(25),
    block_start(0, {"type": "text", "text": ""}),
    event("ping", {"type": "ping"}),
    block_delta(0, {"type": "text_delta", "text": "Hello"}),
    block_delta(0, {"type": "text_delta", "text": ", world"}),
    block_stop(0),
    *message_end("max_tokens", 15),
]


@pytest.mark.parametrize("mode", MODES)
def test_anthropic_query_wraps_prompt_as_user_message(mode: str) -> None:
    reply = json_reply(
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-test",
            "content": [{"type": "text", "text": "Hi there."}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 4},
        }
    )
    with LoopbackServer(lambda req: reply) as server:
        response, _ = call(mode, _anthropic(server), "query", "Say hi")
        req = server.requests[0]
    assert req.path == "/v1/messages"
    assert (req.headers["x-api-key"], req.headers["anthropic-version"]) == ("ak-test", "2023-06-01")
    assert req.json() == {
        "model": "claude-test",
        "max_tokens": 1024,
        "messages": [{"role": "user", "content": "Say hi"}],
    }
    assert (response.text, response.finish_reason, response.usage.total_tokens) == (
        "Hi there.",
        "stop",
        14,
    )


@pytest.mark.parametrize("mode", MODES)
def test_anthropic_chat_joins_system_messages_and_streams(mode: str) -> None:
    with LoopbackServer(lambda req: sse_reply(ANTHROPIC_STREAM)) as server:
        response, batches = call(
            mode, _anthropic(server), "chat", CHAT, options=OPTS, emit_tokens=True
        )
        body = server.requests[0].json()
    assert body == {
        "model": "claude-test",
        "max_tokens": 64,
        "stream": True,
        "temperature": 0.2,
        "top_p": 0.9,
        "stop_sequences": ["END"],
        "system": "Answer concisely.\n\nUse British spelling.",
        "messages": [{"role": "user", "content": "Explain provider inference."}],
    }
    assert [b.text for b in batches] == ["Hello", ", world"]
    assert (response.text, response.finish_reason) == ("Hello, world", "length")
    assert (response.usage.input_tokens, response.usage.output_tokens) == (25, 15)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_reports_which_stop_sequence_ended_the_text(mode: str, stream: bool) -> None:
    def reply(req: Request) -> list[Action]:
        if stream:
            return sse_reply(
                [
                    message_start(),
                    block_start(0, {"type": "text", "text": ""}),
                    block_delta(0, {"type": "text_delta", "text": "Hello"}),
                    block_stop(0),
                    *message_end("stop_sequence", 2, "END"),
                ]
            )
        return json_reply(message([{"type": "text", "text": "Hello"}], "stop_sequence", 2, "END"))

    with LoopbackServer(reply) as server:
        response, _ = call(mode, _anthropic(server), "chat", CHAT, options=OPTS, emit_tokens=stream)
    assert (response.text, response.finish_reason, response.stop_sequence) == (
        "Hello",
        "stop",
        "END",
    )


@pytest.mark.parametrize("mode", MODES)
def test_anthropic_errors(mode: str) -> None:
    error_event = event(
        "error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    )
    with LoopbackServer(lambda req: sse_reply([*ANTHROPIC_STREAM[:4], error_event])) as server:
        with pytest.raises(RemoteError) as mid:
            call(mode, _anthropic(server), "query", "x", emit_tokens=True)
    assert (
        mid.value.retryable
        and mid.value.partial_text == "Hello"
        and "Overloaded" in mid.value.message
    )
    body = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    with LoopbackServer(lambda req: json_reply(body, 529, {"request-id": "req_529"})) as server:
        with pytest.raises(RemoteError) as http:
            call(mode, _anthropic(server), "query", "x")
    assert (http.value.status, http.value.request_id, http.value.retryable) == (
        529,
        "req_529",
        True,
    )
    with LoopbackServer(lambda req: sse_reply(ANTHROPIC_STREAM[:5])) as server:
        with pytest.raises(RemoteError, match="ended before message_stop"):
            call(mode, _anthropic(server), "query", "x", emit_tokens=True)


@pytest.mark.parametrize("mode", MODES)
def test_anthropic_embed_is_unsupported(mode: str) -> None:
    with LoopbackServer(lambda req: json_reply({})) as server:
        with pytest.raises(UnsupportedOperationError, match="no embeddings API"):
            call(mode, _anthropic(server), "embed", "x")
        assert server.requests == []


def test_provider_descriptor_validation() -> None:
    with pytest.raises(InvalidConfigError, match="needs base_url"):
        ProviderDescriptor("openai_compatible", "m")
    with pytest.raises(InvalidConfigError, match="needs api_key"):
        ProviderDescriptor("openai", "gpt")
    with pytest.raises(InvalidConfigError, match="must be openai, anthropic"):
        ProviderDescriptor("gemini", "g", api_key="k")  # type: ignore[arg-type]
    d = ProviderDescriptor("anthropic", "claude", api_key="secret-key")
    assert d.base_url == "https://api.anthropic.com/v1" and "secret-key" not in repr(d)


# ------------------------------------------------------------------------- transport faults
@pytest.mark.parametrize("mode", MODES)
def test_provider_connection_refused(mode: str) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = ProviderDescriptor("openai_compatible", "m", base_url=f"http://127.0.0.1:{port}/v1")
    with pytest.raises(RemoteError, match="cannot connect") as info:
        call(mode, d, "chat", CHAT)
    assert info.value.retryable


@pytest.mark.parametrize("mode", MODES)
def test_provider_read_timeout_mid_stream(mode: str) -> None:
    from sipp import GatewayTimeoutPolicy

    with LoopbackServer(lambda req: [*sse_reply(OPENAI_CHAT_STREAM[:2]), Sleep(3)]) as server:
        d = ProviderDescriptor(
            "openai",
            "gpt-test",
            api_key="k",
            base_url=server.url + "/v1",
            timeout=GatewayTimeoutPolicy(stream_read_s=0.3),
        )
        with pytest.raises(RemoteError) as info:
            call(mode, d, "chat", CHAT, emit_tokens=True)
    assert info.value.code == "timeout" and info.value.partial_text == "Providers"


@pytest.mark.parametrize("mode", MODES)
def test_anthropic_reset_mid_stream(mode: str) -> None:
    with LoopbackServer(
        lambda req: [*sse_reply(ANTHROPIC_STREAM[:4]), Sleep(0.05), Reset()]
    ) as server:
        with pytest.raises(RemoteError) as info:
            call(mode, _anthropic(server), "query", "x", emit_tokens=True)
    assert info.value.retryable and info.value.partial_text == "Hello"
