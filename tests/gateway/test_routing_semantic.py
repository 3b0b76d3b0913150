"""Semantic routing on real `sipp-gateway serve` processes: rules with example utterances
(embedded by a local all-MiniLM-L6-v2 target) and the semantic cache's `near_miss`
state, with three loopback providers ("fast", "deep", "general") counting their calls.
The classic configuration runs as written: a cache hit answers, a near miss goes to the
fast target, a miss to the deep one."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from ..ports import free_port
from ..remote.loopback import LoopbackServer
from .test_routing import HEAD, ROUTES_ENV, ask, calls, check, decisions
from .test_semantic_gateway import EMBEDDER, semantic
from .test_server import ENV, Gateway, serving
from .upstreams import poll, text_reply

ORIGIN = "http://app.example"
RULES = """
[[route_rules]]
name = "weather-shadow"
match = "general"
mode = "shadow"
examples = ["Will it rain today?", "What's the weather like tomorrow?"]
embedding_target = "minilm"
target = "deep"

[[route_rules]]
name = "account-fast"
match = "general"
examples = ["How do I reset my password?", "My account is locked"]
examples_threshold = 0.7
embedding_target = "minilm"
target = "fast"

[[route_rules]]
name = "billing-deep"        # no embedding_target: deep's semantic cache's
match = "general"
examples = ["Where can I download my invoices?", "Why was I charged twice?"]
target = "deep"

# the classic: hit -> answer from the cache; near miss -> fast; miss -> deep
[[route_rules]]
name = "answered"
match = "deep"
cache = "hit"
target = "deep"

[[route_rules]]
name = "near-fast"
match = "deep"
cache = "near_miss"
cache_target = "deep"
near_miss_threshold = 0.6
target = "fast"

[[route_rules]]
name = "miss-deep"
match = "deep"
cache = "miss"
target = "deep"
"""


def config(directory: Path, urls: dict[str, str], public: int, management: int) -> str:
    providers = "".join(
        f"""
[[targets]]
name = "{name}"
type = "openai_compatible"
model = "{name}-model"
base_url = "{url}/v1"
"""
        for name, url in urls.items()
    )
    return f"""
public_bind = "127.0.0.1:{public}"
management_bind = "127.0.0.1:{management}"
allowed_origins = ["{ORIGIN}"]
admin_password_env = "TEST_ADMIN_PASSWORD"

[security.client_ip]
source = "peer"
trusted_proxy_cidrs = []

[security.rate_limit]
enabled = false

[routes]
readiness = "/readyz"
metrics = "/metrics"
admin = "/admin"

[[tokens]]
env = "TEST_TOKEN_ALL"
caller = "team"
targets = []
{providers}
[targets.cache]
path = "{directory / "cache"}"
{semantic()}
{RULES}"""


@pytest.fixture(scope="module")
def providers() -> Iterator[dict[str, LoopbackServer]]:
    # "deep" last: its [targets.cache] follows it in the config
    servers = {
        name: LoopbackServer(lambda req, name=name: text_reply(req, f"{name} answer"))
        for name in ("fast", "general", "deep")
    }
    yield servers
    for server in servers.values():
        server.close()


@contextmanager
def semantic_gateway(directory: Path, providers: dict[str, LoopbackServer]) -> Iterator[Gateway]:
    public, management = free_port(), free_port()
    path = directory / "gateway.toml"
    urls = {name: server.url for name, server in providers.items()}
    path.write_text(config(directory, urls, public, management))
    with serving(path, ROUTES_ENV, public, management) as gw:
        yield gw


@pytest.fixture(scope="module")
def gateway(
    providers: dict[str, LoopbackServer], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    with semantic_gateway(tmp_path_factory.mktemp("routesem"), providers) as gw:
        yield gw


def counts(providers: dict[str, LoopbackServer]) -> dict[str, int]:
    return {name: calls(server) for name, server in providers.items()}


def routed(gw: Gateway, question: str, model: str = "general", **kw: Any) -> httpx.Response:
    response = ask(gw, question, model=model, temperature=0, **kw)
    assert response.status_code == 200, response.text
    return response


def answer(response: httpx.Response) -> str:
    content: str = response.json()["choices"][0]["message"]["content"]
    return content


# ------------------------------------------------------------------ examples
def test_a_paraphrase_of_an_example_routes_and_anything_else_takes_the_default(
    gateway: Gateway, providers: dict[str, LoopbackServer]
) -> None:
    before = counts(providers)
    paraphrase = routed(gateway, "How can I reset my password please?")
    assert paraphrase.headers["x-sipp-route"] == "account-fast"
    assert paraphrase.headers["x-sipp-target"] == "fast"
    assert answer(paraphrase) == "fast answer"
    # numbers are not compared: an example stands for an intent
    counted = routed(gateway, "How do I reset my password for 2 accounts?")
    assert counted.headers["x-sipp-route"] == "account-fast"
    unrelated = routed(gateway, "What is the capital of France?")
    assert unrelated.headers["x-sipp-route"] == "default"
    assert answer(unrelated) == "general answer"
    assert counts(providers) == {
        **before,
        "fast": before["fast"] + 2,
        "general": before["general"] + 1,
    }
    assert decisions(gateway, "account-fast", "fast", "enforce") >= 2


def test_a_negated_example_does_not_match(
    gateway: Gateway, providers: dict[str, LoopbackServer]
) -> None:
    """0.97 similar to "My account is locked" with MiniLM: the guard's negation count decides."""
    before = counts(providers)
    negated = routed(gateway, "My account is not locked")
    assert negated.headers["x-sipp-route"] == "default"
    assert counts(providers)["general"] == before["general"] + 1
    assert counts(providers)["fast"] == before["fast"]


def test_a_shadow_rule_with_examples_counts_and_does_not_act(
    gateway: Gateway, providers: dict[str, LoopbackServer]
) -> None:
    shadow = decisions(gateway, "weather-shadow", "deep", "shadow")
    before = counts(providers)
    response = routed(gateway, "Is it going to rain today?")
    assert response.headers["x-sipp-route"] == "default"
    assert answer(response) == "general answer"
    assert decisions(gateway, "weather-shadow", "deep", "shadow") == shadow + 1
    assert counts(providers) == {**before, "general": before["general"] + 1}
    # a question no example is near: the shadow rule does not hold, nothing counted
    routed(gateway, "Write a haiku about autumn leaves")
    assert decisions(gateway, "weather-shadow", "deep", "shadow") == shadow + 1


def test_the_question_is_embedded_once_for_the_route_and_the_cache(
    gateway: Gateway, providers: dict[str, LoopbackServer]
) -> None:
    """billing-deep embeds with deep's cache's embedding target (its default); deep's
    semantic cache then searches with that vector instead of embedding it again."""
    embedded = 'sipp_gateway_cache_embedding_seconds_count{target="deep"}'
    before = gateway.metric(embedded)
    first = routed(gateway, "Where do I download my invoices?")
    assert first.headers["x-sipp-route"] == "billing-deep"
    assert first.headers["x-sipp-target"] == "deep"
    assert first.headers["x-sipp-cache"] == "store"
    assert gateway.metric(embedded) == before  # looked up semantically, not embedded again
    # the vector stored with the answer is the route's: a paraphrase is a semantic hit
    poll(
        lambda: gateway.metric("sipp_gateway_cache_semantic_entries", '{target="deep"}') >= 1,
        "the question indexed",
        timeout=60,
    )
    calls_before = counts(providers)
    hit = routed(gateway, "Where can I download my invoices?")
    assert hit.headers["x-sipp-route"] == "billing-deep"
    assert hit.headers["x-sipp-cache"] == "hit"
    assert hit.headers["x-sipp-cache-match"] == "semantic"
    assert answer(hit) == "deep answer"
    assert counts(providers) == calls_before
    assert gateway.metric(embedded) == before


# ------------------------------------------------------------------ cache states
def test_hit_answers_near_miss_goes_fast_miss_goes_deep(
    gateway: Gateway, providers: dict[str, LoopbackServer]
) -> None:
    stored = routed(gateway, "How do I reset my password?", model="deep")
    assert stored.headers["x-sipp-route"] == "miss-deep"
    assert stored.headers["x-sipp-cache"] == "store"
    poll(
        lambda: (
            routed(gateway, "How do I reset my password?", model="deep").headers["x-sipp-route"]
            == "answered"
        ),
        "the answer stored",
        timeout=60,
    )
    before = counts(providers)
    # hit (exact, then a paraphrase at 0.99): answered from deep's cache, no upstream call
    for question, match in (
        ("How do I reset my password?", "exact"),
        ("How can I reset my password?", "semantic"),
    ):
        hit = routed(gateway, question, model="deep")
        assert hit.headers["x-sipp-route"] == "answered"
        assert hit.headers["x-sipp-cache"] == "hit"
        assert hit.headers["x-sipp-cache-match"] == match
        assert answer(hit) == "deep answer"
    assert counts(providers) == before
    # near miss (0.78 with MiniLM: above 0.6, below the hit threshold 0.86): fast
    near = routed(gateway, "Forgot my password, what now?", model="deep")
    assert near.headers["x-sipp-route"] == "near-fast"
    assert near.headers["x-sipp-target"] == "fast"
    assert answer(near) == "fast answer"
    assert counts(providers) == {**before, "fast": before["fast"] + 1}
    # miss: deep answers (and its cache stores)
    miss = routed(gateway, "What is the boiling point of water at sea level?", model="deep")
    assert miss.headers["x-sipp-route"] == "miss-deep"
    assert miss.headers["x-sipp-target"] == "deep"
    assert answer(miss) == "deep answer"
    assert counts(providers) == {**before, "fast": before["fast"] + 1, "deep": before["deep"] + 1}
    assert decisions(gateway, "near-fast", "fast", "enforce") >= 1


def test_a_candidate_the_guard_rejects_is_a_near_miss(
    gateway: Gateway, providers: dict[str, LoopbackServer]
) -> None:
    """0.97 similar, above the hit threshold, but "on" vs "off": no hit, a near miss."""
    routed(gateway, "Turn on dark mode in the settings app", model="deep")
    poll(
        lambda: (
            routed(gateway, "Turn on dark mode in the settings app", model="deep").headers[
                "x-sipp-route"
            ]
            == "answered"
        ),
        "the answer stored",
        timeout=60,
    )
    before = counts(providers)
    flipped = routed(gateway, "Turn off dark mode in the settings app", model="deep")
    assert flipped.headers["x-sipp-route"] == "near-fast"
    assert counts(providers) == {**before, "fast": before["fast"] + 1}


# ------------------------------------------------------------------ failure, CORS, records
def test_a_failing_embedding_target_serves_normally_and_is_counted(
    gateway: Gateway, providers: dict[str, LoopbackServer]
) -> None:
    admin = httpx.Client(base_url=gateway.management, timeout=60)
    login = admin.post("/admin/api/session", json={"password": ENV["TEST_ADMIN_PASSWORD"]})
    csrf = {"x-sipp-admin-csrf": login.json()["csrf_token"]}
    body = {"target": "minilm"}
    failures = 'sipp_gateway_route_embedding_failures_total{route="account-fast"}'
    assert admin.post("/admin/api/controls/disable_target", json=body, headers=csrf).is_success
    try:
        before, counted = counts(providers), gateway.metric(failures)
        response = routed(gateway, "How can I reset my password please?")
        assert response.headers["x-sipp-route"] == "default"
        assert answer(response) == "general answer"
        assert counts(providers) == {**before, "general": before["general"] + 1}
        assert gateway.metric(failures) == counted + 1
    finally:
        admin.post("/admin/api/controls/enable_target", json=body, headers=csrf)
    again = routed(gateway, "How can I reset my password please?")
    assert again.headers["x-sipp-route"] == "account-fast"


def test_browsers_read_the_route_and_the_decision_is_recorded_and_logged(
    providers: dict[str, LoopbackServer], tmp_path: Path
) -> None:
    with semantic_gateway(tmp_path, providers) as gw:
        embeds = 'sipp_local_requests{target="minilm"}'
        assert gw.metric(embeds) == 0
        response = routed(
            gw,
            "How can I reset my password please?",
            extra_headers={"origin": ORIGIN, "x-request-id": "routesem-1"},
        )
        assert response.headers["x-sipp-route"] == "account-fast"
        exposed = response.headers["access-control-expose-headers"].lower()
        assert "x-sipp-route" in exposed
        admin = httpx.Client(base_url=gw.management, timeout=60)
        admin.post("/admin/api/session", json={"password": ENV["TEST_ADMIN_PASSWORD"]})
        recent = admin.get("/admin/api/metrics").json()["recent"]
        assert {
            "target": "fast",
            "caller": "team",
            "route": "account-fast",
            "code": None,
        }.items() <= recent[0].items()
        # the examples of weather-shadow and account-fast (2 each), then the question once
        assert gw.metric(embeds) == 5
        routed(gw, "What is the capital of France?")
        recent = admin.get("/admin/api/metrics").json()["recent"]
        assert (recent[0]["route"], recent[0]["target"]) == ("default", "general")
        assert gw.metric(embeds) == 5 + 2 + 1  # billing-deep's examples are new, the rest kept
        # every rule's examples kept; the question once, for the rules and deep's cache
        billing = routed(gw, "Where do I download my invoices?")
        assert billing.headers["x-sipp-route"] == "billing-deep"
        assert billing.headers["x-sipp-cache"] == "store"
        assert gw.metric(embeds) == 5 + 2 + 1 + 1
    lines = [json.loads(line) for line in gw.stderr.splitlines() if line.startswith("{")]
    decided = [
        json.loads(line["message"][len("route ") :])
        for line in lines
        if line["message"].startswith("route ")
    ]
    mine = [d for d in decided if d["request_id"] == "routesem-1" and d["mode"] == "enforce"]
    assert len(mine) == 1 and mine[0]["route"] == "account-fast" and mine[0]["target"] == "fast"
    assert 0.7 <= mine[0]["similarity"] <= 1


# ------------------------------------------------------------------ sipp-gateway check
BASE = HEAD.replace('targets = ["assistant"]', "targets = []")  # no rule matches it here
MINILM = EMBEDDER.format(path="/models/all-MiniLM-L6-v2.f16.gguf")
CACHED = """
[targets.cache]
path = "/tmp/sipp-check-cache"
"""


def test_check_accepts_the_new_fields(tmp_path: Path) -> None:
    code, out = check(
        tmp_path,
        BASE
        + CACHED
        + 'semantic = true\nembedding_target = "minilm"\n'
        + MINILM
        + """
[[route_rules]]
name = "hit"
match = "deep"
cache = "hit"
target = "deep"
[[route_rules]]
name = "near"
match = "deep"
cache = "near_miss"
cache_target = "deep"
near_miss_threshold = 0.6
target = "fast"
[[route_rules]]
name = "intent"
match = "fast"
examples = ["reset my password"]
examples_threshold = 0.8
examples_guard = false
embedding_target = "minilm"
target = "deep"
[[route_rules]]
name = "intent-default-embedder"
match = "fast"
examples = ["where are my invoices"]
target = "deep"
""",
    )
    assert code == 0, out


def test_check_names_every_bad_semantic_field(tmp_path: Path) -> None:
    code, out = check(
        tmp_path,
        BASE
        + CACHED
        + MINILM
        + """
[[route_rules]]
name = "a"
match = "deep"
cache = "near_miss"
target = "fast"
cache_target = "deep"
[[route_rules]]
name = "b"
match = "deep"
cache = "hit"
near_miss_threshold = 0.5
target = "deep"
[[route_rules]]
name = "c"
match = "fast"
examples = []
examples_threshold = 1.5
examples_guard = "yes"
embedding_target = "deep"
target = "deep"
[[route_rules]]
name = "d"
match = "fast"
examples = ["reset my password"]
target = "deep"
[[route_rules]]
name = "e"
match = "fast"
embedding_target = "minilm"
examples_threshold = 0.5
target = "deep"
[[route_rules]]
name = "f"
match = "fast"
examples = ["x"]
embedding_target = "nowhere"
target = "deep"
""",
    )
    assert code != 0
    for problem in (
        'route_rules[0].near_miss_threshold: is required with cache = "near_miss"',
        "route_rules[0].cache: \"near_miss\" needs a semantic cache: target 'deep' has an "
        "exact one only",
        'route_rules[1].near_miss_threshold: is only read with cache = "near_miss"',
        "route_rules[2].examples: must be a non-empty array of non-blank strings",
        "route_rules[2].examples_threshold: must be a number in (0, 1]",
        "route_rules[2].examples_guard: must be true or false",
        "route_rules[2].embedding_target: 'deep' is a openai_compatible target; it must be local",
        "route_rules[3].embedding_target: is required with examples: target 'deep' has no "
        "semantic cache",
        "route_rules[4].embedding_target: is only read with examples",
        "route_rules[4].examples_threshold: is only read with examples",
        "route_rules[5].embedding_target: no target named 'nowhere'",
    ):
        assert problem in out, (problem, out)


def test_check_wants_the_near_miss_threshold_below_the_hit_threshold(tmp_path: Path) -> None:
    code, out = check(
        tmp_path,
        BASE
        + CACHED
        + 'semantic = true\nembedding_target = "minilm"\nsimilarity_threshold = 0.8\n'
        + MINILM
        + """
[[route_rules]]
name = "near"
match = "deep"
cache = "near_miss"
near_miss_threshold = 0.8
cache_target = "deep"
target = "fast"
[[route_rules]]
name = "not-embedding"
match = "fast"
examples = ["x"]
embedding_target = "minilm-chat"
target = "deep"
"""
        + MINILM.replace('name = "minilm"', 'name = "minilm-chat"').replace(
            "embeddings = true\n", ""
        ),
    )
    assert code != 0
    assert (
        "route_rules[0].near_miss_threshold: must be below the similarity_threshold of target "
        "'deep''s cache (0.8)"
    ) in out, out
    assert "route_rules[1].embedding_target: 'minilm-chat' is not loaded for embeddings" in out
