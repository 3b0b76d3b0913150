"""`sipp-gateway serve`: secrets from env, both listeners in one event loop, targets
loaded in the background (readiness says when), graceful stop on SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping

import uvicorn

from .._client import AsyncSippClient
from .._descriptors import (
    EndpointRef,
    GatewayTimeoutPolicy,
    LocalModelDescriptor,
    ProviderDescriptor,
)
from .._errors import ModelLoadError, SippError
from .._runtime_config import NativeRuntimeConfig, ObservabilityRuntimeConfig
from .admin import admin_state
from .app import GatewayState, build_management_app, build_public_app
from .auth import TokenTable, read_secret
from .background import stop_loop
from .cache.semantic_stage import target_embedder
from .cache.stores import close_caches, open_caches, stop_verifying
from .cache.verify import target_upstream
from .config import GatewayConfig, LocalTarget, ProviderTarget
from .shaping import build_shaper, open_store
from .shared_controls import shared_controls
from .upstreams.pool import Pool

__all__ = ["configure_logging", "serve"]

logger = logging.getLogger("sipp.gateway")
LOG_LEVEL_ENV = "SIPP_GATEWAY_LOG"
GRACE_SECONDS = 30


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(env: Mapping[str, str]) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(env.get(LOG_LEVEL_ENV, "info").upper())


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signal handling to `serve` (two servers share one loop)
    and wakes once a second, not ten times (`main_loop`)."""

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29
        pass

    def capture_signals(self):  # type: ignore[no-untyped-def]  # uvicorn >= 0.29
        return contextlib.nullcontext()

    def __init__(self, config: uvicorn.Config) -> None:
        self._exit_now = asyncio.Event()
        super().__init__(config)

    @property
    def should_exit(self) -> bool:
        return self._should_exit

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        self._should_exit = value
        if value:
            self._exit_now.set()

    async def main_loop(self) -> None:
        # uvicorn's own loop wakes ten times a second to look at `should_exit`. On two
        # cores each wake takes a slice from a running decode (docs/architecture.md), so
        # this one wakes when told to exit, and at each new second for the Date header
        # (which has a resolution of one second).
        while not await self.on_tick(0):  # counter 0: the tick that refreshes the headers
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._exit_now.wait(), 1.0 - time.time() % 1.0)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets=sockets)
        except SystemExit:  # uvicorn ends the process when a bind fails: `serve` reports it
            self.should_exit = True


async def _load_targets(state: GatewayState, env: Mapping[str, str]) -> None:
    # A pool of other targets loads after them, whatever their order in the file.
    def pools_of_targets_last(target: LocalTarget | ProviderTarget) -> bool:
        return any(d.target is not None for d in target.resilience.deployments)

    for target in sorted(state.config.targets, key=pools_of_targets_last):
        try:
            if isinstance(target, LocalTarget):
                await _add_local(state, target)
            else:
                await _add_provider(state, target, env)
            logger.info("target %s (%s) loaded", target.name, target.type)
        except (SippError, OSError) as exc:
            message = exc.message if isinstance(exc, SippError) else str(exc)
            state.target_errors[target.name] = message
            logger.error("target %s (%s) failed to load: %s", target.name, target.type, message)
    state.ready = True


async def _add_local(state: GatewayState, target: LocalTarget) -> None:
    from ..local.endpoint import LocalEndpoint

    runtime = target.runtime
    observability = ObservabilityRuntimeConfig(
        runtime_metrics=target.stats != "off", backend_profiling=target.stats == "profile"
    )
    config = NativeRuntimeConfig(**{**runtime.__dict__, "observability": observability})
    descriptor = LocalModelDescriptor(os.path.abspath(target.model), config)
    endpoint = await asyncio.to_thread(LocalEndpoint, descriptor, target.name, target.backend)
    state.targets[target.name] = state.client._install(target.name, endpoint)
    if state.shaper is not None:  # its tokenizer counts prompts for token limits
        state.shaper.local[target.name] = endpoint
    if target.stats != "off":
        state.stats_targets.add(target.name)


async def _add_provider(
    state: GatewayState, target: ProviderTarget, env: Mapping[str, str]
) -> None:
    pool = state.pools[target.name]
    if pool.implicit:
        ref = await _register(state, target, target.name, target.base_url, target.secret_env, env)
        state.targets[target.name] = ref
        return
    refs = []
    for dep in pool.deployments:  # each listed deployment is its own endpoint
        if dep.spec.target is None:
            name = f"{target.name}@{dep.name}"
            dep.ref = await _register(
                state, target, name, dep.spec.base_url, dep.spec.secret_env, env
            )
            refs.append(dep.ref)
    # The target's own name resolves (for readiness, operator switches, embeddings) to
    # its first deployment with an endpoint of its own, if any.
    state.targets[target.name] = refs[0] if refs else _first_target(state, pool)


def _first_target(state: GatewayState, pool: Pool) -> EndpointRef:
    name = pool.deployments[0].spec.target
    assert name is not None
    ref = state.targets.get(name)
    if ref is None:
        raise ModelLoadError(f"deployment target {name!r} did not load")
    return ref


async def _register(
    state: GatewayState,
    target: ProviderTarget,
    name: str,
    base_url: str | None,
    secret_env: str | None,
    env: Mapping[str, str],
) -> EndpointRef:
    secret = None
    if secret_env is not None:
        secret = read_secret(env, secret_env, f"target {target.name}")
        state.secrets.append(secret)
    timeout = (
        GatewayTimeoutPolicy(request_s=target.timeout_seconds)
        if target.timeout_seconds
        else GatewayTimeoutPolicy()
    )
    descriptor = ProviderDescriptor(
        target.type,
        target.model,
        api_key=secret,
        base_url=base_url,
        correlation_header=target.correlation_header,
        timeout=timeout,
        anthropic_version=target.version or "2023-06-01",
    )
    return await state.client.add(name, descriptor)


async def serve(
    config: GatewayConfig, env: Mapping[str, str] | None = None, *, grace: float = GRACE_SECONDS
) -> int:
    """Run until SIGINT/SIGTERM. Startup problems raise `SippError` before anything binds."""
    env = os.environ if env is None else env
    tokens = TokenTable(config.tokens, env)
    admin_password = read_secret(env, config.admin_password_env, "admin_password_env")
    for target in config.targets:  # fail fast on missing provider secrets, before binding
        if isinstance(target, ProviderTarget):
            envs = [target.secret_env, *(d.secret_env for d in target.resilience.deployments)]
            for secret_env in envs:
                if secret_env is not None:
                    read_secret(env, secret_env, f"target {target.name}")

    state = GatewayState(config, AsyncSippClient(), tokens)
    store = open_store(config, env)
    state.shaper = build_shaper(config, store, state.metrics)
    state.shared = shared_controls(state, store)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # Loops that run until shutdown; stopped on every way out, or asyncio.run's single
    # cancel of what is left could hang the exit (see `stop_loop`).
    background: list[asyncio.Task[None]] = []
    try:
        await open_caches(
            state.caches,
            config,
            store,
            state.metrics,
            lambda name: target_embedder(state, name),
            lambda name: target_upstream(state, name),
        )
        state.admin = admin_state(admin_password, env)
        return await _listen(state, env, grace, stop, background)
    finally:
        started = time.monotonic()
        for task in background:
            await stop_loop(task)
        await stop_verifying(state.caches)
        await state.client.close()
        if state.shaper is not None:
            await state.shaper.settled()
        await close_caches(state.caches)
        if store is not None:
            await store.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        logger.info("stopped; models and stores freed in %.1fs", time.monotonic() - started)


async def _listen(
    state: GatewayState,
    env: Mapping[str, str],
    grace: float,
    stop: asyncio.Event,
    background: list[asyncio.Task[None]],
) -> int:
    """Bind both listeners, load the targets, serve until `stop`, then stop accepting
    and let in-flight requests finish (up to `grace` seconds). 1 when a bind fails."""
    config = state.config
    servers = [
        _Server(
            uvicorn.Config(
                app,
                host=host,
                port=port,
                log_config=None,
                access_log=False,
                lifespan="off",
                # uvicorn would rewrite the client address from X-Forwarded-For for any
                # peer on 127.0.0.1; [security.client_ip] alone decides whom to trust.
                proxy_headers=False,
                timeout_graceful_shutdown=int(grace),
            )
        )
        for app, (host, port) in (
            (build_public_app(state), config.public_bind),
            (build_management_app(state), config.management_bind),
        )
    ]
    tasks = [asyncio.create_task(s.serve()) for s in servers]
    while not all(s.started for s in servers):
        if any(t.done() for t in tasks):  # a bind failed
            for s in servers:
                s.should_exit = True
            await asyncio.gather(*tasks, return_exceptions=True)
            logger.error("could not bind %s or %s", config.public_bind, config.management_bind)
            return 1
        await asyncio.sleep(0.02)
    logger.info(
        "listening: public %s:%d, management %s:%d", *config.public_bind, *config.management_bind
    )
    background.append(asyncio.create_task(_load_targets(state, env)))
    if state.shared is not None:  # every replica's copy of the shared controls follows Redis
        background.append(asyncio.create_task(state.shared.run()))

    await stop.wait()
    logger.info("stopping: no new connections, in-flight requests get %ss", grace)
    for s in servers:
        s.should_exit = True
    await asyncio.gather(*tasks, return_exceptions=True)
    return 0
