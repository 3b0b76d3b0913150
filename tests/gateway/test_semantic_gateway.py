"""The semantic cache wired into real `sipp-gateway serve` processes: a local
all-MiniLM-L6-v2 target embeds each question, a loopback provider counts its calls (a
hit makes none). Paraphrases hit; negations, antonyms and changed numbers, another
caller or another system prompt never do; a failing embedding target serves uncached;
the SQLite backend keeps the vectors across a restart (a crash and Redis replicas:
test_semantic_durable.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import tomllib

from sipp import models
from sipp.gateway.config import ConfigError, parse_config

from .limited_gateways import FREE, toml
from .test_cache_gateway import (
    TOKEN,
    Provider,
    cached_gateway,
    chat,
    sqlite_cache,
    sse_data,
    upstream,
)
from .test_server import ENV, Gateway
from .upstreams import poll

__all__ = ["upstream"]  # the module-scoped provider fixture

TARGET = '{target="remote"}'
EMBEDDER = """
[[targets]]
name = "minilm"
type = "local"
model = "{path}"
backend = "cpu"
[targets.runtime.context]
n_ctx = 128
n_parallel = 2
n_threads = 1
embeddings = true
pooling = "mean"
"""


def semantic(extra: str = "", embedder: str = "minilm") -> str:
    """`[targets.cache]` lines turning the semantic cache on, then the embedding target."""
    path = models.pull("all-minilm-l6-v2", verify=False)
    return (
        f'semantic = true\nembedding_target = "{embedder}"\n{extra}\n{EMBEDDER.format(path=path)}'
    )


def indexed(gw: Gateway, count: int) -> None:
    """Wait until the semantic index holds `count` questions (stores run in the background)."""
    metric = "sipp_gateway_cache_semantic_entries"
    poll(lambda: gw.metric(metric, TARGET) == count, f"{count} questions indexed", timeout=60)


def ask(gw: Gateway, question: str, **kw: Any) -> httpx.Response:
    r = chat(gw, question, **kw)
    assert r.status_code == 200, r.text
    return r


def with_system(gw: Gateway, system: str, question: str) -> httpx.Response:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return ask(gw, question, messages=messages)


@pytest.fixture(scope="module")
def gateway(upstream: Provider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("semantic")
    with cached_gateway(directory, upstream, sqlite_cache(directory, semantic())) as gw:
        yield gw


def test_a_paraphrase_is_answered_from_the_cache(gateway: Gateway, upstream: Provider) -> None:
    indexed_before = gateway.metric("sipp_gateway_cache_semantic_entries", TARGET)
    assert ask(gateway, "How do I reset my password?").headers["x-sipp-cache"] == "store"
    indexed(gateway, indexed_before + 1)
    calls = upstream.calls()
    exact = ask(gateway, "How do I reset my password?")
    assert exact.headers["x-sipp-cache"] == "hit"
    assert exact.headers["x-sipp-cache-match"] == "exact"
    hit = ask(gateway, "How can I reset my password?")
    assert hit.headers["x-sipp-cache"] == "hit"
    assert hit.headers["x-sipp-cache-match"] == "semantic"
    assert hit.json()["text"] == "The sky is blue."
    # streamed, through the OpenAI-compatible route and the official SDK
    with openai.OpenAI(base_url=gateway.public + "/v1", api_key=TOKEN) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="remote",
            messages=[{"role": "user", "content": "What is the way to reset my password?"}],
            temperature=0,
            max_tokens=50,
            stream=True,
        )
        assert raw.headers["x-sipp-cache"] == "hit"
        assert raw.headers["x-sipp-cache-match"] == "semantic"
        pieces = [c.choices[0].delta.content for c in raw.parse() if c.choices]
    assert "".join(p for p in pieces if p) == "The sky is blue." and len(pieces) > 2
    assert upstream.calls() == calls
    assert gateway.metric("sipp_gateway_cache_semantic_hits_total", TARGET) >= 2
    assert gateway.metric("sipp_gateway_cache_embedding_seconds_count", TARGET) >= 3
    native = httpx.post(
        f"{gateway.public}/v1/chat",
        json={
            "model": "remote",
            "messages": [{"role": "user", "content": "How can I reset my password?"}],
            "max_tokens": 50,
            "temperature": 0,
            "stream": True,
        },
        headers={"authorization": f"Bearer {TOKEN}"},
        timeout=60,
    )
    assert native.headers["x-sipp-cache-match"] == "semantic" and len(sse_data(native.text)) > 2


@pytest.mark.parametrize(
    ("cached", "changed"),
    [
        ("Is the museum open on Sunday?", "Is the museum not open on Sunday?"),
        ("Turn on dark mode in the settings app", "Turn off dark mode in the settings app"),
        ("Book a table for 2 people tonight", "Book a table for 3 people tonight"),
    ],
)
def test_a_changed_meaning_never_hits(
    gateway: Gateway, upstream: Provider, cached: str, changed: str
) -> None:
    """Each pair scores above the threshold (0.95 to 0.97 with MiniLM): the guard decides."""
    count = gateway.metric("sipp_gateway_cache_semantic_entries", TARGET)
    ask(gateway, cached)
    indexed(gateway, count + 1)
    rejected = gateway.metric("sipp_gateway_cache_guard_rejections_total", TARGET)
    calls = upstream.calls()
    again = ask(gateway, changed)
    assert again.headers["x-sipp-cache"] == "store" and upstream.calls() == calls + 1
    assert gateway.metric("sipp_gateway_cache_guard_rejections_total", TARGET) > rejected


def test_another_caller_or_system_prompt_never_hits(gateway: Gateway, upstream: Provider) -> None:
    count = gateway.metric("sipp_gateway_cache_semantic_entries", TARGET)
    with_system(gateway, "You answer in French.", "What is the capital city of France?")
    indexed(gateway, count + 1)
    calls = upstream.calls()
    # the paraphrase hits in its own partition ...
    same = with_system(gateway, "You answer in French.", "What's the capital city of France?")
    assert same.headers["x-sipp-cache-match"] == "semantic" and upstream.calls() == calls
    # ... never under another system prompt, nor for another caller
    other = with_system(gateway, "You answer in German.", "What's the capital city of France?")
    assert other.headers["x-sipp-cache"] == "store" and upstream.calls() == calls + 1
    messages = [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "What's the capital city of France?"},
    ]
    free = ask(gateway, "", token=FREE, messages=messages)
    assert free.headers["x-sipp-cache"] == "store" and upstream.calls() == calls + 2


def test_a_failing_embedding_target_serves_uncached(gateway: Gateway, upstream: Provider) -> None:
    count = gateway.metric("sipp_gateway_cache_semantic_entries", TARGET)
    ask(gateway, "Where can I download my invoices?")
    indexed(gateway, count + 1)
    admin = httpx.Client(base_url=gateway.management, timeout=60)
    login = admin.post("/admin/api/session", json={"password": ENV["TEST_ADMIN_PASSWORD"]})
    csrf = {"x-sipp-admin-csrf": login.json()["csrf_token"]}
    body = {"target": "minilm"}
    assert admin.post("/admin/api/controls/disable_target", json=body, headers=csrf).is_success
    try:
        failures = gateway.metric("sipp_gateway_cache_embedding_failures_total", TARGET)
        calls = upstream.calls()
        for _ in range(2):  # not stored either: the second one goes upstream again
            r = ask(gateway, "Where do I download my invoices?")
            assert r.headers["x-sipp-cache"] == "bypass" and r.json()["text"] == "The sky is blue."
        assert upstream.calls() == calls + 2
        assert gateway.metric("sipp_gateway_cache_embedding_failures_total", TARGET) == failures + 2
        # an exact hit needs no embedding
        assert ask(gateway, "Where can I download my invoices?").headers["x-sipp-cache"] == "hit"
    finally:
        admin.post("/admin/api/controls/enable_target", json=body, headers=csrf)
    hit = ask(gateway, "Where do I download my invoices?")
    assert hit.headers["x-sipp-cache-match"] == "semantic"


def test_a_question_too_long_to_embed_is_cached_exactly(
    gateway: Gateway, upstream: Provider
) -> None:
    """Past the embedding target's context (128 tokens here) the question has no vector:
    not a failure of the target, so the exact cache keeps working for it."""
    failures = gateway.metric("sipp_gateway_cache_embedding_failures_total", TARGET)
    long = "Please summarise the following notes: " + "the quarterly figures look fine " * 60
    assert ask(gateway, long).headers["x-sipp-cache"] == "store"
    poll(lambda: ask(gateway, long).headers["x-sipp-cache"] == "hit", "stored exactly")
    assert gateway.metric("sipp_gateway_cache_embedding_failures_total", TARGET) == failures


def test_the_vectors_survive_a_restart(upstream: Provider, tmp_path: Path) -> None:
    cache = sqlite_cache(tmp_path, semantic())
    with cached_gateway(tmp_path, upstream, cache, name="first") as gw:
        ask(gw, "How many days of annual leave do I get?")
        indexed(gw, 1)
    calls = upstream.calls()
    with cached_gateway(tmp_path, upstream, cache, name="second") as gw:
        indexed(gw, 1)  # rebuilt in the background from the store
        hit = ask(gw, "How many days of annual leave am I entitled to?")
        assert hit.headers["x-sipp-cache-match"] == "semantic" and upstream.calls() == calls


def test_a_vector_expires_with_its_entry(upstream: Provider, tmp_path: Path) -> None:
    """The TTL is absolute: the vector goes when its entry does, hit or not."""
    with cached_gateway(
        tmp_path, upstream, sqlite_cache(tmp_path, semantic("ttl_seconds = 2"))
    ) as gw:
        ask(gw, "How many days of annual leave do I get?")
        indexed(gw, 1)
        no_store = {"cache-control": "no-store"}  # looks up (and expires), stores nothing
        poll(
            lambda: (
                ask(gw, "Unrelated question?", headers=no_store) is not None
                and gw.metric("sipp_gateway_cache_semantic_entries", TARGET) == 0
            ),
            "the vector expired",
            timeout=60,
        )
        calls = upstream.calls()
        miss = ask(gw, "How many days of annual leave am I entitled to?")
        assert miss.headers["x-sipp-cache"] == "store" and upstream.calls() == calls + 1


def test_max_entries_bounds_the_index(upstream: Provider, tmp_path: Path) -> None:
    with cached_gateway(
        tmp_path, upstream, sqlite_cache(tmp_path, semantic("max_entries = 2"))
    ) as gw:
        for question in (
            "Who wrote Hamlet?",
            "How tall is Mount Everest?",
            "Why is the sea salty?",
        ):
            ask(gw, question)
        poll(
            lambda: (
                gw.metric("sipp_gateway_cache_stores_total", '{route="/v1/chat",target="remote"}')
                == 3
            ),
            "three stores",
        )
        indexed(gw, 2)
        calls = upstream.calls()  # the oldest question's vector (and entry) are gone
        assert ask(gw, "Who was the author of Hamlet?").headers["x-sipp-cache"] == "store"
        assert upstream.calls() == calls + 1


# ------------------------------------------------------------------ configuration
def _config(cache: str) -> None:
    text = toml("http://127.0.0.1:9/v1", 8001, 8002, target_limits=f"\n[targets.cache]\n{cache}")
    parse_config(tomllib.loads(text))


def test_the_embedding_target_is_checked_at_startup(tmp_path: Path) -> None:
    base = f'path = "{tmp_path}"\nsemantic = true\n'
    with pytest.raises(ConfigError, match="embedding_target: is required"):
        _config(base)
    with pytest.raises(ConfigError, match="no target named 'nope'"):
        _config(base + 'embedding_target = "nope"')
    with pytest.raises(ConfigError, match="'remote' is a openai_compatible target"):
        _config(base + 'embedding_target = "remote"')
    not_embedding = semantic().replace("embeddings = true\n", "")
    with pytest.raises(ConfigError, match="not loaded for embeddings"):
        _config(f'path = "{tmp_path}"\n{not_embedding}')
    with pytest.raises(ConfigError, match="similarity_threshold: must be a number"):
        _config(f'path = "{tmp_path}"\n{semantic("similarity_threshold = 1.5")}')
    with pytest.raises(ConfigError, match="only read with semantic = true"):
        _config(f'path = "{tmp_path}"\nguard = false')
    _config(f'path = "{tmp_path}"\n{semantic("similarity_threshold = 0.9")}')
