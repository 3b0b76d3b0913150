"""Every retry or fallback attempt reserves again on its own target's limits, and each
target is settled with what its attempts used, against a real `sipp-gateway serve`
(the in-memory store and a real redis-server), loopback deployments speaking OpenAI's
JSON and SSE, and a local SmolLM2 fallback. Buckets are read through the admin API."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ..ports import free_port
from ..remote.loopback import Action, LoopbackServer, Request
from .admin_gateways import login
from .limited_gateways import FREE, LIMITED_CALLER, toml
from .pool_upstreams import Deployment, pool_toml
from .redis_server import RedisServer, running_redis
from .test_server import ENV, Gateway, serving
from .upstreams import poll, text_reply

CALLER_RPM = 10_000
CALLER_LIMITS = f"requests_per_minute = {CALLER_RPM}\ntokens_per_day = 10000000"
BIG = "requests_per_minute = 20000\ntokens_per_day = 1000000"
FAST = "attempts = 2\nbackoff_base_seconds = 0.01\nbackoff_cap_seconds = 0.02"
# "hi" as one user message: 3 + 4 + ceil(2 / 4) = 8 tokens estimated; each upstream
# answer reports 3 prompt + 3 completion tokens.
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
PROMPT_ESTIMATE, USED = 8, 6
# The local target's day budget: its exact count of LONG as a chat (about 130 tokens
# with SmolLM2's system prompt) plus max_tokens fits, twice; the byte estimate does not:
# 3 + 4 + 1200 / 4 = 307 tokens.
LOCAL_BUDGET = 300
LONG = " information" * 100
NAMES = ("prim", "fb", "full", "last", "twice", "tight", "to_local", "half", "pair", "back")
# `half`: a minute's tokens that cannot hold a choice's estimate twice (see its test)
HALF_TPM = 150


def _over(name: str, target: str) -> str:
    """A target `name` whose one deployment is the target `target`."""
    return (
        f'\n[[targets]]\nname = "{name}"\ntype = "openai_compatible"\nmodel = "m"\n'
        f'[[targets.deployments]]\ntarget = "{target}"\n'
    )


class Scripted(Deployment):
    """A deployment that answers its next requests as `script` says (then `ok`), and
    records how it answered each request it received."""

    def __init__(self, name: str) -> None:
        self.script: list[str] = []
        self.served: list[tuple[str, bool]] = []  # (mode, streamed) per request received
        super().__init__(name)

    def _handle(self, req: Request) -> list[Action]:
        self.mode = self.script.pop(0) if self.script else "ok"
        self.served.append((self.mode, bool(req.json().get("stream"))))
        return super()._handle(req)


def _config(ups: dict[str, Scripted], upstream: str, ports: tuple[int, int], state: str) -> str:
    def one(name: str, extra: str = "", **tables: str) -> str:
        return pool_toml(name, {name: ups[name].url}, extra, **tables)

    return (
        toml(upstream, *ports, CALLER_LIMITS, "", state)
        + one("prim", 'fallbacks = ["full", "fb"]', retry=FAST, limits=BIG)
        + one("fb", limits=BIG)
        + one("full", limits="requests_per_minute = 1")  # exhausted by `_exhaust`
        + one("last", 'fallbacks = ["full"]', limits=BIG)
        + one("twice", retry=FAST, limits="requests_per_minute = 2")
        + one("tight", 'fallbacks = ["fb"]', retry=FAST, limits="requests_per_minute = 1")
        + one("to_local", 'fallbacks = ["local-fb"]', limits=BIG)
        + one("half", retry=FAST, limits=f"tokens_per_minute = {HALF_TPM}")
        + one("pair", limits="tokens_per_day = 30")
        + one("back", limits="requests_per_minute = 1")
        + _over("front", "back")  # back allows one request a minute
        + _over("via_local", "local-fb")
    )


def _local(model: Path) -> str:
    return f"""
[[targets]]
name = "local-fb"
type = "local"
model = "{model}"
backend = "cpu"
stats = "off"
[targets.runtime.context]
n_ctx = 2048
n_parallel = 1
[targets.limits]
tokens_per_day = {LOCAL_BUDGET}
"""


class Setup:
    def __init__(self, gw: Gateway, ups: dict[str, Scripted], backend: str) -> None:
        self.gw, self.ups, self.backend = gw, ups, backend
        self.admin, _ = login(gw)

    def chat(self, target: str, token: str = LIMITED_CALLER, **fields: Any) -> httpx.Response:
        body = {**CHAT, "model": target, **fields}
        headers = {"authorization": f"Bearer {token}"}
        return httpx.post(
            f"{self.gw.public}/v1/chat/completions", json=body, headers=headers, timeout=120
        )

    def usage(self) -> dict[str, int]:
        """`scope:name:limit` -> what the bucket is short of full."""
        r = self.admin.get("/admin/api/usage")
        assert r.status_code == 200, r.text
        assert r.json()["available"]
        return {f"{u['scope']}:{u['name']}:{u['limit']}": u["used"] for u in r.json()["limits"]}

    def attempts(self, target: str, outcome: str) -> float:
        labels = f'{{deployment="{target}",outcome="{outcome}",target="{target}"}}'
        return self.gw.metric("sipp_gateway_upstream_attempts_total", labels)

    def exhaust(self) -> None:
        """Take `full`'s one request a minute (if its refill gave it back)."""
        for _ in range(3):
            if self.chat("full", FREE).status_code == 429:
                return
        raise AssertionError("full's one request a minute was never used up")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module", params=["memory", "redis"])
def setup(
    request: pytest.FixtureRequest,
    smollm_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Setup]:
    backend = str(request.param)
    env, state = {}, ""
    if backend == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        env = {"TEST_REDIS_URL": server.url}
        state = 'backend = "redis"\nurl_env = "TEST_REDIS_URL"\nkey_prefix = "attempts"'
    ups = {name: Scripted(name) for name in NAMES}
    directory = tmp_path_factory.mktemp(f"attempts-{backend}")
    ports = (free_port(), free_port())
    try:
        with LoopbackServer(text_reply) as upstream:
            path = directory / "gateway.toml"
            path.write_text(_config(ups, upstream.url, ports, state) + _local(smollm_path))
            with serving(path, {**ENV, **env}, *ports) as gw:
                yield Setup(gw, ups, backend)
    finally:
        for up in ups.values():
            up.close()


@pytest.fixture(autouse=True)
def idle(setup: Setup) -> Iterator[None]:
    """Each test starts with empty scripts and ends with nothing in flight."""
    for up in setup.ups.values():
        up.script = []
    yield
    poll(lambda: all(up.open_requests == 0 for up in setup.ups.values()), "upstreams idle")
    poll(lambda: setup.gw.metric("sipp_gateway_in_flight_requests") == 0, "gateway idle")


def _settled(setup: Setup, expected: dict[str, int], before: dict[str, int]) -> None:
    """Wait until every bucket in `expected` moved by exactly that much, and stays so."""

    def moved() -> dict[str, int]:
        now = setup.usage()
        return {key: now[key] - before[key] for key in expected}

    poll(lambda: moved() == expected, f"buckets moved by {expected} (now {moved()})")
    time.sleep(0.2)  # a late settlement (a leak being charged) would show now
    assert moved() == expected


# ----------------------------------------------------------------- request counts
def test_a_retry_counts_as_another_request_against_its_target(setup: Setup) -> None:
    """`twice` allows 2 requests a minute: one caller request that took a retry uses
    both, so the next request is refused before reaching its upstream."""
    twice = setup.ups["twice"]
    twice.script = ["500"]
    r = setup.chat("twice", FREE)
    assert r.status_code == 200, r.text
    assert r.headers["x-sipp-attempts"] == "2"
    calls = len(twice.requests)
    again = setup.chat("twice", FREE)
    assert again.status_code == 429, again.text
    assert again.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(again.headers["retry-after"]) <= 30  # a request refills in 30 s
    assert again.headers["x-ratelimit-remaining-requests"] == "0"
    assert len(twice.requests) == calls


def test_a_retry_its_target_refuses_moves_on_to_the_fallback(setup: Setup) -> None:
    """`tight` allows 1 request a minute, which the first attempt took: its retry is
    skipped like an upstream 429 and the fallback serves."""
    tight, fb = setup.ups["tight"], setup.ups["fb"]
    tight.script = ["500"]
    r = setup.chat("tight")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "from fb"
    assert r.headers["x-sipp-target"] == "fb/fb"
    assert [mode for mode, _ in tight.served] == ["500"]  # its upstream saw one attempt
    assert fb.served[-1] == ("ok", False)
    assert setup.attempts("tight", "rate_limited") == 1


# ----------------------------------------------------------------- exhausted fallbacks
def test_an_exhausted_fallback_is_skipped_and_the_next_one_serves(setup: Setup) -> None:
    setup.exhaust()
    full, prim = setup.ups["full"], setup.ups["prim"]
    full_calls, skipped = len(full.requests), setup.attempts("full", "rate_limited")
    for stream in (False, True):
        prim.script = ["500", "reset"]
        r = setup.chat("prim", stream=stream)
        assert r.status_code == 200, r.text
        assert "from fb" in r.text
        assert r.headers["x-sipp-target"] == "fb/fb" and r.headers["x-sipp-attempts"] == "3"
    assert len(full.requests) == full_calls  # never called
    assert setup.attempts("full", "rate_limited") == skipped + 2


def test_every_fallback_exhausted_is_a_429_with_retry_after(setup: Setup) -> None:
    setup.exhaust()
    full, last = setup.ups["full"], setup.ups["last"]
    full_calls = len(full.requests)
    for stream in (False, True):
        last.script = ["500"]
        r = setup.chat("last", stream=stream)
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(r.headers["retry-after"]) <= 60
        # the headers are the request's own limits (the caller's here), not the fallback's
        assert r.headers["x-ratelimit-limit-requests"] == str(CALLER_RPM)
    assert len(full.requests) == full_calls


@pytest.mark.parametrize(("stream", "n"), [(False, 1), (True, 1), (False, 2), (True, 2)])
def test_a_retry_is_never_refused_by_its_own_failed_attempts_estimate(
    setup: Setup, stream: bool, n: int
) -> None:
    """Each choice's estimate is over what `half`'s minute could hold twice (n=1: 100 of
    150) or, with the other choice's, three times (n=2: 60 each): a failed first attempt's
    share comes back as soon as it ends, so the retry there fits."""
    half = setup.ups["half"]
    half.script = ["500"]
    served, refused = len(half.served), setup.attempts("half", "rate_limited")
    per_choice = 100 if n == 1 else 60  # 2 x 100 > 150 >= 100; 3 x 60 > 150 >= 2 x 60
    max_tokens = per_choice - PROMPT_ESTIMATE
    r = setup.chat("half", FREE, stream=stream, n=n, max_tokens=max_tokens)
    assert r.status_code == 200, r.text
    assert r.headers["x-sipp-attempts"] == str(n + 1)
    assert [mode for mode, _ in half.served[served:]] == ["500"] + ["ok"] * n
    assert setup.attempts("half", "rate_limited") == refused


def test_n_choices_reserve_their_prompt_n_times_on_the_target(setup: Setup) -> None:
    """`pair`'s day holds 30 tokens: two choices of 8 + 10 each (the target runs the
    prompt once per choice) never fit, so the request is refused before running (the
    prompt counted once, 28 tokens, would have been let through, and charged 36)."""
    pair = setup.ups["pair"]
    calls = len(pair.requests)
    r = setup.chat("pair", FREE, n=2)
    assert r.status_code == 429, r.text
    assert "tokens_per_day (30) allows" in r.json()["error"]["message"]
    assert "retry-after" not in r.headers  # the request alone is too big: no wait helps
    assert len(pair.requests) == calls
    one = setup.chat("pair", FREE)
    assert one.status_code == 200, one.text


def test_a_pool_deployment_that_is_another_target_reserves_on_its_limits(
    setup: Setup,
) -> None:
    """`front` runs on the target `back`, which allows one request a minute: a request
    through `front` takes it, and once it is used up `front` is refused too, without
    calling `back`'s upstream."""
    back = setup.ups["back"]
    r = setup.chat("front", FREE)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "from back"
    direct = setup.chat("back", FREE)
    assert direct.status_code == 429, direct.text
    calls = len(back.requests)
    again = setup.chat("front", FREE)
    assert again.status_code == 429, again.text
    assert again.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(again.headers["retry-after"]) <= 60
    assert len(back.requests) == calls


# ----------------------------------------------------------------- settlement
@pytest.mark.parametrize(("stream", "n"), [(False, 1), (True, 1), (False, 2), (True, 2)])
def test_after_a_fallback_served_each_bucket_holds_what_was_used_there(
    setup: Setup, stream: bool, n: int
) -> None:
    """The primary's failed attempts (two per choice) streamed nothing: its token
    reservation comes back whole. The exhausted fallback is skipped by each choice, the
    next one is charged its real usage per choice, and the caller what it received."""
    setup.exhaust()
    before = setup.usage()
    skipped = setup.attempts("full", "rate_limited")
    setup.ups["prim"].script = ["500"] * (2 * n)
    r = setup.chat("prim", stream=stream, n=n)
    assert r.status_code == 200 and r.headers["x-sipp-target"] == "fb/fb", r.text
    assert r.headers["x-sipp-attempts"] == str(3 * n)
    _settled(
        setup,
        {
            "target:prim:tokens_per_day": 0,
            "target:fb:tokens_per_day": USED * n,
            "caller:team:tokens_per_day": USED if n == 1 else 3 + 3 * n,  # the prompt once
        },
        before,
    )
    assert setup.attempts("full", "rate_limited") == skipped + n


@pytest.mark.parametrize(
    ("target", "served"), [("to_local", "local-fb"), ("via_local", "via_local/local-fb")]
)
def test_a_local_target_reserves_its_exact_prompt_count(
    setup: Setup, target: str, served: str
) -> None:
    """The byte estimate of LONG would not fit the local target's budget; its tokenizer's
    count does, whether the local target is a fallback or a pool's deployment, and the
    budget is then charged the local run's real usage."""
    setup.ups["to_local"].script = ["500"]
    key = "target:local-fb:tokens_per_day"
    before = setup.usage()[key]  # a budget these two tests have to themselves
    r = setup.chat(target, messages=[{"role": "user", "content": LONG}], max_tokens=4)
    assert r.status_code == 200, r.text
    assert r.headers["x-sipp-target"] == served
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] + 4 <= LOCAL_BUDGET - before
    assert 3 + 4 + len(LONG) // 4 + 4 > LOCAL_BUDGET  # the byte estimate would not fit
    _settled(setup, {key: usage["total_tokens"]}, {key: before})


# ----------------------------------------------------------------- random schedules
MODES = ("ok", "500", "reset", "after_first")


def _charge(mode: str, stream: bool) -> int:
    """What a target is charged for one request its upstream answered with `mode`."""
    if mode == "ok" or (mode == "after_first" and not stream):
        return USED
    if mode == "after_first":  # cut after "from" (1 token estimated) had been forwarded
        return 1 + PROMPT_ESTIMATE
    return 0  # failed before any output


def _subset_sums(charges: list[int]) -> set[int]:
    return {
        sum(chosen)
        for k in range(len(charges) + 1)
        for chosen in itertools.combinations(charges, k)
    }


def _stream_text(r: httpx.Response) -> tuple[str, bool]:
    """An OpenAI chat stream's text, and whether it ended with an error frame."""
    text, error = "", False
    for frame in r.text.strip().split("\n\n"):
        data = frame.removeprefix("data: ")
        if data in ("", "[DONE]"):
            continue
        obj = json.loads(data)
        error = error or "error" in obj
        for choice in obj.get("choices", []):
            text += choice.get("delta", {}).get("content") or ""
    return text, error


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    prim=st.lists(st.sampled_from(MODES), max_size=4),
    fb=st.lists(st.sampled_from(MODES), max_size=2),
    stream=st.booleans(),
    n=st.sampled_from([1, 2]),
)
def test_random_failure_schedules_settle_every_bucket_to_what_was_used(
    setup: Setup, prim: list[str], fb: list[str], stream: bool, n: int
) -> None:
    """Whatever fails how: each target's day budget moves by exactly what its attempts
    used or streamed, the caller's by what it received, and nothing stays reserved.
    When one of two choices fails, the other is cancelled wherever it was: each of its
    attempts is then charged in full or not at all."""
    if stream and n == 2:  # a cut after the first token would cut the other choice anywhere
        prim = [m if m != "after_first" else "ok" for m in prim]
        fb = [m if m != "after_first" else "ok" for m in fb]
    setup.exhaust()
    ups = setup.ups
    ups["prim"].script, ups["fb"].script = list(prim), list(fb)
    seen = {name: len(ups[name].served) for name in ("prim", "fb")}
    before = setup.usage()
    r = setup.chat("prim", stream=stream, n=n)
    charges = {
        name: [_charge(*answer) for answer in ups[name].served[seen[name] :]]
        for name in ("prim", "fb")
    }
    ok = r.status_code == 200
    text, cut = _stream_text(r) if ok and stream else ("", False)
    if not ok:
        assert r.status_code in (429, 502), r.text
        caller = 0
    elif cut:  # what it streamed, the prompt's estimate with it: a choice cut after
        # "from" (after_first) counts 1 token; a whole answer its reported 3 (n=2: the
        # other choice failed after this one had been forwarded)
        whole = text.count("from prim") + text.count("from fb")
        caller = 3 * whole + (text.count("from") - whole) + PROMPT_ESTIMATE if text else 0
    else:
        caller = USED if n == 1 else 3 + 3 * n  # the prompt once, as OpenAI reports it
    if n == 2 and not ok:
        _settled(setup, {"caller:team:tokens_per_day": caller}, before)
        possible = {name: _subset_sums(each) for name, each in charges.items()}

        def moved() -> dict[str, int]:
            now = setup.usage()
            key = "target:{}:tokens_per_day".format
            return {name: now[key(name)] - before[key(name)] for name in charges}

        def plausible() -> bool:
            return all(m in possible[name] for name, m in moved().items())

        poll(plausible, f"targets moved by one of {possible} (now {moved()})")
        time.sleep(0.2)  # a late settlement (a leak being charged) would show now
        assert plausible(), (moved(), possible)
        return
    expected = {f"target:{name}:tokens_per_day": sum(each) for name, each in charges.items()}
    _settled(setup, {**expected, "caller:team:tokens_per_day": caller}, before)
