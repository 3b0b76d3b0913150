"""End to end: examples/custom_gateway.py (built on sipp.protocol) serving the real
default model, called through a `GatewayDescriptor` endpoint: the same client API
on both sides of the HTTP boundary, and the same greedy answer as in-process."""

from __future__ import annotations

import importlib.util
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from sipp import (
    ChatMessage,
    EndpointNotFoundError,
    GatewayDescriptor,
    LocalModelDescriptor,
    SippClient,
    SippTextOptions,
    UnsupportedOperationError,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom_gateway.py"
GREEDY = SippTextOptions(max_tokens=16, temperature=0)


# httpx defaults to 5 s, which a loaded 2-core CI machine can exceed; the test is not timed.
_TIMEOUT = 60.0


def _load_example() -> Any:
    spec = importlib.util.spec_from_file_location("custom_gateway", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gateway_url(smollm_path: Path) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = _load_example().build_app(str(smollm_path))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)


def test_gateway_client_matches_in_process_answers(gateway_url: str, smollm_path: Path) -> None:
    messages = [ChatMessage("user", "Name a color.")]
    with SippClient() as client:
        remote = client.add("remote", GatewayDescriptor("local", gateway_url))
        local = client.add("local", LocalModelDescriptor(smollm_path))
        remote_query = client.query("The sky is", endpoint=remote, options=GREEDY).result()
        local_query = client.query("The sky is", endpoint=local, options=GREEDY).result()
        run = client.chat(messages, endpoint=remote, options=GREEDY, emit_tokens=True)
        streamed = "".join(b.text for b in run)
        remote_chat = run.result()
        local_chat = client.chat(messages, endpoint=local, options=GREEDY).result()
    assert remote_query.text == local_query.text and remote_query.usage == local_query.usage
    assert streamed == remote_chat.text == local_chat.text
    assert remote_chat.usage == local_chat.usage


def test_errors_cross_the_wire_typed(gateway_url: str) -> None:
    with SippClient() as client:
        with pytest.raises(EndpointNotFoundError, match="unknown target 'nope'") as missing:
            client.query(
                "x", endpoint=client.add("g", GatewayDescriptor("nope", gateway_url))
            ).result()
        assert missing.value.status == 404
        with pytest.raises(UnsupportedOperationError, match="not loaded for embeddings") as embed:
            client.embed(
                "x", endpoint=client.add("g", GatewayDescriptor("local", gateway_url))
            ).result()
        assert embed.value.status == 400


def test_raw_http_bad_bodies(gateway_url: str) -> None:
    local_only = httpx.post(
        f"{gateway_url}/v1/query",
        json={"model": "local", "prompt": "x", "context_key": "k"},
        timeout=_TIMEOUT,
    )
    assert local_only.status_code == 400
    assert local_only.json() == {
        "error": {
            "code": "invalid_request",
            "message": "field 'context_key' is a local-only option; gateway requests cannot carry it",
        }
    }
    broken = httpx.post(f"{gateway_url}/v1/chat", content=b"{nope", timeout=_TIMEOUT)
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_request"
    huge = httpx.post(f"{gateway_url}/v1/query", content=b"x" * (2 << 20), timeout=_TIMEOUT)
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "payload_too_large"
    frames = httpx.post(
        f"{gateway_url}/v1/query",
        json={
            "model": "local",
            "prompt": "Count: 1, 2, 3,",
            "max_tokens": 4,
            "temperature": 0,
            "stream": True,
        },
        timeout=_TIMEOUT,
    )
    assert frames.headers["content-type"].startswith("text/event-stream")
    assert b"event: token" in frames.content and frames.content.endswith(
        b'event: done\ndata: {"finish_reason":"length"}\n\n'
    )
