"""Pools, retries and fallbacks with a commit point, against a real `sipp-gateway
serve` and loopback deployments speaking OpenAI's JSON and SSE."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .pool_upstreams import Deployment, pool_toml
from .test_server import TOKEN, Gateway, running_gateway
from .upstreams import poll

AUTH = {"authorization": f"Bearer {TOKEN}"}
FAST_RETRY = "attempts = 3\nbackoff_base_seconds = 0.01\nbackoff_cap_seconds = 0.05\n"
BREAKER = "window_seconds = 60\nmin_requests = 3\nfailure_rate = 0.5\ncooldown_seconds = 1\n"
NAMES = (
    "a", "b", "c", "solo", "spare", "chain1", "chain2", "small", "big", "limited",
    "limited_long", "strict", "capped", "patient",
)  # fmt: skip


class Setup:
    def __init__(self, gw: Gateway, ups: dict[str, Deployment]) -> None:
        self.gw, self.ups = gw, ups
        self.retried: list[str] = []  # request ids that took more than one attempt

    def attempts(self, target: str, deployment: str, outcome: str) -> float:
        labels = f'{{deployment="{deployment}",outcome="{outcome}",target="{target}"}}'
        return self.gw.metric("sipp_gateway_upstream_attempts_total", labels)

    def breaker(self, deployment: str) -> float:
        labels = f'{{deployment="{deployment}",target="pool"}}'
        return self.gw.metric("sipp_gateway_breaker_state", labels)


def _busy_local(model: Path) -> str:
    """A local target with one slot and no queue, and a pool whose only deployment it is."""
    return f"""
[[targets]]
name = "busy-local"
type = "local"
model = "{model}"
backend = "cpu"
stats = "off"
[targets.runtime.context]
n_ctx = 2048
n_parallel = 1
[targets.runtime.scheduler]
max_running_requests = 1
max_queued_requests = 0

[[targets]]
name = "via-local"
type = "openai_compatible"
model = "m"
fallbacks = ["spare"]
[[targets.deployments]]
target = "busy-local"
"""


def _toml(ups: dict[str, Deployment]) -> str:
    def one(name: str, extra: str = "", **tables: str) -> str:
        return pool_toml(name, {name: ups[name].url}, extra, **tables)

    return (
        pool_toml(
            "pool",
            {n: ups[n].url for n in "abc"},
            retry=FAST_RETRY + "first_token_timeout_seconds = 30",
            breaker=BREAKER,
        )
        + one("solo", 'fallbacks = ["spare"]', retry=FAST_RETRY)
        + one("spare")
        + one("chain1", 'fallbacks = ["chain2", "spare"]')
        + one("chain2")
        + one("small", 'fallbacks = ["spare"]\ncontext_fallbacks = ["big"]')
        + one("big")
        + one("limited", retry="attempts = 2\nretry_after_cap_seconds = 5")
        + one("limited_long", retry="attempts = 3\nretry_after_cap_seconds = 1")
        + one("strict", 'fallbacks = ["spare"]', retry=FAST_RETRY)
        + one("patient", 'fallbacks = ["spare"]', retry="first_token_timeout_seconds = 0.3")
        + one("capped", "max_attempts = 3", retry="attempts = 10\nbackoff_base_seconds = 0.01")
    )


@pytest.fixture(scope="module")
def setup(smollm_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    ups = {name: Deployment(name) for name in NAMES}

    def edit(toml: str) -> str:
        toml = toml.replace("max_concurrent_requests = 2", "max_concurrent_requests = 64")
        return toml + _toml(ups) + _busy_local(smollm_path)

    try:
        with running_gateway(smollm_path, tmp_path_factory.mktemp("pools"), edit) as gw:
            setup = Setup(gw, ups)
            yield setup
    finally:
        for up in ups.values():
            up.close()
    # Each request that needed several attempts has a log line listing them.
    logged = [json.loads(line)["message"] for line in gw.stderr.splitlines() if line[:1] == "{"]
    for request_id in setup.retried:
        assert any(m.startswith(f"request {request_id} for target") for m in logged), request_id


@pytest.fixture(autouse=True)
def healthy(setup: Setup) -> Iterator[None]:
    """Each test starts and ends with every deployment answering and nothing in flight."""
    for up in setup.ups.values():
        up.mode = "ok"
    yield
    poll(lambda: all(up.open_requests == 0 for up in setup.ups.values()), "upstreams idle")
    poll(lambda: setup.gw.metric("sipp_gateway_in_flight_requests") == 0, "gateway idle")
    poll(lambda: _deployments_in_flight(setup.gw) == 0, "no attempt left in flight")


def _deployments_in_flight(gw: Gateway) -> float:
    text = httpx.get(f"{gw.management}/metrics", timeout=60).text
    prefix = "sipp_gateway_deployment_in_flight{"
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)
    )


def _chat(setup: Setup, target: str, stream: bool = False) -> httpx.Response:
    body = {"model": target, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    r = httpx.post(f"{setup.gw.public}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    if int(r.headers["x-sipp-attempts"]) > 1:
        setup.retried.append(r.headers["x-request-id"])
    return r


def _stream_text(response: httpx.Response) -> tuple[str, dict[str, Any] | None]:
    """The text of an OpenAI chat stream and its error frame, if it ended with one."""
    text, error = "", None
    for frame in response.text.strip().split("\n\n"):
        data = frame.removeprefix("data: ")
        if data == "[DONE]":
            continue
        obj = json.loads(data)
        if "error" in obj:
            error = obj["error"]
            continue
        for choice in obj.get("choices", []):
            text += choice.get("delta", {}).get("content") or ""
    return text, error


# ----------------------------------------------------------------- the commit point
def test_failure_after_the_first_token_is_an_error_frame_not_a_splice(setup: Setup) -> None:
    solo, spare = setup.ups["solo"], setup.ups["spare"]
    solo.mode = "after_first"
    spare_before = len(spare.requests)
    r = _chat(setup, "solo", stream=True)
    assert r.status_code == 200
    text, error = _stream_text(r)
    assert text == solo.text[:4]  # what the caller had seen stays, nothing is spliced on
    assert error is not None and error["code"] == "upstream"
    assert len(spare.requests) == spare_before  # no second upstream was called
    assert r.headers["x-sipp-target"] == "solo/solo" and r.headers["x-sipp-attempts"] == "1"
    poll(lambda: setup.attempts("solo", "solo", "connect") == 1, "the attempt counted")


def test_failure_before_the_first_token_is_retried_then_falls_back(setup: Setup) -> None:
    solo, spare = setup.ups["solo"], setup.ups["spare"]
    solo.mode = "reset"
    before = len(solo.requests)
    for stream in (False, True):
        r = _chat(setup, "solo", stream=stream)
        assert r.status_code == 200, r.text
        text = _stream_text(r)[0] if stream else r.json()["choices"][0]["message"]["content"]
        assert text == spare.text
        assert r.headers["x-sipp-target"] == "spare/spare" and r.headers["x-sipp-attempts"] == "4"
    assert len(solo.requests) - before == 6  # three attempts each, then the fallback


def test_a_client_gone_while_the_stream_is_held_closes_the_upstream_request(
    setup: Setup,
) -> None:
    solo = setup.ups["solo"]
    solo.mode = "slow"
    hangups = solo.hangups
    body = {"model": "solo", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with pytest.raises(httpx.ReadTimeout):  # held: no status line before the first token
        httpx.post(
            f"{setup.gw.public}/v1/chat/completions",
            json=body,
            headers=AUTH,
            timeout=httpx.Timeout(60, read=1),
        )
    poll(lambda: solo.hangups > hangups, "the held upstream request was closed")
    poll(lambda: setup.attempts("solo", "solo", "cancelled") >= 1, "the attempt ended")


def test_a_stream_commits_at_the_first_token_deadline(setup: Setup) -> None:
    """No first token within first_token_timeout_seconds: the stream commits anyway, so a
    failure after that is its error frame, not a fallback."""
    patient, spare = setup.ups["patient"], setup.ups["spare"]
    patient.mode = "late_reset"
    spare_before = len(spare.requests)
    r = _chat(setup, "patient", stream=True)
    assert r.status_code == 200
    text, error = _stream_text(r)
    assert text == "" and error is not None and error["code"] == "upstream"
    assert len(spare.requests) == spare_before
    assert r.headers["x-sipp-attempts"] == "1"
    patient.mode = "ok"
    r = _chat(setup, "patient", stream=True)  # a late answer is served whole
    assert _stream_text(r) == ("from patient", None)


# ----------------------------------------------------------------- fallbacks
def test_fallbacks_are_tried_in_order(setup: Setup) -> None:
    ups = setup.ups
    ups["chain1"].mode = ups["chain2"].mode = "500"
    r = _chat(setup, "chain1")
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "from spare"
    assert r.headers["x-sipp-target"] == "spare/spare" and r.headers["x-sipp-attempts"] == "3"
    c1, c2, sp = ups["chain1"].times[-1], ups["chain2"].times[-1], ups["spare"].times[-1]
    assert c1 < c2 < sp


def test_context_errors_go_to_context_fallbacks(setup: Setup) -> None:
    ups = setup.ups
    ups["small"].mode = "context"
    spare_before = len(ups["spare"].requests)
    r = _chat(setup, "small")
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "from big"
    assert r.headers["x-sipp-target"] == "big/big"
    assert len(ups["spare"].requests) == spare_before  # not the ordinary fallbacks
    assert setup.attempts("small", "small", "context") >= 1


def test_all_fallbacks_failing_gives_the_last_failure(setup: Setup) -> None:
    for name in ("chain1", "chain2", "spare"):
        setup.ups[name].mode = "500"
    r = _chat(setup, "chain1")
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream"
    assert r.headers["x-sipp-attempts"] == "3" and "x-sipp-target" not in r.headers


# ----------------------------------------------------------------- retries
def test_retry_after_is_honoured(setup: Setup) -> None:
    limited = setup.ups["limited"]
    limited.mode = "429once"
    before = len(limited.times)
    r = _chat(setup, "limited")
    assert r.status_code == 200 and r.headers["x-sipp-attempts"] == "2"
    first, second = limited.times[before : before + 2]
    assert second - first >= 1.0  # the upstream asked for one second


def test_retry_after_over_the_cap_is_not_waited_for(setup: Setup) -> None:
    up = setup.ups["limited_long"]
    up.mode = "429"  # Retry-After: 30, the target's cap is 1 s
    before = len(up.requests)
    r = _chat(setup, "limited_long")
    assert r.status_code == 429 and r.headers["retry-after"] == "30"
    assert len(up.requests) - before == 1  # not retried after 1 s, not waited 30 s
    assert r.headers["x-sipp-attempts"] == "1"


@pytest.mark.parametrize("status", ["400", "401", "403"])
def test_client_errors_are_never_retried(setup: Setup, status: str) -> None:
    strict, spare = setup.ups["strict"], setup.ups["spare"]
    strict.mode = status
    before, spare_before = len(strict.requests), len(spare.requests)
    r = _chat(setup, "strict")
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream"
    assert len(strict.requests) - before == 1 and len(spare.requests) == spare_before
    assert r.headers["x-sipp-attempts"] == "1"


def test_attempts_are_capped_per_request(setup: Setup) -> None:
    capped = setup.ups["capped"]
    capped.mode = "500"
    before = len(capped.requests)
    r = _chat(setup, "capped")
    assert r.status_code == 502
    assert len(capped.requests) - before == 3 and r.headers["x-sipp-attempts"] == "3"
    assert setup.attempts("capped", "capped", "5xx") >= 3


def test_the_attempt_cap_is_per_choice(setup: Setup) -> None:
    """n choices more than max_attempts (5 by default) each get their own attempts."""
    body = {"model": "spare", "messages": [{"role": "user", "content": "hi"}], "n": 8}
    r = httpx.post(f"{setup.gw.public}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    assert [c["message"]["content"] for c in r.json()["choices"]] == ["from spare"] * 8
    assert r.headers["x-sipp-attempts"] == "8"


# ----------------------------------------------------------------- pools and breakers
def test_pool_spreads_requests_over_its_deployments(setup: Setup) -> None:
    before = {n: len(setup.ups[n].requests) for n in "abc"}
    for _ in range(30):
        r = _chat(setup, "pool")
        assert r.status_code == 200
        assert r.headers["x-sipp-target"] in ("pool/a", "pool/b", "pool/c")
    assert all(len(setup.ups[n].requests) > before[n] for n in "abc")


def test_one_deployment_killed_under_steady_traffic(setup: Setup) -> None:
    """Kill one of three deployments mid-run: no request fails, its breaker opens, and it
    closes again once the deployment is back (timeline from /metrics)."""
    b = setup.ups["b"]
    failures: list[str] = []
    served = [0]
    stop = threading.Event()

    def traffic(worker: int) -> None:
        with openai.OpenAI(base_url=setup.gw.public + "/v1", api_key=TOKEN, max_retries=0) as c:
            i = 0
            while not stop.is_set():
                i += 1
                messages: Any = [{"role": "user", "content": "hi"}]
                try:
                    if (worker + i) % 2:
                        out = c.chat.completions.create(model="pool", messages=messages)
                        text = out.choices[0].message.content
                    else:
                        chunks = c.chat.completions.create(
                            model="pool", messages=messages, stream=True
                        )
                        text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
                    if text not in ("from a", "from b", "from c"):
                        failures.append(f"unexpected text {text!r}")
                except openai.OpenAIError as exc:
                    failures.append(repr(exc))
                served[0] += 1

    with ThreadPoolExecutor(4) as pool:
        workers = [pool.submit(traffic, w) for w in range(4)]
        try:
            poll(lambda: served[0] >= 40, "traffic flowing")
            assert setup.breaker("b") == 0
            b.kill()
            poll(lambda: setup.breaker("b") == 1, "b's breaker opened")
            opened_at = served[0]
            poll(lambda: served[0] >= opened_at + 40, "traffic while b is out")
            b.revive()
            poll(lambda: setup.breaker("b") == 0, "b's breaker closed again")
            back = len(b.requests)
            poll(lambda: len(b.requests) > back + 3, "b serving again")
        finally:
            stop.set()
            for w in workers:
                w.result()
    assert failures == []
    assert setup.attempts("pool", "b", "connect") >= 3
    opened = setup.gw.metric("sipp_gateway_breaker_opened_total", '{deployment="b",target="pool"}')
    assert opened >= 1


# ----------------------------------------------------------------- random failure schedules
MODES = ("ok", "ok", "500", "reset", "429", "after_first", "400")


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    modes=st.tuples(*[st.sampled_from(MODES)] * 3),
    stream=st.booleans(),
    n=st.sampled_from([1, 2]),
)
def test_random_failure_schedules_keep_the_invariants(
    setup: Setup, modes: tuple[str, str, str], stream: bool, n: int
) -> None:
    ups = [setup.ups[name] for name in "abc"]
    for up, mode in zip(ups, modes, strict=True):
        up.mode = mode
    before = [len(up.requests) for up in ups]
    n = 1 if stream else n
    body = {"model": "pool", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    r = httpx.post(
        f"{setup.gw.public}/v1/chat/completions", json={**body, "n": n}, headers=AUTH, timeout=60
    )
    calls = [len(up.requests) - b for up, b in zip(ups, before, strict=True)]
    # Every request an upstream saw is a counted attempt (an attempt on a connection the
    # upstream had already reset may never reach it), within the retry budget.
    assert 1 <= sum(calls) <= int(r.headers["x-sipp-attempts"]) <= 3 * n
    answered = {up.text: mode for up, mode in zip(ups, modes, strict=True)}
    if stream and r.status_code == 200:
        text, error = _stream_text(r)
        if error is None:  # a whole answer from one upstream that answers whole
            assert answered.get(text) in ("ok",), (text, modes)
        else:  # what it had seen of one upstream, then the error: never a splice
            assert any(text == t[:4] and m == "after_first" for t, m in answered.items())
    elif r.status_code == 200:
        for choice in r.json()["choices"]:
            assert answered.get(choice["message"]["content"]) in ("ok", "after_first")
    else:
        assert r.status_code in (429, 502), r.text
        assert r.json()["error"]["code"] in ("upstream", "rate_limited")
        if all(mode == "ok" for mode in modes):
            raise AssertionError("a pool of healthy deployments failed a request")
    # Nothing is left behind: upstream connections, the permit, per-deployment counts.
    poll(lambda: all(up.open_requests == 0 for up in ups), "upstream requests closed")
    poll(lambda: setup.gw.metric("sipp_gateway_in_flight_requests") == 0, "permit released")
    poll(lambda: _deployments_in_flight(setup.gw) == 0, "no attempt left in flight")


def test_a_full_local_queue_is_a_429_the_pool_falls_back_from(setup: Setup) -> None:
    # Greedy with SmolLM2's end-of-generation tokens (0, 2, 4) banned: the busy stream
    # should not end early and free the slot while the test relies on it being taken.
    no_end = {"0": -100, "2": -100, "4": -100}
    body = {
        "model": "busy-local",
        "prompt": "Count: 1, 2, 3,",
        "max_tokens": 1500,
        "temperature": 0,
        "logit_bias": no_end,
    }
    for _ in range(3):  # again only when the busy stream ended early (the premise failed)
        with httpx.stream(
            "POST",
            f"{setup.gw.public}/v1/completions",
            json={**body, "stream": True},
            headers=AUTH,
            timeout=120,
        ) as busy:  # takes the local target's only slot until it is closed
            assert busy.status_code == 200
            chunks = busy.iter_bytes()
            first = next(chunks)
            assert b'"text"' in first and b"error" not in first, first  # holding the slot
            direct = httpx.post(
                f"{setup.gw.public}/v1/completions",
                json={**body, "prompt": "Name three colours:"},
                headers=AUTH,
                timeout=60,
            )
            pooled = _chat(setup, "via-local") if direct.status_code == 429 else None
            if pooled is not None and pooled.json()["choices"][0]["message"]["content"] == (
                "from spare"
            ):
                break
            # The slot was free: only a busy stream that stopped before its 1,500 tokens
            # explains that; one that ran to its length was holding the slot all along.
            rest = first + b"".join(chunks)
            seen = (direct.status_code, direct.text[:300], pooled and pooled.text[:300])
            assert b'"finish_reason":"length"' not in rest, f"the slot was taken: {seen}"
    else:
        raise AssertionError(f"the busy stream ended early three times: {rest[-300:]!r}")
    assert direct.headers["retry-after"] == "1", direct.text
    assert direct.json()["error"]["code"] == "overloaded"
    assert pooled.status_code == 200, pooled.text
    assert pooled.headers["x-sipp-attempts"] == "2"
    assert setup.attempts("via-local", "busy-local", "429") >= 1
