"""Embeddings through target pools, against a real `sipp-gateway serve` and loopback
deployments speaking OpenAI's `/embeddings`: a deployment is picked per attempt, a
failure is retried on the target's other deployments, breakers open, and a target's
fallbacks are never used (another model's vectors are not comparable)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from sipp import models

from ..ports import free_port
from ..remote.loopback import Action, LoopbackServer, Request
from .limited_gateways import toml
from .pool_upstreams import Deployment, pool_toml
from .test_embedding_inputs import MINILM
from .test_server import ENV, TOKEN, Gateway
from .upstreams import embeddings_reply, poll

AUTH = {"authorization": f"Bearer {TOKEN}"}
RETRY = "attempts = 3\nbackoff_base_seconds = 0.01\nbackoff_cap_seconds = 0.05"
# A deployment that failed twice in a row is out until the end of the module.
BREAKER = "consecutive_failures = 2\ncooldown_seconds = 600"
# Each pool's failing deployment is listed first: the gateway once sent every embeddings
# request of a pool to its first deployment.
POOLS = {
    "p500": ("x1", "x2", "x3"),
    "pdead": ("d1", "d2", "d3"),
    "pbad": ("b1", "b2", "b3"),
    "fenced": ("f1", "f2", "f3"),
    "psdk": ("s1", "s2"),
    "plimited": ("l1",),
}
# Pools with limits of their own: `plimited` allows two requests a minute.
LIMITS = {"plimited": "requests_per_minute = 2"}


class EmbedDeployment(Deployment):
    """A deployment answering `/embeddings` (one vector per input) while its mode is ok."""

    def _handle(self, req: Request) -> list[Action]:
        if self.mode == "ok" and req.path.endswith("/embeddings"):
            self.times.append(time.monotonic())
            return embeddings_reply(req)
        return super()._handle(req)


class Setup:
    def __init__(self, gw: Gateway, ups: dict[str, EmbedDeployment]) -> None:
        self.gw, self.ups = gw, ups

    def attempts(self, target: str, deployment: str, outcome: str) -> float:
        labels = f'{{deployment="{deployment}",outcome="{outcome}",target="{target}"}}'
        return self.gw.metric("sipp_gateway_upstream_attempts_total", labels)

    def breaker(self, target: str, deployment: str) -> float:
        labels = f'{{deployment="{deployment}",target="{target}"}}'
        return self.gw.metric("sipp_gateway_breaker_state", labels)

    def calls(self, target: str) -> int:
        return sum(len(self.ups[d].calls("/embeddings")) for d in POOLS[target])


def _toml(ups: dict[str, EmbedDeployment]) -> str:
    out = ""
    for name, deps in POOLS.items():
        extra = 'fallbacks = ["other"]\ncontext_fallbacks = ["other"]' if name == "fenced" else ""
        urls = {d: ups[d].url for d in deps}
        limits = {"limits": LIMITS[name]} if name in LIMITS else {}
        out += pool_toml(name, urls, extra, retry=RETRY, breaker=BREAKER, **limits)
    return out + pool_toml("other", {"o": ups["o"].url})


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    names = [d for deps in POOLS.values() for d in deps] + ["o"]
    ups = {name: EmbedDeployment(name) for name in names}
    remote = LoopbackServer(embeddings_reply)
    public, management = free_port(), free_port()
    path = tmp_path_factory.mktemp("pool-embeddings") / "gateway.toml"
    path.write_text(toml(remote.url, public, management) + _toml(ups))
    gw = Gateway(path, ENV, public, management)
    try:
        gw.wait_ready(timeout=60)
        yield Setup(gw, ups)
    finally:
        code, err = gw.stop()
        remote.close()
        for up in ups.values():
            up.close()
    assert code == 0, err


@pytest.fixture(autouse=True)
def idle(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test on the shared gateway: no permit, attempt or upstream request left."""
    yield
    if "setup" not in request.fixturenames:
        return
    setup: Setup = request.getfixturevalue("setup")
    poll(lambda: all(up.open_requests == 0 for up in setup.ups.values()), "upstreams idle")
    poll(lambda: setup.gw.metric("sipp_gateway_in_flight_requests") == 0, "gateway idle")
    poll(lambda: _deployments_in_flight(setup.gw) == 0, "no attempt left in flight")


def _openai(setup: Setup, target: str, inputs: str | list[str] = "hi") -> httpx.Response:
    body = {"model": target, "input": inputs}
    return httpx.post(f"{setup.gw.public}/v1/embeddings", json=body, headers=AUTH, timeout=60)


def _native(setup: Setup, target: str) -> httpx.Response:
    body = {"model": target, "input": "hi"}
    return httpx.post(f"{setup.gw.public}/v1/embed", json=body, headers=AUTH, timeout=60)


def test_a_500_is_retried_on_another_deployment(setup: Setup) -> None:
    setup.ups["x1"].mode = "500"
    retried: list[httpx.Response] = []
    for i in range(60):  # the pick is random: go on until x1 was picked twice
        r = (_native if i % 2 else _openai)(setup, "p500")
        assert r.status_code == 200, r.text
        body: Any = r.json()
        vector = body["embedding"] if "embedding" in body else body["data"][0]["embedding"]
        assert vector == [0.0, 0.5]
        if r.headers["x-sipp-attempts"] != "1":
            retried.append(r)
        if len(setup.ups["x1"].calls("/embeddings")) >= 2:
            break
    assert retried, "x1 was never picked"
    for r in retried:
        assert r.headers["x-sipp-attempts"] == "2"
        assert r.headers["x-sipp-target"] in ("p500/x2", "p500/x3")
    assert setup.attempts("p500", "x1", "5xx") == len(setup.ups["x1"].calls("/embeddings"))
    ok = setup.attempts("p500", "x2", "ok") + setup.attempts("p500", "x3", "ok")
    assert ok == setup.calls("p500") - len(setup.ups["x1"].calls("/embeddings"))


def test_each_retry_reserves_again_on_the_target(setup: Setup) -> None:
    """`plimited` allows 2 requests a minute: an embeddings request that took a retry
    uses both, so the next one is refused before reaching the upstream."""
    up = setup.ups["l1"]
    up.mode = "429once"  # Retry-After: 1, then it answers
    r = _openai(setup, "plimited")
    assert r.status_code == 200, r.text
    assert r.headers["x-sipp-attempts"] == "2"
    calls = len(up.calls("/embeddings"))
    again = _openai(setup, "plimited")
    assert again.status_code == 429, again.text
    assert again.json()["error"]["code"] == "rate_limited"
    assert len(up.calls("/embeddings")) == calls


def test_a_dead_deployment_opens_its_breaker(setup: Setup) -> None:
    dead = setup.ups["d1"]
    dead.kill()  # closed port: every connection is refused
    try:

        def opened() -> bool:
            r = _openai(setup, "pdead", ["a", "b"])
            assert r.status_code == 200, r.text
            assert [d["embedding"][0] for d in r.json()["data"]] == [0.0, 1.0]
            return setup.breaker("pdead", "d1") == 1

        poll(opened, "d1's breaker opens", timeout=60)
        assert setup.attempts("pdead", "d1", "connect") == 2
        before = setup.attempts("pdead", "d1", "connect")
        for _ in range(5):  # open: no request goes there any more
            r = _openai(setup, "pdead")
            assert r.status_code == 200 and r.headers["x-sipp-attempts"] == "1"
        assert setup.attempts("pdead", "d1", "connect") == before
    finally:
        dead.revive()


@pytest.mark.parametrize("status", ["400", "401", "403"])
def test_client_errors_are_never_retried(setup: Setup, status: str) -> None:
    def refused() -> float:
        return sum(setup.attempts("pbad", d, "4xx") for d in POOLS["pbad"])

    for dep in POOLS["pbad"]:
        setup.ups[dep].mode = status
    try:
        before, counted = setup.calls("pbad"), refused()
        r = _openai(setup, "pbad")
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream"
        assert r.headers["x-sipp-attempts"] == "1" and "x-sipp-target" not in r.headers
        assert setup.calls("pbad") == before + 1
        assert refused() == counted + 1
    finally:
        for dep in POOLS["pbad"]:
            setup.ups[dep].mode = "ok"


@pytest.mark.parametrize("mode", ["500", "context"])
def test_fallbacks_are_never_used_for_embeddings(setup: Setup, mode: str) -> None:
    other = setup.ups["o"]
    for dep in POOLS["fenced"]:
        setup.ups[dep].mode = mode
    try:
        before, fenced = len(other.requests), setup.calls("fenced")
        for route in (_openai, _native):
            r = route(setup, "fenced")
            assert r.status_code == 502 and r.json()["error"]["code"] == "upstream", r.text
            attempts = 3 if mode == "500" else 1  # a context error is final: no retry
            assert r.headers["x-sipp-attempts"] == str(attempts)
            assert "x-sipp-target" not in r.headers  # nobody answered
        assert len(other.requests) == before  # the fallback target was never called
        assert setup.calls("fenced") - fenced == (6 if mode == "500" else 2)
    finally:
        for dep in POOLS["fenced"]:
            setup.ups[dep].mode = "ok"


def test_the_openai_sdk_embeds_through_the_pool(setup: Setup) -> None:
    client = openai.OpenAI(base_url=f"{setup.gw.public}/v1", api_key=TOKEN, max_retries=0)
    try:
        before = setup.calls("psdk")
        raw = client.embeddings.with_raw_response.create(
            model="psdk", input=["one", "two", "three"]
        )
        result = raw.parse()
        assert [d.embedding for d in result.data] == [[0.0, 0.5], [1.0, 0.5], [2.0, 0.5]]
        assert raw.headers["x-sipp-target"] in ("psdk/s1", "psdk/s2")
        assert raw.headers["x-sipp-attempts"] == "1"
        # The inputs still go upstream as one batch request, on the deployment that answered.
        assert setup.calls("psdk") == before + 1
        answered = raw.headers["x-sipp-target"].split("/")[1]
        assert setup.ups[answered].calls("/embeddings")[-1].json()["input"] == [
            "one",
            "two",
            "three",
        ]
        single = client.embeddings.create(model="psdk", input="solo", encoding_format="float")
        assert single.data[0].embedding == [0.0, 0.5]
    finally:
        client.close()


def _deployments_in_flight(gw: Gateway) -> float:
    text = httpx.get(f"{gw.management}/metrics", timeout=60).text
    prefix = "sipp_gateway_deployment_in_flight{"
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)
    )


MIXED = (
    MINILM
    + """
[[targets]]
name = "mixed"
type = "openai_compatible"
model = "m"
[targets.retry]
attempts = 2
backoff_base_seconds = 0.01
backoff_cap_seconds = 0.02
[[targets.deployments]]
name = "gone"
base_url = "http://127.0.0.1:{dead}/v1"
[[targets.deployments]]
target = "minilm"
"""
)


def test_a_local_deployment_embeds_a_batch_after_a_dead_one(tmp_path: Path) -> None:
    """A pool whose first deployment's port is closed and whose second is a local
    embedding model: every request is answered by the local one, its inputs embedded in
    order through the local engine's windowed runs."""
    minilm = models.pull("all-minilm-l6-v2", verify=False)
    remote = LoopbackServer(embeddings_reply)
    public, management = free_port(), free_port()
    path = tmp_path / "gateway.toml"
    path.write_text(
        toml(remote.url, public, management) + MIXED.format(path=minilm, dead=free_port())
    )
    gw = Gateway(path, ENV, public, management)
    try:
        gw.wait_ready(timeout=120)
        inputs = [f"sentence number {i}" for i in range(8)]
        with openai.OpenAI(base_url=f"{gw.public}/v1", api_key=TOKEN, max_retries=0) as client:
            direct = client.embeddings.create(model="minilm", input=inputs)
            labels = '{deployment="gone",outcome="connect",target="mixed"}'
            for _ in range(20):  # the pick is random: go on until "gone" was tried once
                raw = client.embeddings.with_raw_response.create(model="mixed", input=inputs)
                assert raw.headers["x-sipp-target"] == "mixed/minilm"
                pooled = raw.parse()
                assert len(pooled.data) == len(inputs)
                for a, b in zip(direct.data, pooled.data, strict=True):
                    assert _cosine(a.embedding, b.embedding) > 0.999
                if gw.metric("sipp_gateway_upstream_attempts_total", labels) > 0:
                    assert raw.headers["x-sipp-attempts"] == "2"
                    break
            else:
                raise AssertionError("deployment gone was never picked")
    finally:
        code, err = gw.stop()
        remote.close()
    assert code == 0, err


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_a_caller_gone_mid_attempt_ends_it_and_closes_the_upstream_request(setup: Setup) -> None:
    slow = [setup.ups[d] for d in POOLS["psdk"]]
    for up in slow:
        up.mode = "slow"  # headers, then nothing for a minute
    hangups = sum(up.hangups for up in slow)
    cancelled = sum(setup.attempts("psdk", d, "cancelled") for d in POOLS["psdk"])
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{setup.gw.public}/v1/embeddings",
                json={"model": "psdk", "input": ["a", "b"]},
                headers=AUTH,
                timeout=httpx.Timeout(60, read=1),
            )
        poll(lambda: sum(up.hangups for up in slow) > hangups, "the upstream request closed")
        poll(
            lambda: (
                sum(setup.attempts("psdk", d, "cancelled") for d in POOLS["psdk"]) == cancelled + 1
            ),
            "the attempt ended as cancelled",
        )
    finally:
        for up in slow:
            up.mode = "ok"
