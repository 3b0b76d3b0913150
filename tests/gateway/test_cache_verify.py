"""Online verification of cache hits on real `sipp-gateway serve` processes: a loopback
provider whose answer the test switches counts its calls. With `verify_fraction = 1` each
hit is answered from the cache and also sent upstream once in the background; the same
answer agrees, a changed one disagrees, a 500 is an error, a busy gateway skips it, and
/metrics shows the counts and the false-hit rate. With 0 a hit never calls upstream. A
semantic hit is compared through the local all-MiniLM-L6-v2 embedding target, and a
disagreeing one leaves the semantic index. Stopping the gateway cancels a verification
in flight cleanly."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from ..ports import free_port
from ..remote.loopback import Action, Chunk, LoopbackServer, Request, Status, Wait
from .admin_gateways import login
from .limited_gateways import limited_gateway, toml
from .pool_upstreams import Deployment, pool_toml
from .test_cache_gateway import cached_gateway, chat, sqlite_cache
from .test_semantic_gateway import indexed, semantic
from .test_server import ENV, TOKEN, Gateway, running_gateway, without_prefix_reuse
from .upstreams import embeddings_reply, poll, text_reply

SAME = "The sky is blue."
ANSWERS = {
    "same": SAME,
    "spaced": "The sky  is\nblue.",  # the same once whitespace is normalized
    "reworded": "the sky is blue",  # other characters, the same meaning
    "changed": "Bananas are a yellow fruit.",
    "negated": "The sky is not blue.",  # close embeddings, but the guard sees the "not"
}
AUTH = {"authorization": f"Bearer {TOKEN}"}
STORES = '{route="/v1/chat",target="remote"}'


class Answers(LoopbackServer):
    """An OpenAI-style provider answering `ANSWERS[reply]`, a 500 (`reply = "500"`), or
    `SAME` once `release` is set (`reply = "hold"`, or a question containing "slow")."""

    def __init__(self) -> None:
        self.reply = "same"
        self.release = threading.Event()
        super().__init__(self.answer)

    def answer(self, req: Request) -> list[Action]:
        if req.path.endswith("/embeddings"):
            return embeddings_reply(req)
        ask = req.json()["messages"][-1]["content"]
        if "slow" in ask or self.reply == "hold":
            return [Wait(self.release, timeout=60), *text_reply(req, SAME)]
        if self.reply == "500":
            return [Status(500, {"content-type": "application/json"}), Chunk(b'{"error": {}}')]
        return text_reply(req, ANSWERS[self.reply])

    def calls(self) -> int:
        return sum(r.path.endswith("/chat/completions") for r in self.requests)


def verified(gw: Gateway, outcome: str, match: str = "exact") -> float:
    labels = f'{{match="{match}",outcome="{outcome}",target="remote"}}'
    return gw.metric("sipp_gateway_cache_verifications_total", labels)


def store(gw: Gateway, ask: str) -> None:
    """Ask `ask` once (a miss) and wait until its answer is written."""
    before = gw.metric("sipp_gateway_cache_stores_total", STORES)
    r = chat(gw, ask)
    assert r.status_code == 200 and r.headers["x-sipp-cache"] == "store", r.text
    poll(lambda: gw.metric("sipp_gateway_cache_stores_total", STORES) > before, "stored")


def hit(gw: Gateway, ask: str, match: str = "exact") -> httpx.Response:
    r = chat(gw, ask)
    assert r.status_code == 200, r.text
    assert r.headers["x-sipp-cache"] == "hit" and r.headers["x-sipp-cache-match"] == match
    assert not any("verif" in name for name in r.headers)  # nothing of it reaches the caller
    return r


def wait_for(gw: Gateway, outcome: str, count: float, match: str = "exact") -> None:
    poll(lambda: verified(gw, outcome, match) == count, f"{count} {match} {outcome}", 60)


@pytest.fixture
def upstream() -> Iterator[Answers]:
    server = Answers()
    yield server
    server.release.set()
    server.close()


# ------------------------------------------------------------------ exact hits
def test_each_hit_is_verified_once_in_the_background(upstream: Answers, tmp_path: Path) -> None:
    limits = "requests_per_minute = 1000\ntokens_per_day = 100000"
    cache = sqlite_cache(tmp_path, "verify_fraction = 1")
    with limited_gateway(
        tmp_path,
        upstream,
        caller_limits=limits,
        target_limits=f"{limits}\n[targets.cache]\n{cache}",
    ) as gw:
        store(gw, "Why is the sky blue?")
        calls = upstream.calls()
        assert hit(gw, "Why is the sky blue?").json()["text"] == SAME
        wait_for(gw, "agree", 1)
        assert upstream.calls() == calls + 1

        upstream.reply = "spaced"  # only whitespace differs: still the same answer
        assert hit(gw, "Why is the sky blue?").json()["text"] == SAME
        wait_for(gw, "agree", 2)

        upstream.reply = "changed"
        r = hit(gw, "Why is the sky blue?")
        assert r.json()["text"] == SAME  # the caller gets the cached answer
        wait_for(gw, "disagree", 1)
        false_hits = '{match="exact",target="remote"}'
        assert gw.metric("sipp_gateway_cache_false_hit_rate", false_hits) == pytest.approx(1 / 3)

        upstream.reply = "500"
        assert hit(gw, "Why is the sky blue?").json()["text"] == SAME
        wait_for(gw, "error", 1)
        assert upstream.calls() == calls + 4  # one upstream call per hit, no retry
        # the fresh answers were never stored: the cache still answers what it held
        assert hit(gw, "Why is the sky blue?").json()["text"] == SAME
        wait_for(gw, "error", 2)
        assert gw.metric("sipp_gateway_cache_stores_total", STORES) == 1

        # The caller was charged one stored answer (6 tokens) and nothing for the hits;
        # the target's own budget also carries the three verifications that got an answer
        # (an error settles at nothing: no usage came back)
        client, _ = login(gw)
        limits = client.get("/admin/api/usage").json()["limits"]
        used = {(u["scope"], u["limit"]): u["used"] for u in limits}
        assert used[("caller", "tokens_per_day")] == 6
        assert used[("target", "tokens_per_day")] == 6 + 3 * 6


def test_no_verification_without_a_fraction(upstream: Answers, tmp_path: Path) -> None:
    with cached_gateway(tmp_path, upstream, sqlite_cache(tmp_path)) as gw:
        store(gw, "Why is the sky blue?")
        calls = upstream.calls()
        upstream.reply = "changed"
        for _ in range(3):
            assert hit(gw, "Why is the sky blue?").json()["text"] == SAME
        assert upstream.calls() == calls
        assert (
            "sipp_gateway_cache_verifications_total{"
            not in httpx.get(f"{gw.management}/metrics", timeout=60).text
        )


def test_a_fraction_verifies_that_share_of_hits(upstream: Answers, tmp_path: Path) -> None:
    with cached_gateway(tmp_path, upstream, sqlite_cache(tmp_path, "verify_fraction = 0.5")) as gw:
        store(gw, "Why is the sky blue?")
        calls = upstream.calls()
        for n in range(1, 5):
            hit(gw, "Why is the sky blue?")
            wait_for(gw, "agree", n // 2)
        assert upstream.calls() == calls + 2


def test_a_busy_gateway_skips_verification(upstream: Answers, tmp_path: Path) -> None:
    cache = sqlite_cache(tmp_path, "verify_fraction = 1")
    with cached_gateway(tmp_path, upstream, cache, top="max_concurrent_requests = 2") as gw:
        store(gw, "Why is the sky blue?")
        calls = upstream.calls()
        slow = threading.Thread(target=chat, args=(gw, "a slow question"))
        slow.start()
        try:
            poll(lambda: upstream.calls() == calls + 1, "the slow request upstream")
            # one permit of two is taken: verifying would take the callers' last one
            hit(gw, "Why is the sky blue?")
            wait_for(gw, "skipped", 1)
            assert upstream.calls() == calls + 1
        finally:
            upstream.release.set()
            slow.join(60)
        hit(gw, "Why is the sky blue?")  # a permit to spare again
        wait_for(gw, "agree", 1)
        assert upstream.calls() == calls + 2


def test_stopping_cancels_a_verification_in_flight(upstream: Answers, tmp_path: Path) -> None:
    cache = sqlite_cache(tmp_path, "verify_fraction = 1")
    with cached_gateway(tmp_path, upstream, cache) as gw:
        store(gw, "Why is the sky blue?")
        calls = upstream.calls()
        upstream.reply = "hold"
        hit(gw, "Why is the sky blue?")
        poll(lambda: upstream.calls() == calls + 1, "the verification upstream")
        hit(gw, "Why is the sky blue?")  # one verification of a target at a time
        wait_for(gw, "skipped", 1)
    # the context manager stopped it: exit code 0 was checked there
    assert gw.stderr is not None
    for trouble in ("Traceback", "Task was destroyed", "never retrieved", "verification"):
        assert trouble not in gw.stderr, gw.stderr
    poll(lambda: upstream.hangups == 1, "the held upstream call closed by the gateway")


# ------------------------------------------------------------------ semantic hits
def test_a_semantic_hit_is_compared_by_meaning(upstream: Answers, tmp_path: Path) -> None:
    extra = semantic("verify_fraction = 1\nverify_threshold = 0.9")
    with cached_gateway(tmp_path, upstream, sqlite_cache(tmp_path, extra)) as gw:
        store(gw, "How do I reset my password?")
        indexed(gw, 1)
        upstream.reply = "reworded"
        r = hit(gw, "How can I reset my password?", match="semantic")
        assert r.json()["text"] == SAME
        wait_for(gw, "agree", 1, "semantic")

        upstream.reply = "changed"
        hit(gw, "What is the way to reset my password?", match="semantic")
        wait_for(gw, "disagree", 1, "semantic")
        rate = gw.metric("sipp_gateway_cache_false_hit_rate", '{match="semantic",target="remote"}')
        assert rate == pytest.approx(0.5)
        # the disagreeing match left the semantic index: paraphrases miss it now
        indexed(gw, 0)
        again = chat(gw, "How can I reset my password?")
        assert again.headers["x-sipp-cache"] == "store"
        assert again.json()["text"] == ANSWERS["changed"]

        # an exact hit is compared the same way: the guard catches what the embeddings miss
        upstream.reply = "same"
        store(gw, "Why is the sky blue?")
        upstream.reply = "negated"
        hit(gw, "Why is the sky blue?")
        wait_for(gw, "disagree", 1)
        assert verified(gw, "agree") == 0


# ------------------------------------------------------------------ settings
def test_verification_settings_parse_with_path_named_errors() -> None:
    from sipp.gateway.cache.config import DEFAULT_VERIFY_THRESHOLD
    from sipp.gateway.config import ConfigError, parse_config

    from .test_cache_units import _config

    cache = parse_config(_config({"path": "/x", "verify_fraction": 0.25})).targets[0].cache
    assert cache is not None and cache.verify_fraction == 0.25
    assert cache.verify_threshold == DEFAULT_VERIFY_THRESHOLD
    default = parse_config(_config({"path": "/x"})).targets[0].cache
    assert default is not None and default.verify_fraction == 0
    for bad, problem in (
        ({"verify_fraction": 1.5}, "verify_fraction: must be a number in [0, 1]"),
        ({"verify_fraction": -0.1}, "verify_fraction: must be a number in [0, 1]"),
        ({"verify_fraction": "all"}, "verify_fraction: must be a number in [0, 1]"),
        ({"verify_fraction": True}, "verify_fraction: must be a number in [0, 1]"),
        ({"verify_threshold": 0.9}, "verify_threshold: is only read with semantic = true"),
        ({"verify_threshold": 0}, "verify_threshold: must be a number in (0, 1]"),
    ):
        with pytest.raises(ConfigError) as info:
            parse_config(_config({"path": "/x", **bad}))
        assert f"targets[0].cache.{problem}" in " ".join(info.value.problems), info.value.problems


# ------------------------------------------------------------------ a local target
def test_a_local_target_is_verified_only_with_an_idle_slot(
    smollm_path: Path, tmp_path: Path
) -> None:
    """SmolLM2 with one slot: a hit's verification runs the same greedy request again
    (and agrees), but is skipped while a caller's generation holds the slot."""
    cache = f'[targets.cache]\npath = "{tmp_path / "cache"}"\nverify_fraction = 1\n'
    cache += 'store_finish = ["stop", "length"]\n'  # 12 tokens cut the answer

    def edit(toml: str) -> str:
        # the verification prefills the prompt whole, as the run it checks did
        toml = without_prefix_reuse(toml).replace("n_parallel = 2", "n_parallel = 1", 1)
        # permits to spare: only the busy slot can make the verification wait
        toml = toml.replace("max_concurrent_requests = 2", "max_concurrent_requests = 8", 1)
        return toml.replace('stats = "basic"\n', f'stats = "basic"\n{cache}', 1)

    def ask() -> httpx.Response:
        body = {
            "model": "local",
            "messages": [{"role": "user", "content": "Name three colours."}],
            "max_tokens": 12,
            "temperature": 0,
        }
        return httpx.post(f"{gw.public}/v1/chat/completions", json=body, headers=AUTH, timeout=300)

    def local(outcome: str) -> float:
        labels = f'{{match="exact",outcome="{outcome}",target="local"}}'
        return gw.metric("sipp_gateway_cache_verifications_total", labels)

    with running_gateway(smollm_path, tmp_path, edit) as gw:
        first = ask()
        assert first.headers["x-sipp-cache"] == "store"
        poll(lambda: gw.metric("sipp_gateway_cache_entries", '{target="local"}') == 1, "stored")
        generated = gw.metric("sipp_gateway_output_tokens_total", '{target="local"}')
        assert ask().headers["x-sipp-cache"] == "hit"
        poll(lambda: local("agree") == 1, "the local verification agreed", timeout=120)
        assert local("disagree") == local("error") == 0
        # it ran the model again, outside the caller's request metrics
        assert gw.metric("sipp_gateway_output_tokens_total", '{target="local"}') == generated

        # A long generation (end-of-text banned) holds the only slot: the hit is answered,
        # its verification skipped rather than queued ahead of the next caller.
        long = {"messages": [{"role": "user", "content": "Tell a story."}], "max_tokens": 400}
        long["logit_bias"] = {"0": -100, "2": -100}
        body = {"model": "local", "temperature": 0, "stream": True, **long}
        with httpx.stream(
            "POST", f"{gw.public}/v1/chat/completions", json=body, headers=AUTH, timeout=300
        ) as story:
            lines = story.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            assert ask().headers["x-sipp-cache"] == "hit"
            poll(lambda: local("skipped") == 1, "the verification skipped", timeout=120)
            for _ in lines:  # the story runs to its end
                pass
        assert local("agree") == 1


# ------------------------------------------------------------------ retries and limits
class Scripted(Deployment):
    """A deployment that answers its next requests as `script` says (then `ok`)."""

    def __init__(self, name: str) -> None:
        self.script: list[str] = []
        super().__init__(name)

    def _handle(self, req: Request) -> list[Action]:
        self.mode = self.script.pop(0) if self.script else "ok"
        return super()._handle(req)


class Pooled:
    """A gateway whose cached target `prim` (retried once, `fallbacks = ["fb"]`) and its
    fallback `fb` each have a day budget, read through the admin API."""

    def __init__(self, gw: Gateway, prim: Scripted, fb: Deployment) -> None:
        self.gw, self.prim, self.fb = gw, prim, fb
        self.admin, _ = login(gw)

    def day(self) -> dict[str, int]:
        limits = self.admin.get("/admin/api/usage").json()["limits"]
        return {u["name"]: u["used"] for u in limits if u["limit"] == "tokens_per_day"}

    def verified(self, outcome: str) -> float:
        labels = f'{{match="exact",outcome="{outcome}",target="prim"}}'
        return self.gw.metric("sipp_gateway_cache_verifications_total", labels)

    def hit(self) -> None:
        r = chat(self.gw, "q", model="prim", max_tokens=10)
        assert r.status_code == 200 and r.headers["x-sipp-cache"] == "hit", r.text


@contextmanager
def pooled(tmp_path: Path) -> Iterator[Pooled]:
    """A `Pooled` gateway whose answer to "q" (6 tokens, charged to prim) is cached."""
    budget = "requests_per_minute = 1000\ntokens_per_day = 100000"
    retry = "attempts = 2\nbackoff_base_seconds = 0.01\nbackoff_cap_seconds = 0.02"
    prim, fb = Scripted("prim"), Deployment("fb")
    public, management = free_port(), free_port()
    config = toml("http://127.0.0.1:9", public, management)
    cache = sqlite_cache(tmp_path, "verify_fraction = 1")
    config += pool_toml(
        "prim", {"p": prim.url}, 'fallbacks = ["fb"]', retry=retry, limits=budget, cache=cache
    )
    config += pool_toml("fb", {"f": fb.url}, limits=budget)
    path = tmp_path / "gateway.toml"
    path.write_text(config)
    gw = Gateway(path, ENV, public, management)
    try:
        gw.wait_ready()
        setup = Pooled(gw, prim, fb)
        first = chat(gw, "q", model="prim", max_tokens=10)
        assert first.status_code == 200 and first.headers["x-sipp-cache"] == "store", first.text
        poll(lambda: setup.day() == {"prim": 6, "fb": 0}, "the stored answer charged")
        yield setup
    finally:
        code, err = gw.stop()
        prim.close()
        fb.close()
    assert code == 0, err


def test_a_verifications_retry_is_charged_once(tmp_path: Path) -> None:
    """The first attempt fails, the retry (reserved on its own) answers: the target's
    budget moves by the usage of the attempt that answered, once."""
    with pooled(tmp_path) as setup:
        setup.prim.script = ["500"]
        setup.hit()
        poll(lambda: setup.verified("agree") == 1, "verified")
        assert len(setup.prim.requests) == 3
        poll(lambda: setup.day() == {"prim": 12, "fb": 0}, f"charged once ({setup.day()})")
        time.sleep(0.3)  # a late settlement would show now
        assert setup.day() == {"prim": 12, "fb": 0}


def test_a_verification_never_asks_a_fallback(tmp_path: Path) -> None:
    """Every attempt on `prim` fails: the verification is an `error` without calling
    `fb` (a paid call whose answer says nothing about prim's cache), and nothing is
    charged anywhere."""
    with pooled(tmp_path) as setup:
        setup.prim.script = ["500", "500"]
        setup.hit()
        poll(lambda: setup.verified("error") == 1, "verification failed")
        assert len(setup.prim.requests) == 3
        assert len(setup.fb.requests) == 0
        time.sleep(0.3)  # a late settlement would show now
        assert setup.day() == {"prim": 6, "fb": 0}
