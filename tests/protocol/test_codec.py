from __future__ import annotations

import json

import pytest

from sipp import (
    AuthorizationError,
    ChatMessage,
    InvalidRequestError,
    OverloadedError,
    RateLimitedError,
    RemoteError,
    SippEmbeddingResponse,
    SippTextOptions,
    SippTextResponse,
    Usage,
)
from sipp.protocol import (
    STATUS_BY_CODE,
    chat_body,
    decode_chat_body,
    decode_embed_body,
    decode_query_body,
    embedding_response_body,
    error_body,
    error_frame,
    error_from_body,
    load_json_object,
    parse_embedding_response,
    parse_text_response,
    query_body,
    status_for,
    text_response_body,
    usage_frame,
)


def test_decode_query_with_all_typed_fields() -> None:
    body = b'{"model":"local","prompt":"Hi","max_tokens":64,"temperature":0.2,"top_p":0.9,"stop":["\\n"],"stream":true}'
    req = decode_query_body(body)
    assert (req.target, req.operation, req.prompt, req.stream) == ("local", "query", "Hi", True)
    assert req.options == SippTextOptions(max_tokens=64, temperature=0.2, top_p=0.9, stop=["\n"])


def test_decode_chat_and_embed() -> None:
    chat = decode_chat_body(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
            ],
        }
    )
    assert chat.messages == (ChatMessage("system", "Be brief."), ChatMessage("user", "Hi"))
    assert chat.stream is False
    embed = decode_embed_body('{"model":"e","input":"gateway inference"}')
    assert (embed.target, embed.input) == ("e", "gateway inference")


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b"{not json", "not valid JSON"),
        (b"[1,2]", "must be a JSON object"),
        (b'{"prompt":"x"}', "field 'model' is required"),
        (b'{"model":"m"}', "field 'prompt' is required"),
        (
            b'{"model":"m","prompt":"x","context_key":"k"}',
            "field 'context_key' is a local-only option",
        ),
        (
            b'{"model":"m","prompt":"x","grammar":"root ::= x"}',
            "field 'grammar' is a local-only option",
        ),
        (b'{"model":"m","prompt":"x","json_schema":{}}', "'json_schema' is a local-only"),
        (
            b'{"model":"m","prompt":"x","provider_options":{}}',
            "field 'provider_options' is for direct provider",
        ),
        (b'{"model":"m","prompt":"x","maxTokens":5}', "did you mean 'max_tokens'?"),
        (
            b'{"model":"m","prompt":"x","max_tokens":-1}',
            "field 'max_tokens' must be a positive integer",
        ),
        (
            b'{"model":"m","prompt":"x","max_tokens":true}',
            "'max_tokens' must be a positive integer",
        ),
        (b'{"model":"m","prompt":"x","temperature":"hot"}', "field 'temperature' must be a number"),
        (b'{"model":"m","prompt":"x","temperature":-1}', "temperature must be >= 0"),
        (b'{"model":"m","prompt":"x","stop":[1]}', "field 'stop' must be a string or an array"),
        (b'{"model":"m","prompt":"x","stream":"yes"}', "field 'stream' must be a boolean"),
    ],
)
def test_decode_query_rejects_with_the_field_named(body: bytes, fragment: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        decode_query_body(body)
    assert fragment in info.value.message
    assert status_for(info.value) == 400


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"model": "m", "messages": []}, "non-empty array"),
        ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"model": "m", "messages": [{"role": "user"}]}, "messages[0]"),
        ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "media": []},
            "'media' is a local-only",
        ),
    ],
)
def test_decode_chat_rejects(body: dict, fragment: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(InvalidRequestError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        decode_chat_body(body)


def test_embed_rejects_normalize_and_generation_fields() -> None:
    with pytest.raises(InvalidRequestError, match="'normalize' is a local-only"):
        decode_embed_body({"model": "e", "input": "x", "normalize": True})
    with pytest.raises(InvalidRequestError, match="'max_tokens' is not a known field"):
        decode_embed_body({"model": "e", "input": "x", "max_tokens": 3})


def test_extra_fields_are_opt_in() -> None:
    req = decode_query_body(
        {"model": "m", "prompt": "x", "priority": "high"}, extra_fields=["priority"]
    )
    assert req.extras == {"priority": "high"}


def test_response_bodies_round_trip() -> None:
    response = SippTextResponse("A gateway centralizes inference.", "stop", Usage(8, 12, 20))
    body = text_response_body("local", response)
    assert body == {
        "id": "response",
        "model": "local",
        "text": "A gateway centralizes inference.",
        "finish_reason": "stop",
        "usage": {"input_tokens": 8, "output_tokens": 12, "total_tokens": 20},
    }
    assert parse_text_response(json.dumps(body).encode()) == response
    no_usage = text_response_body("local", SippTextResponse("x", "length"))
    assert "usage" not in no_usage
    emb = embedding_response_body("e", SippEmbeddingResponse([0.0123, -0.0456], "mean", True, 2))
    assert emb == {"id": "response", "model": "e", "embedding": [0.0123, -0.0456]}
    assert parse_embedding_response(json.dumps(emb).encode()).values == [0.0123, -0.0456]


def test_malformed_responses_are_typed_remote_errors() -> None:
    with pytest.raises(RemoteError, match="malformed text response"):
        parse_text_response(b'{"text": 5}')
    with pytest.raises(RemoteError, match="malformed embedding"):
        parse_embedding_response(b"<html>")


def test_client_side_bodies() -> None:
    opts = SippTextOptions(max_tokens=64, temperature=0.2, stop="END")
    assert query_body("t", "p", opts, stream=True, extra={"trace": "a"}) == {
        "model": "t",
        "prompt": "p",
        "max_tokens": 64,
        "temperature": 0.2,
        "stop": ["END"],
        "stream": True,
        "trace": "a",
    }
    assert chat_body("t", [ChatMessage("user", "hi")], SippTextOptions(), stream=False)[
        "messages"
    ] == [{"role": "user", "content": "hi"}]
    with pytest.raises(InvalidRequestError, match="cannot override typed fields: model"):
        query_body("t", "p", opts, stream=False, extra={"model": "other"})
    with pytest.raises(InvalidRequestError, match="cannot carry grammar"):
        query_body("t", "p", opts, stream=False, extra={"grammar": "x"})


def test_status_table_matches_the_spec() -> None:
    expected = {
        "invalid_request": 400,
        "authentication": 401,
        "authorization": 403,
        "not_found": 404,
        "payload_too_large": 413,
        "rate_limited": 429,
        "overloaded": 429,
        "execution": 500,
    }
    assert {k: STATUS_BY_CODE[k] for k in expected} == expected


def test_error_envelopes_and_frames() -> None:
    assert error_body("authorization", "token is not allowed to access target") == {
        "error": {"code": "authorization", "message": "token is not allowed to access target"}
    }
    err = error_from_body(
        403, b'{"error":{"code":"authorization","message":"nope"}}', request_id="r1"
    )
    assert isinstance(err, AuthorizationError) and (err.status, err.request_id, err.message) == (
        403,
        "r1",
        "nope",
    )
    assert isinstance(
        error_from_body(429, b'{"error":{"code":"overloaded","message":"full"}}'), OverloadedError
    )
    assert isinstance(error_from_body(429, b"slow down"), RateLimitedError)
    weird = error_from_body(502, b"<html>bad gateway</html>")
    assert isinstance(weird, RemoteError) and weird.retryable and weird.status == 502
    custom = error_from_body(418, b'{"error":{"code":"teapot","message":"short and stout"}}')
    assert custom.code == "teapot" and isinstance(custom, RemoteError) and not custom.retryable
    frame = error_frame(OverloadedError("queue full"))
    assert (
        frame == b'event: error\ndata: {"error":{"code":"overloaded","message":"queue full"}}\n\n'
    )
    assert usage_frame(Usage(1, 2, 3)).startswith(b"event: usage\ndata: {")


@pytest.mark.parametrize("number", ["1e400", "-1e400", "1E+999", "1" + "0" * 400])
def test_a_number_past_a_doubles_range_is_refused(number: str) -> None:
    # 1e400 would parse to infinity, which no JSON encoder can write back; an integer that
    # long overflows wherever it meets a float (here: temperature's finiteness check).
    body = f'{{"model":"m","prompt":"x","temperature":{number}}}'
    with pytest.raises(InvalidRequestError, match="number out of range") as info:
        decode_query_body(body)
    assert status_for(info.value) == 400
    assert load_json_object('{"a": 1e308, "b": -1.5e-400}') == {"a": 1e308, "b": -0.0}


def test_stop_strings_are_capped_in_number_and_length() -> None:
    def decode(stop: object) -> SippTextOptions:
        return decode_query_body({"model": "m", "prompt": "x", "stop": stop}).options

    assert len(decode([f"<{i}>" for i in range(16)]).stop or ()) == 16
    assert decode("x" * 1000).stop == ("x" * 1000,)
    for refused, fragment in (
        ([f"<{i}>" for i in range(17)], "field 'stop' holds 17 strings; at most 16"),
        ("x" * 1001, "field 'stop' holds a string of 1001 characters; at most 1000"),
    ):
        with pytest.raises(InvalidRequestError, match=fragment) as info:
            decode(refused)
        assert info.value.field == "stop"


def test_error_bodies_and_frames_replace_lone_surrogates() -> None:
    # A body holding one is refused whole; an error that quotes one anyway (raised by
    # code that did not read a body) must still be writable.
    with pytest.raises(InvalidRequestError, match="not valid Unicode"):
        decode_chat_body(b'{"model":"m","messages":[],"\\udfff":1}')
    error = InvalidRequestError("field '\udfff' is not a known field")
    body = error_body(error.code, error.message)
    assert body["error"]["message"] == "field '\ufffd' is not a known field"
    json.dumps(body, ensure_ascii=False).encode()  # UTF-8 can write it
    frame = error_frame(error).decode()
    assert "field '\ufffd' is not a known field" in frame
