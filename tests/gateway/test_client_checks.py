"""Client checks on every public route (IP blocks and the rate limit, /v1/models too),
and the admin login's body read within its limit as it arrives."""

from __future__ import annotations

import select
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from .test_server import ENV, TOKEN, Gateway, running_gateway

AUTH = {"authorization": f"Bearer {TOKEN}"}
PUBLIC = [
    ("POST", "/v1/query"),
    ("POST", "/v1/chat"),
    ("POST", "/v1/embed"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/embeddings"),
    ("GET", "/v1/models"),
]


def _limited(toml: str) -> str:
    toml = toml.replace('metrics = "/metrics"', 'metrics = "/metrics"\nadmin = "/admin"')
    return toml.replace(
        "[security.rate_limit]\nenabled = false\nrequests_per_minute = 60\nburst = 60",
        "[security.rate_limit]\nenabled = true\nrequests_per_minute = 1\nburst = 1",
    )


@pytest.fixture(scope="module")
def gateway(smollm_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with running_gateway(smollm_path, tmp_path_factory.mktemp("checks"), _limited) as gw:
        yield gw


def _call(gw: Gateway, method: str, route: str) -> httpx.Response:
    body = {"model": "mock-openai", "prompt": "x", "max_tokens": 1}
    if method == "GET":
        return httpx.get(f"{gw.public}{route}", headers=AUTH, timeout=60)
    return httpx.post(f"{gw.public}{route}", json=body, headers=AUTH, timeout=60)


def test_every_public_route_is_rate_limited_then_blocked(gateway: Gateway) -> None:
    assert _call(gateway, "GET", "/v1/models").status_code == 200  # the burst's one token
    for method, route in PUBLIC:
        r = _call(gateway, method, route)
        assert r.status_code == 429, (route, r.text)
        assert r.json()["error"]["code"] == "rate_limited"
        assert int(r.headers["retry-after"]) >= 1
    assert gateway.metric("sipp_gateway_rate_limited_total") == len(PUBLIC)

    admin = httpx.Client(base_url=gateway.management, timeout=60)
    login = admin.post("/admin/api/session", json={"password": ENV["TEST_ADMIN_PASSWORD"]})
    csrf = {"x-sipp-admin-csrf": login.json()["csrf_token"]}
    assert admin.post(
        "/admin/api/controls/block", json={"ip": "127.0.0.1"}, headers=csrf
    ).is_success
    for method, route in PUBLIC:
        r = _call(gateway, method, route)
        assert r.status_code == 403 and r.json()["error"]["code"] == "authorization", route
    admin.post("/admin/api/controls/unblock", json={"ip": "127.0.0.1"}, headers=csrf)
    admin.close()


def _raw(gw: Gateway, head: str, chunks: list[bytes]) -> bytes:
    """Send `head`, then `chunks` until the server answers, never ending the body;
    the reply's head (empty if none came within 30 s)."""
    host, port = urlsplit(gw.management).hostname, urlsplit(gw.management).port
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(head.encode())
        for chunk in chunks:
            if select.select([sock], [], [], 0.2)[0]:
                break  # answered before the body ended: stop sending
            sock.sendall(chunk)
        reply = b""
        try:
            while b"\r\n\r\n" not in reply and (data := sock.recv(65536)):
                reply += data
        except TimeoutError:
            pass
    return reply


def test_admin_login_refuses_a_chunked_oversized_body_before_its_end(gateway: Gateway) -> None:
    head = (
        "POST /admin/api/session HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        "transfer-encoding: chunked\r\n\r\n"
    )
    piece = b'{"password": "' + b"x" * 4096
    # 40 KiB of a body that never ends (no final chunk): only a streaming read can answer.
    chunks = [f"{len(piece):x}\r\n".encode() + piece + b"\r\n"] * 10
    reply = _raw(gateway, head, chunks)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]


def test_admin_login_refuses_an_oversized_declared_length_at_once(gateway: Gateway) -> None:
    head = (
        "POST /admin/api/session HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        "content-length: 50000000\r\n\r\n"
    )
    reply = _raw(gateway, head, [b'{"password": "' + b"x" * 1000])  # 50 MB never sent
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]


def test_admin_login_with_a_complete_oversized_body_is_413(gateway: Gateway) -> None:
    r = httpx.post(
        f"{gateway.management}/admin/api/session", json={"password": "x" * 20_000}, timeout=30
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
