"""`sipp-gateway serve` as a real process: real listeners on free loopback ports,
a real local model and a loopback OpenAI mock as targets, real HTTP clients."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from sipp import (
    AuthenticationError,
    AuthorizationError,
    ChatMessage,
    GatewayDescriptor,
    LocalModelDescriptor,
    SippClient,
    SippTextOptions,
)

from ..ports import free_port
from ..remote.loopback import LoopbackServer, Request, json_reply, sse_reply

TOKEN, LIMITED = "tok-all-7f3a", "tok-local-only-91c2"


def _config(model: Path, mock_url: str, public: int, management: int, extra: str = "") -> str:
    return f"""
public_bind = "127.0.0.1:{public}"
management_bind = "127.0.0.1:{management}"
max_request_bytes = 4096
max_concurrent_requests = 2
allowed_origins = []
admin_password_env = "TEST_ADMIN_PASSWORD"
{extra}
[security.client_ip]
source = "peer"
trusted_proxy_cidrs = []

[security.rate_limit]
enabled = false
requests_per_minute = 60
burst = 60

[routes]
index = "/"
health = "/healthz"
readiness = "/readyz"
metrics = "/metrics"

[[tokens]]
env = "TEST_TOKEN_ALL"
caller = "all-targets"
targets = []

[[tokens]]
env = "TEST_TOKEN_LOCAL"
caller = "local-only"
targets = ["local"]

[[targets]]
name = "local"
type = "local"
model = "{model}"
backend = "cpu"
stats = "basic"

[targets.runtime.context]
n_ctx = 512
n_parallel = 2

[[targets]]
name = "mock-openai"
type = "openai_compatible"
model = "mock-model"
base_url = "{mock_url}/v1"
token_env = "TEST_PROVIDER_TOKEN"
"""


def without_prefix_reuse(toml: str) -> str:
    """`_config`'s local target with every prompt prefilled whole, never on KV an earlier
    request left. llama.cpp's numbers depend on the batch a token was computed in, and
    a greedy pick at a near tie can follow them: a test that wants the same text from
    two runs (a fresh library endpoint beside the gateway, a verification run) keeps
    both from reusing it."""
    anchor = "n_parallel = 2\n"
    assert anchor in toml, "the local target's context table moved"
    return toml.replace(anchor, f'{anchor}\n[targets.runtime.cache]\nmode = "off"\n', 1)


ENV = {
    "TEST_TOKEN_ALL": TOKEN,
    "TEST_TOKEN_LOCAL": LIMITED,
    "TEST_ADMIN_PASSWORD": "pw-123",
    "TEST_PROVIDER_TOKEN": "provider-secret",
}


def _mock(req: Request) -> list[Any]:
    """A loopback OpenAI upstream: the real response shape for each route."""
    usage = {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    if req.path.endswith("/embeddings"):
        return json_reply(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -0.5]}],
                "model": "mock-model",
                "usage": {"prompt_tokens": 3, "total_tokens": 3},
            }
        )
    if req.path.endswith("/completions") and not req.path.endswith("/chat/completions"):
        return json_reply(
            {
                "id": "c",
                "object": "text_completion",
                "created": 1,
                "model": "mock-model",
                "choices": [{"index": 0, "text": "from the provider", "finish_reason": "stop"}],
                "usage": usage,
            }
        )
    if json.loads(req.body).get("stream"):
        chunk = {
            "id": "c",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "mock-model",
            "choices": [
                {"index": 0, "delta": {"content": "from the provider"}, "finish_reason": "stop"}
            ],
        }
        return sse_reply([b"data: " + json.dumps(chunk).encode() + b"\n\n", b"data: [DONE]\n\n"])
    return json_reply(
        {
            "id": "c",
            "object": "chat.completion",
            "created": 1,
            "model": "mock-model",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "from the provider"},
                    "finish_reason": "stop",
                }
            ],
            "usage": usage,
        }
    )


class Gateway:
    def __init__(
        self, config_path: Path, env: dict[str, str], public: int, management: int
    ) -> None:
        self.public = f"http://127.0.0.1:{public}"
        self.management = f"http://127.0.0.1:{management}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sipp.cli.gateway", "serve", "--config", str(config_path)],
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"gateway exited: {self.proc.stderr.read() if self.proc.stderr else ''}"
                )
            try:
                if httpx.get(f"{self.management}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError("gateway never became ready")

    def metric(self, name: str, labels: str = "") -> float:
        text = httpx.get(f"{self.management}/metrics", timeout=60).text
        match = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", text, re.M)
        return float(match.group(1)) if match else 0.0

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
            raise AssertionError(
                f"the gateway did not stop within 60 s of SIGTERM:\n{err}"
            ) from None
        self.stderr = err
        return self.proc.returncode, err


@contextmanager
def serving(
    path: Path,
    env: dict[str, str],
    public: int,
    management: int,
    *,
    timeout: float = 120,
    secrets: Iterable[str] = (),
) -> Iterator[Gateway]:
    """`sipp-gateway serve --config path`, ready. On exit: SIGTERM, exit code 0, and none
    of `secrets` in its logs."""
    gw = Gateway(path, env, public, management)
    try:
        gw.wait_ready(timeout)
        yield gw
    finally:
        code, err = gw.stop()
    assert code == 0, err
    for secret in secrets:  # secrets never reach the logs
        assert secret not in err


@contextmanager
def running_gateway(
    model: Path,
    directory: Path,
    edit: Callable[[str], str] = lambda toml: toml,
    env: dict[str, str] | None = None,
) -> Iterator[Gateway]:
    """A ready `sipp-gateway serve` (local SmolLM2 + a loopback OpenAI mock) on free ports.

    `edit` adjusts the TOML. On exit: SIGTERM, exit code 0, and no secret in its logs."""
    mock = LoopbackServer(_mock)
    public, management = free_port(), free_port()
    path = directory / "gateway.toml"
    path.write_text(edit(_config(model, mock.url, public, management)))
    try:
        with serving(path, {**ENV, **(env or {})}, public, management, secrets=ENV.values()) as gw:
            yield gw
    finally:
        mock.close()


@pytest.fixture(scope="module")
def gateway(smollm_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with running_gateway(smollm_path, tmp_path_factory.mktemp("gw")) as gw:
        yield gw


def _loop_sleeps(gw: Gateway) -> int:
    """How many times the gateway's event-loop (main) thread has gone to sleep so far."""
    status = Path(f"/proc/{gw.proc.pid}/task/{gw.proc.pid}/status").read_text()
    switches = re.search(r"^voluntary_ctxt_switches:\s+(\d+)$", status, re.M)
    assert switches is not None, status
    return int(switches.group(1))


def test_an_idle_gateway_wakes_once_a_second(gateway: Gateway) -> None:
    """uvicorn's own loop wakes every 0.1 s; on two cores each wake takes a slice of a
    decode. The gateway's wakes once a second, for the Date header, which still moves."""
    first = parsedate_to_datetime(httpx.get(f"{gateway.management}/healthz").headers["date"])
    before = _loop_sleeps(gateway)
    time.sleep(4)
    woke = _loop_sleeps(gateway) - before
    # One wake a second, and room for the odd extra one; uvicorn's loop would make 40.
    assert woke <= 10, woke
    later = parsedate_to_datetime(httpx.get(f"{gateway.management}/healthz").headers["date"])
    assert later > first
    assert abs(later.timestamp() - time.time()) < 3


def _post(
    gw: Gateway, route: str, body: Any, token: str | None = TOKEN, **kw: Any
) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    headers.update(kw.pop("headers", {}))
    return httpx.post(f"{gw.public}{route}", json=body, headers=headers, timeout=60, **kw)


def test_management_probes(gateway: Gateway) -> None:
    assert httpx.get(f"{gateway.management}/healthz", timeout=60).text == "ok"
    assert httpx.get(f"{gateway.management}/readyz", timeout=60).text == "ready"
    index = httpx.get(f"{gateway.management}/", timeout=60).json()
    assert index["ready"] and {t["name"]: t["state"] for t in index["targets"]} == {
        "local": "loaded",
        "mock-openai": "loaded",
    }
    assert (
        httpx.get(f"{gateway.public}/healthz", timeout=60).status_code == 404
    )  # management routes are not public


def test_query_chat_embed_and_request_ids(gateway: Gateway) -> None:
    r = _post(
        gateway,
        "/v1/query",
        {"model": "local", "prompt": "The sky is", "max_tokens": 5, "temperature": 0},
        headers={"x-request-id": "curl-query-1"},
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == "curl-query-1"
    body = r.json()
    assert (
        body["model"] == "local"
        and body["finish_reason"] in ("stop", "length")
        and body["usage"]["output_tokens"] <= 5
    )
    chat = _post(
        gateway,
        "/v1/chat",
        {"model": "mock-openai", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert chat.json()["text"] == "from the provider" and len(chat.headers["x-request-id"]) == 32
    embed = _post(gateway, "/v1/embed", {"model": "local", "input": "x"})
    assert embed.status_code == 400 and embed.json()["error"]["code"] == "unsupported_operation"


def test_same_answer_through_the_gateway_as_in_process(gateway: Gateway, smollm_path: Path) -> None:
    options = SippTextOptions(max_tokens=12, temperature=0)
    messages = [ChatMessage("user", "Name a fruit.")]
    with SippClient() as client:
        remote = client.add(
            "gw",
            GatewayDescriptor(
                "local", gateway.public, authentication_kind="bearer", authentication_value=TOKEN
            ),
        )
        run = client.chat(messages, endpoint=remote, options=options, emit_tokens=True)
        streamed = "".join(b.text for b in run)
        via_gateway = run.result()
        local = client.add("local", LocalModelDescriptor(smollm_path))
        direct = client.chat(messages, endpoint=local, options=options).result()
    assert streamed == via_gateway.text == direct.text


@pytest.mark.parametrize(
    "token, body, status, code",
    [
        (None, {"model": "local", "prompt": "x"}, 401, "authentication"),
        ("wrong-token", {"model": "local", "prompt": "x"}, 401, "authentication"),
        (LIMITED, {"model": "mock-openai", "prompt": "x"}, 403, "authorization"),
        (TOKEN, {"model": "nope", "prompt": "x"}, 404, "not_found"),
        (TOKEN, {"model": "local", "prompt": "x", "grammar": "root ::= x"}, 400, "invalid_request"),
        (TOKEN, {"model": "local"}, 400, "invalid_request"),
        (TOKEN, {"model": "local", "prompt": "x" * 5000}, 413, "payload_too_large"),
    ],
)
def test_status_table(
    gateway: Gateway, token: str | None, body: Any, status: int, code: str
) -> None:
    r = _post(gateway, "/v1/query", body, token)
    assert r.status_code == status
    assert r.json()["error"]["code"] == code and set(r.json()["error"]) == {"code", "message"}
    assert "Traceback" not in r.text


def test_malformed_authorization_and_chunked_oversize(gateway: Gateway) -> None:
    r = httpx.post(
        f"{gateway.public}/v1/query",
        content=b"{}",
        headers={"authorization": "Basic abc"},
        timeout=60,
    )
    assert r.status_code == 401

    def chunks() -> Iterator[bytes]:
        for _ in range(10):
            yield b"x" * 1024

    r = httpx.post(
        f"{gateway.public}/v1/query",
        content=chunks(),
        headers={"authorization": f"Bearer {TOKEN}"},
        timeout=60,
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_gateway_client_gets_typed_errors(gateway: Gateway) -> None:
    with SippClient() as client:
        bad = client.add(
            "bad",
            GatewayDescriptor(
                "local", gateway.public, authentication_kind="bearer", authentication_value="nope"
            ),
        )
        with pytest.raises(AuthenticationError):
            client.query("x", endpoint=bad).result()
        limited = client.add(
            "lim",
            GatewayDescriptor(
                "mock-openai",
                gateway.public,
                authentication_kind="bearer",
                authentication_value=LIMITED,
            ),
        )
        with pytest.raises(AuthorizationError, match="not allowed"):
            client.query("x", endpoint=limited).result()


def _open_stream(gw: Gateway) -> tuple[httpx.Client, httpx.Response, Iterator[bytes]]:
    client = httpx.Client(timeout=60)
    body = {
        "model": "local",
        "prompt": "Count: 1, 2, 3,",
        "max_tokens": 400,
        "temperature": 0,
        "stream": True,
    }
    response = client.send(
        client.build_request(
            "POST", f"{gw.public}/v1/query", json=body, headers={"authorization": f"Bearer {TOKEN}"}
        ),
        stream=True,
    )
    assert response.status_code == 200
    chunks = response.iter_bytes()
    next(chunks)  # the stream has started; keep `chunks` alive or its cleanup hangs up
    return client, response, chunks


def test_admission_limit_and_disconnect_frees_slots(gateway: Gateway) -> None:
    streams = [_open_stream(gateway) for _ in range(2)]
    third = _post(gateway, "/v1/query", {"model": "local", "prompt": "x", "max_tokens": 1})
    assert third.status_code == 429 and third.json()["error"]["code"] == "overloaded"
    assert gateway.metric("sipp_gateway_admission_rejected_total") >= 1
    assert gateway.metric("sipp_gateway_in_flight_requests") == 2
    for client, response, _ in streams:  # clients hang up mid-stream
        response.close()
        client.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (
        gateway.metric("sipp_gateway_in_flight_requests")
        or gateway.metric("sipp_local_busy_slots", '{target="local"}')
    ):
        time.sleep(0.1)
    assert gateway.metric("sipp_gateway_in_flight_requests") == 0
    assert gateway.metric("sipp_local_busy_slots", '{target="local"}') == 0
    assert gateway.metric("sipp_local_cancelled", '{target="local"}') >= 2
    ok = _post(gateway, "/v1/query", {"model": "local", "prompt": "x", "max_tokens": 1})
    assert ok.status_code == 200


def test_stream_frames_and_metrics(gateway: Gateway) -> None:
    r = _post(
        gateway,
        "/v1/chat",
        {
            "model": "local",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 4,
            "temperature": 0,
            "stream": True,
        },
    )
    assert r.headers["content-type"].startswith("text/event-stream")
    events = re.findall(r"^event: (\w+)$", r.text, re.M)
    assert events[0] == "token" and events[-2:] == ["usage", "done"]
    usage = json.loads(re.search(r"event: usage\ndata: (.*)\n", r.text).group(1))  # type: ignore[union-attr]
    assert usage["output_tokens"] <= 4
    assert gateway.metric("sipp_gateway_requests_total", '{operation="chat"}') >= 1
    assert (
        gateway.metric("sipp_gateway_errors_total", '{code="authentication",operation="query"}')
        >= 1
    )
    assert gateway.metric("sipp_gateway_output_tokens_total", '{target="local"}') > 0
    text = httpx.get(f"{gateway.management}/metrics", timeout=60).text
    for family in (
        "sipp_gateway_request_duration_seconds_bucket",
        "sipp_gateway_time_to_first_token_seconds_bucket",
        "sipp_gateway_overhead_seconds_bucket",
        "sipp_local_generated_tokens",
    ):
        assert family in text
    assert TOKEN not in text and "provider-secret" not in text


def test_refuses_to_start_without_secrets(smollm_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text(_config(smollm_path, "http://127.0.0.1:9", free_port(), free_port()))
    for env, fragment in [
        ({**ENV, "TEST_TOKEN_ALL": ""}, "TEST_TOKEN_ALL is blank"),
        ({k: v for k, v in ENV.items() if k != "TEST_TOKEN_LOCAL"}, "TEST_TOKEN_LOCAL is not set"),
        ({**ENV, "TEST_TOKEN_ALL": "has space"}, "TEST_TOKEN_ALL contains whitespace"),
        (
            {k: v for k, v in ENV.items() if k != "TEST_ADMIN_PASSWORD"},
            "TEST_ADMIN_PASSWORD is not set",
        ),
        (
            {k: v for k, v in ENV.items() if k != "TEST_PROVIDER_TOKEN"},
            "TEST_PROVIDER_TOKEN is not set",
        ),
    ]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("TEST_")}
        proc = subprocess.run(
            [sys.executable, "-m", "sipp.cli.gateway", "serve", "--config", str(path)],
            env={**clean, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 1 and fragment in proc.stderr, proc.stderr
        assert "has space" not in proc.stderr


def test_sigterm_lets_in_flight_streams_finish(smollm_path: Path, tmp_path: Path) -> None:
    public, management = free_port(), free_port()
    path = tmp_path / "g.toml"
    path.write_text(_config(smollm_path, "http://127.0.0.1:9", public, management))
    gw = Gateway(path, ENV, public, management)
    gw.wait_ready()
    frames: list[bytes] = []

    def consume() -> None:
        body = {
            "model": "local",
            "prompt": "Count: 1, 2, 3,",
            "max_tokens": 40,
            "temperature": 0,
            "stream": True,
        }
        with httpx.stream(
            "POST",
            f"{gw.public}/v1/query",
            json=body,
            headers={"authorization": f"Bearer {TOKEN}"},
            timeout=60,
        ) as r:
            for chunk in r.iter_bytes():
                frames.append(chunk)

    reader = threading.Thread(target=consume)
    reader.start()
    while not frames:
        time.sleep(0.01)
    code, err = gw.stop()
    reader.join(60)
    assert code == 0, err
    assert b"".join(frames).endswith(b'event: done\ndata: {"finish_reason":"length"}\n\n')
    logs = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any(entry["message"].startswith("stopped;") for entry in logs)


def test_curl_against_the_gateway(gateway: Gateway) -> None:
    proc = subprocess.run(
        [
            "curl",
            "-sS",
            "-N",
            f"{gateway.public}/v1/query",
            "-H",
            f"Authorization: Bearer {TOKEN}",
            "-H",
            "Content-Type: application/json",
            "-H",
            "x-request-id: curl-query-1",
            "-d",
            '{"model":"local","prompt":"Count: 1, 2, 3,","max_tokens":8,"temperature":0,"stream":true}',
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    assert proc.stdout.startswith("event: token\ndata: {") and proc.stdout.endswith(
        'event: done\ndata: {"finish_reason":"length"}\n\n'
    )


def test_no_secret_in_any_response(gateway: Gateway) -> None:
    responses = [
        httpx.get(f"{gateway.management}/", timeout=60).text,
        httpx.get(f"{gateway.management}/metrics", timeout=60).text,
        _post(gateway, "/v1/query", {"model": "mock-openai", "prompt": "x"}).text,
        _post(gateway, "/v1/query", {"model": "local", "prompt": "x"}, "wrong").text,
    ]
    for text in responses:
        for secret in ENV.values():
            assert secret not in text


@pytest.mark.parametrize("route", ["/v1/query", "/v1/completions"])  # native and OpenAI
def test_non_streaming_client_that_hangs_up_cancels_its_generation(
    gateway: Gateway, route: str
) -> None:
    before = gateway.metric("sipp_local_cancelled", '{target="local"}')
    body = {"model": "local", "prompt": "Count: 1, 2, 3,", "max_tokens": 400, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{gateway.public}{route}",
            json=body,
            headers={"authorization": f"Bearer {TOKEN}"},
            timeout=0.5,
        )
    deadline = time.monotonic() + 30
    while (
        time.monotonic() < deadline
        and gateway.metric("sipp_local_cancelled", '{target="local"}') == before
    ):
        time.sleep(0.05)
    assert gateway.metric("sipp_local_cancelled", '{target="local"}') == before + 1
    assert gateway.metric("sipp_local_busy_slots", '{target="local"}') == 0
    assert gateway.metric("sipp_gateway_in_flight_requests") == 0


@contextmanager
def _targets_loading(tmp_path: Path, public: bool) -> Iterator[tuple[str, Any]]:
    """The public or the management app of a gateway whose targets have not loaded yet,
    served on a free port: its URL, and its state to change."""
    import uvicorn

    from sipp import AsyncSippClient
    from sipp.gateway.app import GatewayState, build_management_app, build_public_app
    from sipp.gateway.auth import TokenTable
    from sipp.gateway.config import parse_config
    from sipp.gateway.config import tomllib as toml

    config = parse_config(
        toml.loads(_config(tmp_path / "m.gguf", "http://127.0.0.1:9", free_port(), free_port()))
    )
    state = GatewayState(config, AsyncSippClient(), TokenTable(config.tokens, ENV))
    app = build_public_app(state) if public else build_management_app(state)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}", state
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_request_for_a_target_still_loading_is_503_and_retryable(tmp_path: Path) -> None:
    with _targets_loading(tmp_path, public=True) as (base, _):
        auth = {"authorization": f"Bearer {TOKEN}"}
        chat = {"model": "local", "messages": [{"role": "user", "content": "hi"}]}
        native = httpx.post(f"{base}/v1/chat", json=chat, headers=auth)
        assert native.status_code == 503, native.text
        assert native.json()["error"] == {
            "code": "unavailable",
            "message": "target 'local' is still loading",
        }
        r = httpx.post(f"{base}/v1/chat/completions", json=chat, headers=auth)
        assert r.status_code == 503 and "still loading" in r.json()["error"]["message"], r.text


def test_readiness_is_503_until_every_target_is_loaded(tmp_path: Path) -> None:
    with _targets_loading(tmp_path, public=False) as (base, state):
        url = f"{base}/readyz"
        assert (httpx.get(url, timeout=60).status_code, httpx.get(url, timeout=60).text) == (
            503,
            "not ready",
        )  # still loading
        state.ready = True
        assert (httpx.get(url, timeout=60).status_code, httpx.get(url, timeout=60).text) == (
            200,
            "ready",
        )
        state.target_errors["local"] = "boom"
        assert httpx.get(url, timeout=60).status_code == 503  # a target failed
        assert httpx.get(f"{base}/healthz", timeout=60).text == "ok"


@pytest.mark.parametrize("route", ["/v1/query", "/v1/completions"])  # native and OpenAI
def test_a_streamed_request_refused_while_preparing_gets_its_own_status(
    gateway: Gateway, route: str
) -> None:
    # The local target prepares (tokenizes) off the event loop; a prompt over its 512-token
    # context is refused there, and the stream must not have committed to 200 by then.
    body = {"model": "local", "prompt": "word " * 700, "max_tokens": 4, "stream": True}
    r = httpx.post(
        f"{gateway.public}{route}",
        json=body,
        headers={"authorization": f"Bearer {TOKEN}"},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["code"] == "context_overflow"
    assert gateway.metric("sipp_gateway_in_flight_requests") == 0
