"""The exact cache's pieces on their own: keys, the entry codec, the SQLite store, and
`[targets.cache]` parsing (the `serve` tests are in test_cache_gateway.py)."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sipp import ChatMessage, FunctionTool, SippTextOptions
from sipp._types import SippTextResponse, TokenBatch, TokenLogprob, ToolCall, TopLogprob, Usage
from sipp.gateway.cache.config import CacheConfig
from sipp.gateway.cache.entry import (
    CachedChoice,
    CachedEntry,
    decode_entry,
    encode_entry,
    replay_events,
)
from sipp.gateway.cache.keys import IGNORED, exact_key, last_user_text, partition_key
from sipp.gateway.cache.sqlite_store import SqliteStore, store_file
from sipp.gateway.config import ConfigError, parse_config
from sipp.gateway.request import (
    ChoiceDone,
    GatewayRequest,
    Generation,
    ImageURL,
    ResponseFormat,
    TextDelta,
    UsageTotal,
)

from .test_config import BASE

MESSAGES = (ChatMessage("system", "Be brief."), ChatMessage("user", "Name a colour."))
BASE_REQ = GatewayRequest("chat", "remote", messages=MESSAGES)
TOOL = FunctionTool(name="lookup", parameters={"type": "object", "properties": {}})


# ------------------------------------------------------------------ keys
# One change per field that reaches the target: each must give another key.
CHANGES: dict[str, GatewayRequest] = {
    "operation": dataclasses.replace(BASE_REQ, operation="query", messages=None, prompt="x"),
    "target": dataclasses.replace(BASE_REQ, target="other"),
    "system prompt": dataclasses.replace(
        BASE_REQ, messages=(ChatMessage("system", "Be long."), MESSAGES[1])
    ),
    "last message": dataclasses.replace(
        BASE_REQ, messages=(MESSAGES[0], ChatMessage("user", "Name a colour!"))
    ),
    "no system prompt": dataclasses.replace(BASE_REQ, messages=(MESSAGES[1],)),
    "role": dataclasses.replace(BASE_REQ, messages=(ChatMessage("user", "Be brief."), MESSAGES[1])),
    "max_tokens": dataclasses.replace(BASE_REQ, options=SippTextOptions(max_tokens=5)),
    "temperature": dataclasses.replace(BASE_REQ, options=SippTextOptions(temperature=0.0)),
    "top_p": dataclasses.replace(BASE_REQ, options=SippTextOptions(top_p=0.5)),
    "stop": dataclasses.replace(BASE_REQ, options=SippTextOptions(stop=["\n"])),
    "tools": dataclasses.replace(BASE_REQ, options=SippTextOptions(tools=[TOOL])),
    "tool_choice": dataclasses.replace(
        BASE_REQ, options=SippTextOptions(tools=[TOOL], tool_choice="required")
    ),
    "parallel_tool_calls": dataclasses.replace(
        BASE_REQ, options=SippTextOptions(tools=[TOOL], parallel_tool_calls=False)
    ),
    "n": dataclasses.replace(BASE_REQ, generation=Generation(n=2)),
    "seed": dataclasses.replace(BASE_REQ, generation=Generation(seed=7)),
    "top_k": dataclasses.replace(BASE_REQ, generation=Generation(top_k=4)),
    "logit_bias": dataclasses.replace(BASE_REQ, generation=Generation(logit_bias={5: 1.0})),
    "presence_penalty": dataclasses.replace(BASE_REQ, generation=Generation(presence_penalty=0.5)),
    "frequency_penalty": dataclasses.replace(
        BASE_REQ, generation=Generation(frequency_penalty=0.5)
    ),
    "response_format": dataclasses.replace(
        BASE_REQ, generation=Generation(response_format=ResponseFormat("json_object"))
    ),
    "schema": dataclasses.replace(
        BASE_REQ,
        generation=Generation(
            response_format=ResponseFormat("json_schema", {"type": "object"}, name="a")
        ),
    ),
    "logprobs": dataclasses.replace(BASE_REQ, generation=Generation(logprobs=True)),
    "top_logprobs": dataclasses.replace(
        BASE_REQ, generation=Generation(logprobs=True, top_logprobs=2)
    ),
}


def test_changing_any_one_parameter_changes_the_key() -> None:
    keys = {name: exact_key("team", req) for name, req in CHANGES.items()}
    base = exact_key("team", BASE_REQ)
    assert base not in keys.values()
    assert len(set(keys.values())) == len(keys)  # and no two changes collide either


def test_every_request_field_is_hashed_or_named_as_ignored() -> None:
    """A field added to GatewayRequest, SippTextOptions or Generation is in the key unless
    someone decides otherwise here: `keys` hashes every field not in IGNORED."""
    names = {f.name for f in dataclasses.fields(GatewayRequest)}
    assert names >= IGNORED
    changed = {
        "prompt": dataclasses.replace(BASE_REQ, prompt="p"),
        "inputs": dataclasses.replace(BASE_REQ, inputs=("a",)),
        "single_input": dataclasses.replace(BASE_REQ, single_input=True),
        # http(s) images a target fetches: their URLs (fetched ones are in `messages`)
        "image_urls": dataclasses.replace(
            BASE_REQ, image_urls=(ImageURL(1, 0, "https://images.example/cat.png"),)
        ),
    }
    covered = {"operation", "target", "messages", "options", "generation", *changed}
    assert names - IGNORED == covered, "a new GatewayRequest field: is it part of the answer?"
    for req in changed.values():
        assert exact_key("team", req) != exact_key("team", BASE_REQ)


def test_an_image_is_keyed_by_its_bytes() -> None:
    def asking(image: bytes) -> GatewayRequest:
        user = ChatMessage("user", "What is this?", images=(image,))
        return dataclasses.replace(BASE_REQ, messages=(MESSAGES[0], user))

    png = b"\x89PNG\r\n\x1a\n" + bytes(64)
    assert exact_key("team", asking(png)) == exact_key("team", asking(bytes(png)))
    assert exact_key("team", asking(png)) != exact_key("team", asking(png + b"\x00"))
    assert exact_key("team", asking(png)) != exact_key("team", BASE_REQ)


def test_what_only_frames_the_answer_keeps_the_key() -> None:
    same = dataclasses.replace(
        BASE_REQ,
        stream=True,
        include_usage=True,
        user="u-1",
        metadata={"a": "b"},
        wire={"echo": {"x": 1}},
    )
    assert exact_key("team", same) == exact_key("team", BASE_REQ)


def test_scope_separates_callers() -> None:
    assert exact_key("team", BASE_REQ) != exact_key("free", BASE_REQ)
    assert exact_key("shared", BASE_REQ) != exact_key("team", BASE_REQ)


def test_partition_key_ignores_the_last_user_message_only() -> None:
    other_question = CHANGES["last message"]
    assert partition_key("team", other_question) == partition_key("team", BASE_REQ)
    assert last_user_text(other_question) == "Name a colour!"
    for name in ("system prompt", "max_tokens", "tools", "target"):
        assert partition_key("team", CHANGES[name]) != partition_key("team", BASE_REQ), name
    assert partition_key("free", BASE_REQ) != partition_key("team", BASE_REQ)
    query = GatewayRequest("query", "remote", prompt="one")
    assert partition_key("t", query) == partition_key("t", dataclasses.replace(query, prompt="two"))
    assert last_user_text(query) == "one"


# ------------------------------------------------------------------ entries
LOGPROB = TokenLogprob("Hi", (72, 105), -0.25, (TopLogprob("Hi", (72, 105), -0.25),))


def test_an_entry_round_trips_through_its_bytes() -> None:
    streamed = CachedChoice(
        SippTextResponse("Hi", "stop", Usage(3, 1, 4), logprobs=(LOGPROB,), stop_sequence="\n"),
        (TokenBatch("H", (1,), 0, (LOGPROB,)), TokenBatch("i", (2,))),
    )
    called = CachedChoice(
        SippTextResponse(
            "", "tool_calls", Usage(3, 5, 8), tool_calls=(ToolCall("c1", "lookup", '{"q":1}'),)
        )
    )
    entry = CachedEntry((streamed, called))
    assert decode_entry(encode_entry(entry)) == entry
    assert decode_entry(b'{"v": 0, "choices": []}') is None  # another layout: a miss


def test_replay_streams_pieces_and_tool_calls_not_one_blob() -> None:
    answer = SippTextResponse(
        "The sky is blue.",
        "tool_calls",
        Usage(5, 6, 11),
        tool_calls=(ToolCall("c1", "lookup", '{"q":1}'),),
    )
    events = list(replay_events(CachedEntry((CachedChoice(answer),))))
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert "".join(d.batch.text for d in deltas) == "The sky is blue."
    assert len([d for d in deltas if d.batch.text]) == 4
    calls = [c for d in deltas for c in d.batch.tool_calls]
    assert calls[0].id == "c1" and calls[0].name == "lookup"
    assert "".join(c.arguments for c in calls) == '{"q":1}'
    assert isinstance(events[-2], ChoiceDone) and events[-2].response == answer
    assert events[-1] == UsageTotal(Usage(5, 6, 11))


# ------------------------------------------------------------------ SQLite store
class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _store(path: Path, clock: Clock, entries: int = 100, size: int = 1 << 20) -> SqliteStore:
    store = SqliteStore(path, entries, size, clock)
    store.open()
    return store


def test_sqlite_ttl_is_absolute_and_a_hit_never_extends_it(tmp_path: Path) -> None:
    clock = Clock()

    async def run() -> None:
        store = _store(tmp_path / "t.sqlite3", clock)
        await store.put("k", b"v", 10)
        clock.now += 9
        assert await store.get("k") == b"v"  # a hit at 9 s ...
        clock.now += 1.5
        assert await store.get("k") is None  # ... and gone at 10.5 s all the same
        assert (await store.put("other", b"w", 10)).entries == 1  # a store swept it
        await store.close()

    asyncio.run(run())


def test_sqlite_evicts_least_recently_used_by_entries_and_bytes(tmp_path: Path) -> None:
    clock = Clock()

    async def run() -> None:
        store = _store(tmp_path / "t.sqlite3", clock, entries=3, size=100)
        for key in "abc":
            clock.now += 1
            await store.put(key, b"x" * 10, 60)
        clock.now += 1
        assert await store.get("a") == b"x" * 10  # now b is the least recently used
        clock.now += 1
        totals = await store.put("d", b"x" * 10, 60)
        assert totals.entries == 3 and totals.bytes == 30
        assert await store.get("b") is None
        assert all([await store.get(k) for k in "acd"])
        clock.now += 1
        totals = await store.put("e", b"y" * 85, 60)  # 115 bytes: two must go, c then a
        assert totals.entries == 2 and totals.bytes == 95
        assert await store.get("c") is None and await store.get("a") is None
        assert await store.get("e") == b"y" * 85
        assert (await store.put("huge", b"z" * 101, 60)).bytes == 95  # over the cap: not kept
        assert await store.get("huge") is None
        await store.close()

    asyncio.run(run())


def test_sqlite_is_wal_and_survives_reopening(tmp_path: Path) -> None:
    clock = Clock()
    path = store_file(tmp_path / "cache", "a/b target")
    assert path.parent == tmp_path / "cache" and "/" not in path.name

    async def write() -> None:
        store = _store(path, clock)
        await store.put("k", b"kept", 60)
        await store.close()

    async def read() -> bytes | None:
        store = _store(path, clock)
        try:
            assert (await store.totals()).entries == 1
            return await store.get("k")
        finally:
            await store.close()

    asyncio.run(write())
    assert asyncio.run(read()) == b"kept"
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# ------------------------------------------------------------------ config
def _config(cache: Any, state: dict[str, Any] | None = None) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    data["targets"][0]["cache"] = cache
    if state is not None:
        data["state"] = state
    return data


def test_cache_table_parses_with_defaults() -> None:
    target = parse_config(_config({"path": "/var/cache/sipp"})).targets[0]
    assert target.cache == CacheConfig(path=Path("/var/cache/sipp"))
    assert parse_config(_config({"enabled": False, "path": "/x"})).targets[0].cache is None
    assert parse_config(BASE).targets[0].cache is None
    full = {
        "backend": "redis",
        "ttl_seconds": 5,
        "max_entries": 7,
        "max_bytes": 1000,
        "scope": "shared",
        "store_finish": ["stop", "length", "tool_calls"],
        "cache_sampled": True,
    }
    state = {"backend": "redis", "url_env": "REDIS_URL"}
    cache = parse_config(_config(full, state)).targets[0].cache
    assert cache == CacheConfig(
        "redis", None, 5, 7, 1000, "shared", frozenset({"stop", "length", "tool_calls"}), True
    )


@pytest.mark.parametrize(
    ("cache", "problem"),
    [
        ({"path": "/x", "ttl": 5}, "targets[0].cache.ttl: unknown field"),
        ({}, "targets[0].cache.path: is required"),
        ({"path": "/x", "ttl_seconds": 0}, "targets[0].cache.ttl_seconds: must be greater"),
        ({"path": "/x", "max_entries": "9"}, "targets[0].cache.max_entries: must be an integer"),
        ({"path": "/x", "scope": "everyone"}, "targets[0].cache.scope: must be one of"),
        ({"path": "/x", "store_finish": ["error"]}, "targets[0].cache.store_finish: must be"),
        ({"path": "/x", "store_finish": []}, "targets[0].cache.store_finish: must be"),
        ({"path": "/x", "cache_sampled": 1}, "targets[0].cache.cache_sampled: must be true"),
        ({"path": "/x", "backend": "disk"}, "targets[0].cache.backend: must be one of"),
        ({"backend": "redis"}, 'targets[0].cache.backend: "redis" uses the [state] Redis'),
        ("yes", "targets[0].cache: must be a table"),
    ],
)
def test_cache_table_errors_name_their_path(cache: Any, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_config(cache))
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems


def test_check_cli_names_a_bad_cache_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        """
public_bind = "127.0.0.1:8080"
management_bind = "127.0.0.1:9090"
admin_password_env = "ADMIN"
[security.client_ip]
source = "peer"
[security.rate_limit]
enabled = false
[[targets]]
name = "remote"
type = "openai_compatible"
model = "m"
base_url = "http://127.0.0.1:1/v1"
[targets.cache]
path = "cache"
ttl_seconds = -1
"""
    )
    done = subprocess.run(
        [sys.executable, "-m", "sipp.cli.gateway", "check", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "targets[0].cache.ttl_seconds: must be greater than zero" in done.stderr + done.stdout


# ------------------------------------------------------------------ stage decisions
def _call(config: CacheConfig, req: GatewayRequest, control: str = "", caller: str = "team") -> Any:
    from sipp.gateway.cache.exact import ExactCache
    from sipp.gateway.metrics import GatewayMetrics

    cache = ExactCache("remote", config, None, GatewayMetrics(dict))  # type: ignore[arg-type]
    return cache.begin(req, caller, {"cache-control": control} if control else {}, "/v1/chat")


GREEDY = dataclasses.replace(BASE_REQ, options=SippTextOptions(temperature=0))


def test_stage_decides_what_is_looked_up_and_stored() -> None:
    config = CacheConfig(path=Path("/unused"))
    plain = _call(config, GREEDY)
    assert (plain.look, plain.store, plain.status) == (True, True, "bypass")  # until lookup
    for sampled in (
        BASE_REQ,
        dataclasses.replace(BASE_REQ, options=SippTextOptions(temperature=0.2)),
    ):
        call = _call(config, sampled)
        assert (call.look, call.store, call.key) == (False, False, None)
        allowed = _call(dataclasses.replace(config, cache_sampled=True), sampled)
        assert allowed.look and allowed.store
    fresh = _call(config, GREEDY, "max-age=0, No-Cache")
    assert (fresh.look, fresh.store) == (False, True)
    kept_out = _call(config, GREEDY, "no-store")
    assert (kept_out.look, kept_out.store) == (True, False)
    embed = _call(config, GatewayRequest("embed", "remote", inputs=("x",)))
    assert (embed.look, embed.store) == (False, False)
    assert _call(config, GREEDY).key != _call(config, GREEDY, caller="free").key
    shared = dataclasses.replace(config, scope="shared")
    assert _call(shared, GREEDY).key == _call(shared, GREEDY, caller="free").key
