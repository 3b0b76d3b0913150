"""`[[route_rules]]` on real `sipp-gateway serve` processes with two loopback providers,
"fast" and "deep": which one served shows in its call count and in `x-sipp-target`; the
rule that chose it in `x-sipp-route`, the JSON log and /metrics. Each condition, rule
order, shadow mode, the allowlist of a routed name, cache hits answering, the official
`openai` SDK, and bad configs through `sipp-gateway check`."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from ..ports import free_port
from ..remote.loopback import LoopbackServer
from .test_server import ENV, LIMITED, TOKEN, Gateway, serving
from .upstreams import poll, text_reply

OTHER = "other-caller-token"  # caller "other": may use "fast" only, not the routed name
ROUTES_ENV = {**ENV, "TEST_TOKEN_OTHER": OTHER}

RULES = """
[[route_rules]]
name = "json-deep"
match = "assistant"
has_json_schema = true
target = "deep"

[[route_rules]]
name = "tools-fast"
match = "assistant"
has_tools = true
target = "fast"

[[route_rules]]
name = "cached"
match = "assistant"
cache = "hit"
target = "deep"

[[route_rules]]
name = "shadow-long"
match = "assistant"
min_prompt_tokens = 50
mode = "shadow"
target = "fast"

[[route_rules]]
name = "free-fast"
match = "assistant"
callers = ["free"]
target = "fast"

[[route_rules]]
name = "short-fast"
match = "assistant"
max_prompt_tokens = 20
target = "fast"

[[route_rules]]
name = "rest-deep"
match = "assistant"
target = "deep"

[[route_rules]]
name = "fresh-fast"
match = "second"
cache = "miss"
cache_target = "deep"
target = "fast"

[[route_rules]]
name = "second-deep"
match = "second"
target = "deep"

[[route_rules]]
name = "shadow-tools"
match = "fast"
has_tools = true
mode = "shadow"
target = "deep"
"""


def config(directory: Path, fast: str, deep: str, public: int, management: int) -> str:
    return f"""
public_bind = "127.0.0.1:{public}"
management_bind = "127.0.0.1:{management}"
max_request_bytes = 65536
allowed_origins = []
admin_password_env = "TEST_ADMIN_PASSWORD"

[security.client_ip]
source = "peer"
trusted_proxy_cidrs = []

[security.rate_limit]
enabled = false

[routes]
readiness = "/readyz"
metrics = "/metrics"

[[tokens]]
env = "TEST_TOKEN_ALL"
caller = "team"
targets = []

[[tokens]]
env = "TEST_TOKEN_LOCAL"
caller = "free"
targets = ["assistant", "fast"]

[[tokens]]
env = "TEST_TOKEN_OTHER"
caller = "other"
targets = ["fast"]

[[targets]]
name = "fast"
type = "openai_compatible"
model = "fast-model"
base_url = "{fast}/v1"

[[targets]]
name = "deep"
type = "openai_compatible"
model = "deep-model"
base_url = "{deep}/v1"
[targets.cache]
path = "{directory / "cache"}"
{RULES}"""


@pytest.fixture(scope="module")
def fast() -> Iterator[LoopbackServer]:
    server = LoopbackServer(lambda req: text_reply(req, "fast answer"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def deep() -> Iterator[LoopbackServer]:
    server = LoopbackServer(lambda req: text_reply(req, "deep answer"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def gateway(
    fast: LoopbackServer, deep: LoopbackServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("routes")
    public, management = free_port(), free_port()
    path = directory / "gateway.toml"
    path.write_text(config(directory, fast.url, deep.url, public, management))
    with serving(
        path, ROUTES_ENV, public, management, timeout=60, secrets=ROUTES_ENV.values()
    ) as gw:
        yield gw


def ask(
    gw: Gateway,
    content: str,
    model: str = "assistant",
    token: str = TOKEN,
    extra_headers: dict[str, str] | None = None,
    **kw: Any,
) -> httpx.Response:
    """An OpenAI-compatible chat request for `model`."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 20,
        **kw,
    }
    headers = {"authorization": f"Bearer {token}", **(extra_headers or {})}
    return httpx.post(f"{gw.public}/v1/chat/completions", json=body, headers=headers, timeout=60)


def calls(server: LoopbackServer) -> int:
    return len(server.requests)


def decisions(gw: Gateway, route: str, target: str, mode: str) -> float:
    labels = f'{{mode="{mode}",route="{route}",target="{target}"}}'
    return gw.metric("sipp_gateway_route_decisions_total", labels)


TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
SCHEMA = {
    "type": "json_schema",
    "json_schema": {"name": "answer", "schema": {"type": "object"}},
}
LONG = "Please explain this at length. " * 10  # about 80 estimated prompt tokens


# ------------------------------------------------------------------ conditions and order
def test_short_prompt_goes_fast_long_prompt_goes_deep(
    gateway: Gateway, fast: LoopbackServer, deep: LoopbackServer
) -> None:
    before_fast, before_deep = calls(fast), calls(deep)
    short = ask(gateway, "hi")
    assert short.status_code == 200, short.text
    assert short.headers["x-sipp-route"] == "short-fast"
    assert short.headers["x-sipp-target"] == "fast"
    assert short.json()["choices"][0]["message"]["content"] == "fast answer"
    assert (calls(fast), calls(deep)) == (before_fast + 1, before_deep)
    long = ask(gateway, LONG)
    assert long.headers["x-sipp-route"] == "rest-deep"
    assert long.headers["x-sipp-target"] == "deep"
    assert long.json()["choices"][0]["message"]["content"] == "deep answer"
    assert (calls(fast), calls(deep)) == (before_fast + 1, before_deep + 1)
    assert decisions(gateway, "short-fast", "fast", "enforce") >= 1
    assert decisions(gateway, "rest-deep", "deep", "enforce") >= 1


def test_tools_and_json_schema_and_the_first_rule_wins(
    gateway: Gateway, fast: LoopbackServer, deep: LoopbackServer
) -> None:
    tools = ask(gateway, LONG, tools=TOOLS)
    assert tools.headers["x-sipp-route"] == "tools-fast"
    assert tools.headers["x-sipp-target"] == "fast"
    assert "tools" in fast.requests[-1].json()  # the tools reached the chosen target
    schema = ask(gateway, "hi", response_format=SCHEMA)
    assert schema.headers["x-sipp-route"] == "json-deep"
    assert schema.headers["x-sipp-target"] == "deep"
    assert deep.requests[-1].json()["response_format"]["type"] == "json_schema"
    # both conditions hold: the earlier rule (json-deep) takes it
    before = calls(deep)
    both = ask(gateway, "hi", tools=TOOLS, response_format=SCHEMA)
    assert both.headers["x-sipp-route"] == "json-deep"
    assert calls(deep) == before + 1
    # json_object is not a schema: the rule does not hold
    plain = ask(gateway, "hi", response_format={"type": "json_object"})
    assert plain.headers["x-sipp-route"] == "short-fast"


def test_caller_condition(gateway: Gateway, fast: LoopbackServer, deep: LoopbackServer) -> None:
    before = calls(fast), calls(deep)
    free = ask(gateway, LONG, token=LIMITED)  # caller "free": its rule comes before rest-deep
    assert free.status_code == 200, free.text
    assert free.headers["x-sipp-route"] == "free-fast"
    assert free.headers["x-sipp-target"] == "fast"
    team = ask(gateway, LONG + "team")
    assert team.headers["x-sipp-route"] == "rest-deep"
    assert (calls(fast), calls(deep)) == (before[0] + 1, before[1] + 1)


def test_shadow_rule_is_counted_and_never_acted_on(
    gateway: Gateway, fast: LoopbackServer, deep: LoopbackServer
) -> None:
    shadow_before = decisions(gateway, "shadow-tools", "deep", "shadow")
    default_before = decisions(gateway, "default", "fast", "enforce")
    before = calls(fast), calls(deep)
    response = ask(gateway, "use a tool", model="fast", tools=TOOLS)
    assert response.status_code == 200, response.text
    assert response.headers["x-sipp-route"] == "default"  # "fast" serves itself
    assert response.headers["x-sipp-target"] == "fast"
    assert (calls(fast), calls(deep)) == (before[0] + 1, before[1])
    assert decisions(gateway, "shadow-tools", "deep", "shadow") == shadow_before + 1
    assert decisions(gateway, "default", "fast", "enforce") == default_before + 1
    # no tools: the shadow rule does not hold, nothing is counted for it
    ask(gateway, "no tool", model="fast")
    assert decisions(gateway, "shadow-tools", "deep", "shadow") == shadow_before + 1
    # a shadow rule in the middle of a routed name's rules: counted, then the next rules run
    long_before = decisions(gateway, "shadow-long", "fast", "shadow")
    routed = ask(gateway, LONG + "shadowed")
    assert routed.headers["x-sipp-route"] == "rest-deep"
    assert routed.headers["x-sipp-target"] == "deep"
    assert decisions(gateway, "shadow-long", "fast", "shadow") == long_before + 1


def test_unrouted_target_has_no_route_header(gateway: Gateway) -> None:
    response = ask(gateway, "direct", model="deep")
    assert response.status_code == 200
    assert "x-sipp-route" not in response.headers


# ------------------------------------------------------------------ allowlists
def test_caller_needs_the_name_and_the_target_chosen(
    gateway: Gateway, fast: LoopbackServer, deep: LoopbackServer
) -> None:
    before = calls(fast), calls(deep)
    # "free" may use "assistant" and "fast": a rule choosing "deep" is refused
    refused = ask(gateway, "hi", token=LIMITED, response_format=SCHEMA)
    assert refused.status_code == 403, refused.text
    assert refused.headers["x-sipp-route"] == "json-deep"
    # "other" may use "fast" only: asking for "assistant" is refused, even though the
    # rule would have chosen "fast"
    other = ask(gateway, "hi", token=OTHER)
    assert other.status_code == 403
    assert "x-sipp-route" not in other.headers
    assert (calls(fast), calls(deep)) == before  # no provider saw either
    allowed = ask(gateway, "hi", model="fast", token=OTHER)
    assert allowed.status_code == 200


def test_unknown_name_is_still_404(gateway: Gateway) -> None:
    response = ask(gateway, "hi", model="nobody")
    assert response.status_code == 404
    assert "x-sipp-route" not in response.headers


# ------------------------------------------------------------------ cache state
def test_cache_hit_rule_answers_from_the_deep_cache(
    gateway: Gateway, deep: LoopbackServer, fast: LoopbackServer
) -> None:
    question = LONG + "cache me"
    first = ask(gateway, question, temperature=0)
    assert first.headers["x-sipp-route"] == "rest-deep"
    assert first.headers["x-sipp-cache"] == "store"
    poll(
        lambda: ask(gateway, question, temperature=0).headers["x-sipp-route"] == "cached",
        "the deep answer stored",
    )
    before = calls(deep), calls(fast)
    hit = ask(gateway, question, temperature=0)
    assert hit.headers["x-sipp-route"] == "cached"
    assert hit.headers["x-sipp-cache"] == "hit"
    assert hit.json()["choices"][0]["message"]["content"] == "deep answer"
    assert (calls(deep), calls(fast)) == before  # answered by neither provider
    looked = gateway.metric(
        "sipp_gateway_cache_requests_total",
        '{result="hit",route="/v1/chat/completions",target="deep"}',
    )
    again = ask(gateway, question, temperature=0)
    assert again.headers["x-sipp-cache"] == "hit"
    after = gateway.metric(
        "sipp_gateway_cache_requests_total",
        '{result="hit",route="/v1/chat/completions",target="deep"}',
    )
    assert after == looked + 1  # one lookup per request: the cache stage reused the route's
    streamed = ask(gateway, question, temperature=0, stream=True)
    assert streamed.headers["x-sipp-route"] == "cached"
    assert streamed.headers["x-sipp-cache"] == "hit"
    deltas = [
        json.loads(line[6:])["choices"]
        for line in streamed.text.splitlines()
        if line.startswith("data: {")
    ]
    assert "".join(c[0]["delta"].get("content") or "" for c in deltas if c) == "deep answer"
    # the caller skips the lookup: not a hit, so the rule does not hold; deep runs it
    skipped = ask(gateway, question, temperature=0, extra_headers={"cache-control": "no-cache"})
    assert skipped.headers["x-sipp-route"] == "rest-deep"
    assert skipped.headers["x-sipp-cache"] == "store"  # looked up no, stored yes
    assert (calls(deep), calls(fast)) == (before[0] + 1, before[1])


def test_cache_miss_rule_looks_in_another_targets_cache(
    gateway: Gateway, deep: LoopbackServer, fast: LoopbackServer
) -> None:
    question = "second opinion"
    miss = ask(gateway, question, model="second", temperature=0)
    assert miss.headers["x-sipp-route"] == "fresh-fast"  # deep has not answered it
    assert miss.headers["x-sipp-target"] == "fast"
    direct = ask(gateway, question, model="deep", temperature=0)  # deep answers and stores
    assert direct.headers["x-sipp-cache"] == "store"
    poll(
        lambda: (
            ask(gateway, question, model="second", temperature=0).headers["x-sipp-route"]
            == "second-deep"
        ),
        "deep's answer stored",
    )
    before = calls(deep), calls(fast)
    hit = ask(gateway, question, model="second", temperature=0)
    assert hit.headers["x-sipp-route"] == "second-deep"
    assert hit.headers["x-sipp-cache"] == "hit"
    assert (calls(deep), calls(fast)) == before


# ------------------------------------------------------------------ SDK, stream, log
def test_openai_sdk_json_and_stream(
    gateway: Gateway, fast: LoopbackServer, deep: LoopbackServer
) -> None:
    client = openai.OpenAI(base_url=gateway.public + "/v1", api_key=TOKEN, max_retries=0)
    before = calls(fast), calls(deep)
    raw = client.chat.completions.with_raw_response.create(
        model="assistant", messages=[{"role": "user", "content": "hi"}], max_tokens=20
    )
    assert raw.headers["x-sipp-route"] == "short-fast"
    assert raw.parse().choices[0].message.content == "fast answer"
    with client.chat.completions.with_streaming_response.create(
        model="assistant",
        messages=[{"role": "user", "content": LONG}],
        max_tokens=20,
        stream=True,
    ) as response:
        assert response.headers["x-sipp-route"] == "rest-deep"
        assert response.headers["x-sipp-target"] == "deep"
        chunks = list(response.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "deep answer"
    assert (calls(fast), calls(deep)) == (before[0] + 1, before[1] + 1)
    client.close()


def test_native_route_and_the_decision_in_the_log(
    fast: LoopbackServer, deep: LoopbackServer, tmp_path: Path
) -> None:
    public, management = free_port(), free_port()
    path = tmp_path / "gateway.toml"
    path.write_text(config(tmp_path, fast.url, deep.url, public, management))
    gw = Gateway(path, ROUTES_ENV, public, management)
    try:
        gw.wait_ready(timeout=60)
        body = {"model": "assistant", "messages": [{"role": "user", "content": "hi"}]}
        headers = {"authorization": f"Bearer {TOKEN}", "x-request-id": "route-log-1"}
        native = httpx.post(f"{gw.public}/v1/chat", json=body, headers=headers, timeout=60)
        assert native.status_code == 200, native.text
        assert native.headers["x-sipp-route"] == "short-fast"
        assert native.json()["text"] == "fast answer"
    finally:
        code, err = gw.stop()
    assert code == 0, err
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    routed = [
        json.loads(line["message"][len("route ") :])
        for line in lines
        if line["message"].startswith("route ")
    ]
    assert {
        "request_id": "route-log-1",
        "caller": "team",
        "model": "assistant",
        "route": "short-fast",
        "target": "fast",
        "mode": "enforce",
    } in routed


# ------------------------------------------------------------------ sipp-gateway check
HEAD = """
public_bind = "127.0.0.1:18080"
management_bind = "127.0.0.1:19090"
admin_password_env = "ADMIN"
[security.client_ip]
source = "peer"
[security.rate_limit]
enabled = false
[[tokens]]
env = "TOKEN_A"
caller = "team"
targets = ["assistant"]
[[targets]]
name = "fast"
type = "openai_compatible"
model = "m"
base_url = "http://127.0.0.1:1/v1"
[[targets]]
name = "deep"
type = "openai_compatible"
model = "m"
base_url = "http://127.0.0.1:1/v1"
"""


def check(tmp_path: Path, text: str) -> tuple[int, str]:
    path = tmp_path / "check.toml"
    path.write_text(text)
    done = subprocess.run(
        [sys.executable, "-m", "sipp.cli.gateway", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, done.stdout + done.stderr


def test_check_accepts_good_rules(tmp_path: Path) -> None:
    code, out = check(
        tmp_path,
        HEAD
        + """
[[route_rules]]
name = "short"
match = "assistant"
max_prompt_tokens = 100
target = "fast"
[[route_rules]]
name = "rest"
match = "assistant"
target = "deep"
""",
    )
    assert code == 0, out


def test_check_names_every_bad_rule(tmp_path: Path) -> None:
    code, out = check(
        tmp_path,
        HEAD
        + """
[[route_rules]]
name = "a"
match = "assistant"
target = "nowhere"
colour = "red"
[[route_rules]]
name = "b"
match = "assistant"
min_prompt_tokens = 500
max_prompt_tokens = 100
has_tools = "yes"
target = "fast"
[[route_rules]]
name = "c"
match = "assistant"
callers = ["ghost"]
mode = "loud"
target = "fast"
[[route_rules]]
name = "d"
match = "assistant"
cache = "hit"
target = "deep"
[[route_rules]]
name = "d"
match = "orphan"
has_json_schema = true
target = "fast"
[[route_rules]]
name = "e"
match = "fast"
target = "deep"
[[route_rules]]
name = "f"
match = "fast"
has_tools = true
target = "deep"
""",
    )
    assert code != 0
    for problem in (
        "route_rules[0].target: references unknown target 'nowhere'",
        "route_rules[0].colour: unknown field",
        "route_rules[1].min_prompt_tokens: is above max_prompt_tokens (100): never matches",
        "route_rules[1].has_tools: must be true or false",
        "route_rules[2].callers[0]: no [[tokens]] has caller 'ghost': never matches",
        "route_rules[2].mode: must be one of enforce, shadow",
        "route_rules[3].cache: looks in the cache of target 'deep', which has none",
        "route_rules[4].name: duplicates another rule named 'd'",
        "route_rules[4]: 'orphan' is not a target: end its rules with an enforced one",
        "route_rules[6]: comes after route_rules[5], which takes every request for 'fast'",
    ):
        assert problem in out, (problem, out)


def test_check_refuses_rules_written_as_routes(tmp_path: Path) -> None:
    code, out = check(
        tmp_path,
        HEAD + '\n[[routes]]\nname = "a"\nmatch = "assistant"\ntarget = "fast"\n',
    )
    assert code != 0
    assert "routes: is the table of paths; routing rules are [[route_rules]]" in out
