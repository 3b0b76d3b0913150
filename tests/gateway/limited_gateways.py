"""Provider-only `sipp-gateway serve` processes with limits, for the shaping tests: no
local model to load, one openai_compatible target on a loopback upstream."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..ports import free_port
from ..remote.loopback import Action, LoopbackServer, Request, Wait
from .test_server import ENV, LIMITED, TOKEN, Gateway, serving
from .upstreams import text_reply

__all__ = ["FREE", "LIMITED_CALLER", "held_upstream", "limited_gateway", "toml"]

LIMITED_CALLER, FREE = TOKEN, LIMITED  # bearer tokens: caller "team" (limited), "free"


def toml(
    upstream_url: str,
    public: int,
    management: int,
    caller_limits: str = "",
    target_limits: str = "",
    state: str = "",
    origins: str = "[]",
) -> str:
    return f"""
public_bind = "127.0.0.1:{public}"
management_bind = "127.0.0.1:{management}"
max_request_bytes = 65536
allowed_origins = {origins}
admin_password_env = "TEST_ADMIN_PASSWORD"

[security.client_ip]
source = "peer"
trusted_proxy_cidrs = []

[security.rate_limit]
enabled = false

[routes]
index = "/"
readiness = "/readyz"
metrics = "/metrics"
admin = "/admin"

[state]
{state}

[[tokens]]
env = "TEST_TOKEN_ALL"
caller = "team"
targets = []
[tokens.limits]
{caller_limits}

[[tokens]]
env = "TEST_TOKEN_LOCAL"
caller = "free"
targets = []

[[targets]]
name = "remote"
type = "openai_compatible"
model = "upstream-model"
base_url = "{upstream_url}/v1"
[targets.limits]
{target_limits}
"""


@contextmanager
def limited_gateway(
    directory: Path,
    upstream: LoopbackServer,
    caller_limits: str = "",
    target_limits: str = "",
    state: str = "",
    env: dict[str, str] | None = None,
    name: str = "gateway",
    origins: str = "[]",
) -> Iterator[Gateway]:
    """A ready gateway; on exit SIGTERM and exit code 0."""
    public, management = free_port(), free_port()
    path = directory / f"{name}.toml"
    path.write_text(
        toml(upstream.url, public, management, caller_limits, target_limits, state, origins)
    )
    with serving(path, {**ENV, **(env or {})}, public, management, timeout=60) as gw:
        yield gw


def held_upstream(release: threading.Event, **reply: Any) -> LoopbackServer:
    """An upstream that answers (see `text_reply`) only once `release` is set."""

    def handler(req: Request) -> list[Action]:
        return [Wait(release, timeout=120), *text_reply(req, **reply)]

    return LoopbackServer(handler)
