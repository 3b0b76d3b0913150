"""A local engine whose worker dies says so, instead of looking ready.

The fault is injected into the real engine of a real process: its scheduler step
raises. Runs in flight end with `execution`, queued ones with `unavailable`, and
new requests are refused with `UnavailableError` (503 on a gateway), while the
gateway's readiness, index and admin dashboard report the target as failed."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sipp import (
    AsyncSippClient,
    ContextRuntimeConfig,
    ExecutionError,
    LocalModelDescriptor,
    NativeRuntimeConfig,
    SippClient,
    SippTextOptions,
    UnavailableError,
)

from ..ports import free_port

SHORT = SippTextOptions(max_tokens=4, temperature=0)
TOKEN, PASSWORD = "tok-crash-5d1e", "pw-crash-77"
ENV = {"CRASH_TEST_TOKEN": TOKEN, "CRASH_TEST_ADMIN_PASSWORD": PASSWORD}


class InjectedFault(RuntimeError):
    pass


def _crash_next_step(engine: Any, release: threading.Event | None = None) -> threading.Event:
    """Make the engine's next text step raise (after `release`, if given)."""
    entered = threading.Event()

    def step() -> None:
        entered.set()
        if release is not None:
            assert release.wait(60)
        raise InjectedFault("injected scheduler fault")

    engine._text_step = step  # an instance attribute shadows the method for this engine only
    return entered


def test_a_dead_worker_ends_every_run_and_refuses_new_ones(smollm_path: Path) -> None:
    config = NativeRuntimeConfig(context=ContextRuntimeConfig(n_ctx=256, n_parallel=1))
    with SippClient() as client:
        ref = client.add("m", LocalModelDescriptor(smollm_path, config))
        assert client.query("Hi", endpoint=ref, options=SHORT).result().text
        assert client.endpoint_failure(ref) is None
        engine = client._registry._endpoints[ref.id]._engine  # type: ignore[attr-defined]
        release = threading.Event()
        entered = _crash_next_step(engine, release)
        running = client.query("The sky is", endpoint=ref, options=SHORT)
        assert entered.wait(60)  # the worker is inside the doomed step
        queued = [client.query("Water is", endpoint=ref, options=SHORT) for _ in range(2)]
        release.set()
        with pytest.raises(ExecutionError, match="injected scheduler fault"):
            running.result(timeout=60)
        for run in queued:
            with pytest.raises(UnavailableError):
                run.result(timeout=60)
        failure = client.endpoint_failure(ref)
        assert failure is not None and "InjectedFault: injected scheduler fault" in failure
        with pytest.raises(UnavailableError, match="engine stopped"):
            client.query("again", endpoint=ref, options=SHORT)
        with pytest.raises(UnavailableError):
            client.chat([{"role": "user", "content": "hi"}], endpoint=ref)
        metrics = client.runtime_metrics(ref)
        assert metrics["busy_slots"] == 0 and metrics["running"] == 0
    # close() freed the model the dead worker left allocated, without hanging


def test_a_worker_dying_inside_an_embedding_step_ends_those_runs(smollm_path: Path) -> None:
    config = NativeRuntimeConfig(
        context=ContextRuntimeConfig(n_ctx=64, n_parallel=2, embeddings=True, pooling="mean")
    )
    with SippClient() as client:
        ref = client.add("e", LocalModelDescriptor(smollm_path, config))
        engine = client._registry._endpoints[ref.id]._engine  # type: ignore[attr-defined]

        def step(jobs: Any) -> None:
            raise InjectedFault("injected embedding fault")

        engine._embed_step = step
        with pytest.raises(ExecutionError, match="injected embedding fault"):
            client.embed("red apples", endpoint=ref).result(timeout=60)
        with pytest.raises(UnavailableError):
            client.embed("blue water", endpoint=ref)


def _config(model: Path, public: int, management: int) -> str:
    return f"""
public_bind = "127.0.0.1:{public}"
management_bind = "127.0.0.1:{management}"
admin_password_env = "CRASH_TEST_ADMIN_PASSWORD"

[security.client_ip]
source = "peer"
trusted_proxy_cidrs = []

[security.rate_limit]
enabled = false
requests_per_minute = 60
burst = 60

[routes]
index = "/"
health = "/healthz"
readiness = "/readyz"
metrics = "/metrics"
admin = "/admin"

[[tokens]]
env = "CRASH_TEST_TOKEN"
caller = "tester"
targets = []

[[targets]]
name = "local"
type = "local"
model = "{model}"
backend = "cpu"

[targets.runtime.context]
n_ctx = 256
n_parallel = 1
"""


class InProcessGateway:
    """The gateway's real apps on real loopback listeners, in this process (so the test
    can reach the engine), served by uvicorn on an event loop in a background thread."""

    def __init__(self, model: Path) -> None:
        from sipp.gateway.config import parse_config
        from sipp.gateway.config import tomllib as toml

        public, management = free_port(), free_port()
        self.config = parse_config(toml.loads(_config(model, public, management)))
        self.public = f"http://127.0.0.1:{public}"
        self.management = f"http://127.0.0.1:{management}"
        self.state: Any = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)
        self._thread.start()
        assert self._ready.wait(300), "the gateway did not come up"

    async def _main(self) -> None:
        import uvicorn

        from sipp.gateway.admin import admin_state
        from sipp.gateway.app import GatewayState, build_management_app, build_public_app
        from sipp.gateway.auth import TokenTable
        from sipp.gateway.serve import _load_targets

        state = GatewayState(self.config, AsyncSippClient(), TokenTable(self.config.tokens, ENV))
        state.admin = admin_state(PASSWORD, ENV)
        servers = [
            uvicorn.Server(
                uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
            )
            for app, (host, port) in (
                (build_public_app(state), self.config.public_bind),
                (build_management_app(state), self.config.management_bind),
            )
        ]
        tasks = [asyncio.create_task(s.serve()) for s in servers]
        while not all(s.started for s in servers):
            await asyncio.sleep(0.02)
        await _load_targets(state, ENV)
        self.state, self._loop, self._stop = state, asyncio.get_running_loop(), asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        for s in servers:
            s.should_exit = True
        await asyncio.gather(*tasks)
        await state.client.close()

    def close(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)

    def query(self, **extra: Any) -> httpx.Response:
        body = {"model": "local", "prompt": "The sky is", "max_tokens": 4, **extra}
        return httpx.post(
            f"{self.public}/v1/query",
            json=body,
            headers={"authorization": f"Bearer {TOKEN}"},
            timeout=120,
        )

    def health(self) -> str:
        with httpx.Client(base_url=self.management) as admin:
            assert admin.post("/admin/api/session", json={"password": PASSWORD}).status_code == 200
            targets = admin.get("/admin/api/overview").json()["targets"]
        return str({t["name"]: t for t in targets}["local"]["health"])


@pytest.fixture
def gateway(smollm_path: Path) -> Iterator[InProcessGateway]:
    gw = InProcessGateway(smollm_path)
    try:
        yield gw
    finally:
        gw.close()


def test_a_gateway_reports_a_dead_engine_and_answers_503(gateway: InProcessGateway) -> None:
    readyz = f"{gateway.management}/readyz"
    assert httpx.get(readyz).status_code == 200
    assert gateway.query().status_code == 200
    assert gateway.health() == "healthy"

    ref = gateway.state.targets["local"]
    engine = gateway.state.client._registry._endpoints[ref.id]._engine
    _crash_next_step(engine)
    crashed = gateway.query()
    assert crashed.status_code == 500 and crashed.json()["error"]["code"] == "execution"
    assert "Traceback" not in crashed.text

    assert (httpx.get(readyz).status_code, httpx.get(readyz).text) == (503, "not ready")
    index = httpx.get(f"{gateway.management}/").json()
    assert {t["name"]: t["state"] for t in index["targets"]} == {"local": "failed"}
    assert gateway.health() == "failed"
    for extra in ({}, {"stream": True}):
        refused = gateway.query(**extra)
        assert refused.status_code == 503, refused.text
        error = refused.json()["error"]
        assert error["code"] == "unavailable" and "InjectedFault" not in error["message"]
