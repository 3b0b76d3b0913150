"""Provider-only `sipp-gateway serve` processes for the admin dashboard's pool and usage
tests: the limited `remote` target of `limited_gateways`, plus a pool of two loopback
deployments and a chain of single-deployment targets whose fallbacks the tests edit."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from ..ports import free_port
from ..remote.loopback import LoopbackServer
from .limited_gateways import LIMITED_CALLER, toml
from .pool_upstreams import Deployment, pool_toml
from .test_server import ENV, Gateway, serving
from .upstreams import poll, text_reply

PASSWORD = ENV["TEST_ADMIN_PASSWORD"]
AUTH = {"authorization": f"Bearer {LIMITED_CALLER}"}
SINGLES = ("primary", "spare1", "spare2")
CALLER_LIMITS = "requests_per_minute = 1000\ntokens_per_minute = 100000\ntokens_per_day = 1000000"
TARGET_LIMITS = "requests_per_minute = 500\ntokens_per_day = 2000000"
# The breaker of a failing deployment opens after two failures and stays open.
POOL_TABLES = {
    "retry": "attempts = 2\nbackoff_base_seconds = 0.01\nbackoff_cap_seconds = 0.02",
    "breaker": "consecutive_failures = 2\ncooldown_seconds = 600",
}


@pytest.fixture(scope="module")
def upstream() -> Iterator[LoopbackServer]:
    """A provider answering every chat with text, for a module's admin gateways."""
    server = LoopbackServer(text_reply)
    yield server
    server.close()


@pytest.fixture(scope="module")
def ups() -> Iterator[dict[str, Deployment]]:
    """The pool deployments `pools_toml` names, closed after the module."""
    out = deployments()
    yield out
    for up in out.values():
        up.close()


def deployments() -> dict[str, Deployment]:
    return {name: Deployment(name) for name in ("a", "b", *SINGLES)}


def pools_toml(ups: dict[str, Deployment]) -> str:
    out = pool_toml("pool", {n: ups[n].url for n in "ab"}, **POOL_TABLES)
    for name in SINGLES:  # plain targets: `x-sipp-target` is the target's name
        extra = 'fallbacks = ["spare1"]' if name == "primary" else ""
        out += (
            f'\n[[targets]]\nname = "{name}"\ntype = "openai_compatible"\nmodel = "m"\n'
            f'base_url = "{ups[name].url}/v1"\n{extra}\n'
        )
    return out


@contextmanager
def admin_gateway(
    directory: Path,
    upstream: LoopbackServer,
    ups: dict[str, Deployment],
    state: str = "",
    env: dict[str, str] | None = None,
    name: str = "gateway",
) -> Iterator[Gateway]:
    """A ready gateway (admin on `/admin`); on exit SIGTERM and exit code 0."""
    public, management = free_port(), free_port()
    path = directory / f"{name}.toml"
    config = toml(upstream.url, public, management, CALLER_LIMITS, TARGET_LIMITS, state)
    path.write_text(config + pools_toml(ups))
    with serving(
        path, {**ENV, **(env or {})}, public, management, timeout=60, secrets=ENV.values()
    ) as gw:
        yield gw


def login(gw: Gateway) -> tuple[httpx.Client, dict[str, str]]:
    """A client holding an admin session, and the CSRF header its changes need."""
    client = httpx.Client(base_url=gw.management, timeout=60)
    r = client.post("/admin/api/session", json={"password": PASSWORD})
    assert r.status_code == 200, r.text
    return client, {"x-sipp-admin-csrf": r.json()["csrf_token"]}


def chat(gw: Gateway, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    return httpx.post(f"{gw.public}/v1/chat/completions", json=body, headers=AUTH, timeout=60)


def pool(client: httpx.Client, target: str) -> dict[str, Any]:
    r = client.get("/admin/api/pools")
    assert r.status_code == 200, r.text
    (entry,) = [p for p in r.json()["pools"] if p["target"] == target]
    return dict(entry)


def open_breaker(gw: Gateway, client: httpx.Client, ups: dict[str, Deployment]) -> None:
    """Make deployment `a` of `pool` answer 500 until its breaker opens (every request
    still succeeds: its retry goes to `b`)."""
    ups["a"].mode = "500"

    def opened() -> bool:
        assert chat(gw, "pool").status_code == 200
        deps = {d["name"]: d for d in pool(client, "pool")["deployments"]}
        return bool(deps["a"]["breaker"] == "open")

    poll(opened, "deployment a's breaker opens", timeout=60)
