"""Rate limiting, client IP resolution and CORS, unit-level and through a live gateway."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import httpx
import pytest

from sipp import RateLimitedError
from sipp.gateway.config import SecurityConfig
from sipp.gateway.limits import ConcurrencyLimit, RateLimiter, client_ip, served_over_tls

from ..ports import free_port
from ..remote.loopback import LoopbackServer
from .test_server import ENV, TOKEN, Gateway, _config, _mock


def test_token_bucket_burst_then_refill() -> None:
    limiter = RateLimiter(per_minute=60, burst=3)
    for _ in range(3):
        limiter.check("1.2.3.4", now=100.0)
    with pytest.raises(RateLimitedError):
        limiter.check("1.2.3.4", now=100.0)
    limiter.check("5.6.7.8", now=100.0)  # buckets are per client
    limiter.check("1.2.3.4", now=101.0)  # one token back after one second at 60/min
    with pytest.raises(RateLimitedError):
        limiter.check("1.2.3.4", now=101.0)


def test_bucket_table_is_bounded() -> None:
    limiter = RateLimiter(per_minute=60, burst=1, max_clients=100)
    for i in range(1000):
        limiter.check(f"10.0.{i // 256}.{i % 256}", now=0.0)
    assert len(limiter._buckets) == 100


def test_concurrency_limit() -> None:
    limit = ConcurrencyLimit(1)
    limit.acquire()
    with pytest.raises(Exception, match="max_concurrent_requests"):
        limit.acquire()
    limit.release()
    limit.acquire()


def test_client_ip_sources() -> None:
    proxy = (ipaddress.ip_network("10.0.0.0/8"),)
    xff = SecurityConfig(client_ip_source="x_forwarded_for", trusted_proxy_cidrs=proxy)
    real = SecurityConfig(client_ip_source="x_real_ip", trusted_proxy_cidrs=proxy)
    headers = {"x-forwarded-for": "203.0.113.9, 10.1.1.1", "x-real-ip": "198.51.100.7"}
    assert client_ip("10.2.2.2", headers, xff) == "203.0.113.9"
    assert client_ip("10.2.2.2", headers, real) == "198.51.100.7"
    # forwarded headers from an untrusted peer are ignored
    assert client_ip("192.0.2.1", headers, xff) == "192.0.2.1"
    assert client_ip("10.2.2.2", {"x-forwarded-for": "not-an-ip"}, xff) == "10.2.2.2"
    assert client_ip("10.2.2.2", headers, SecurityConfig()) == "10.2.2.2"


def test_live_gateway_rate_limit_cors_and_failed_target(smollm_path: Path, tmp_path: Path) -> None:
    public, management = free_port(), free_port()
    config = _config(smollm_path, "http://127.0.0.1:9", public, management)
    config = config.replace("allowed_origins = []", 'allowed_origins = ["http://app.example"]')
    config = config.replace(
        "[security.rate_limit]\nenabled = false\nrequests_per_minute = 60\nburst = 60",
        "[security.rate_limit]\nenabled = true\nrequests_per_minute = 1\nburst = 3",
    )
    config += '\n[[targets]]\nname = "broken"\ntype = "local"\nmodel = "/nonexistent/model.gguf"\nbackend = "cpu"\n'
    path = tmp_path / "g.toml"
    path.write_text(config)
    with LoopbackServer(_mock):
        gw = Gateway(path, ENV, public, management)
        try:
            _wait_loaded(gw)
            assert (
                httpx.get(f"{gw.management}/readyz", timeout=60).status_code == 503
            )  # a target failed
            states = {
                t["name"]: t["state"]
                for t in httpx.get(f"{gw.management}/", timeout=60).json()["targets"]
            }
            assert states["broken"] == "failed" and states["local"] == "loaded"
            auth = {"authorization": f"Bearer {TOKEN}"}
            broken = httpx.post(
                f"{gw.public}/v1/query",
                json={"model": "broken", "prompt": "x"},
                headers=auth,
                timeout=60,
            )
            assert broken.status_code == 500 and broken.json()["error"]["code"] == "execution"
            preflight = httpx.options(
                f"{gw.public}/v1/query",
                headers={
                    "origin": "http://app.example",
                    "access-control-request-method": "POST",
                    "access-control-request-headers": "authorization,content-type",
                },
            )
            assert preflight.headers["access-control-allow-origin"] == "http://app.example"
            evil = httpx.options(
                f"{gw.public}/v1/query",
                headers={"origin": "http://evil.example", "access-control-request-method": "POST"},
            )
            assert "access-control-allow-origin" not in evil.headers
            statuses = [
                httpx.post(
                    f"{gw.public}/v1/query",
                    json={"model": "local", "prompt": "x", "max_tokens": 1},
                    headers={**auth, "origin": "http://app.example"},
                    timeout=60,
                ).status_code
                for _ in range(3)
            ]
            # the failed 'broken' request above used the first token of the burst of 3
            assert statuses == [200, 200, 429]
            assert gw.metric("sipp_gateway_rate_limited_total") == 1
        finally:
            code, err = gw.stop()
        assert code == 0, err


def _wait_loaded(gw: Gateway) -> None:
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{gw.management}/", timeout=60).json()["ready"]:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("gateway did not finish loading")


def test_tls_is_believed_only_from_a_trusted_proxy() -> None:
    proxy = SecurityConfig(
        client_ip_source="peer", trusted_proxy_cidrs=(ipaddress.ip_network("10.0.0.0/8"),)
    )
    https = {"x-forwarded-proto": "HTTPS, http"}
    assert served_over_tls("https", "198.51.100.1", {}, proxy)
    assert served_over_tls("http", "10.0.0.5", https, proxy)
    assert not served_over_tls("http", "198.51.100.1", https, proxy)
    assert not served_over_tls("http", "10.0.0.5", {"x-forwarded-proto": "http"}, proxy)
    assert not served_over_tls("http", None, https, proxy)
