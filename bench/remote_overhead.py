"""Added latency of a sipp provider endpoint over a bare httpx call and over the
official `openai` client, all against the same loopback OpenAI mock.

The mock runs in its own process (tests/remote/loopback.py, real HTTP/1.1 on
127.0.0.1) and answers /v1/chat/completions with a fixed JSON body or an SSE
stream of 16 chunks. Each client sends the same chat request; we time the full
call (for streams, until the last chunk is consumed). Clients take turns in
blocks so machine noise hits all three alike. Prints p50/p99 per client and
the ratios sipp/httpx and sipp/openai.

    ./dev bench remote_overhead [--requests 400] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai

from _stats import percentile
from sipp import ChatMessage, ProviderDescriptor, SippClient, SippTextOptions

ROOT = Path(__file__).resolve().parents[1]
SERVER = """
import json, sys, time
sys.path.insert(0, {root!r})
from tests.remote.loopback import LoopbackServer, json_reply, sse_reply
def chunk(delta, finish=None):
    return b"data: " + json.dumps({{"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{{"index": 0, "delta": delta, "finish_reason": finish}}]}}).encode() + b"\\n\\n"
STREAM = [chunk({{"role": "assistant", "content": ""}})] + [chunk({{"content": " word"}}) for _ in range(16)] + [
    chunk({{}}, "stop"), b'data: {{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[],'
    b'"usage":{{"prompt_tokens":9,"completion_tokens":16,"total_tokens":25}}}}\\n\\n', b"data: [DONE]\\n\\n"]
BODY = {{"id": "c", "object": "chat.completion", "created": 1, "model": "m", "choices": [{{"index": 0,
    "message": {{"role": "assistant", "content": "word " * 16}}, "finish_reason": "stop"}}],
    "usage": {{"prompt_tokens": 9, "completion_tokens": 16, "total_tokens": 25}}}}
def handler(req):
    return sse_reply(STREAM) if json.loads(req.body).get("stream") else json_reply(BODY)
server = LoopbackServer(handler)
print(server.url, flush=True)
time.sleep(10**6)
"""

MESSAGES = [{"role": "user", "content": "Say sixteen words."}]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER.format(root=str(ROOT))], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    base = proc.stdout.readline().strip() + "/v1"
    try:
        run(base, args.requests, args.rounds)
    finally:
        proc.kill()


def run(base: str, n: int, rounds: int) -> None:
    raw = httpx.Client()
    oai = openai.OpenAI(base_url=base, api_key="sk-bench", max_retries=0)
    sipp = SippClient()
    ref = sipp.add(
        "p", ProviderDescriptor("openai_compatible", "m", api_key="sk-bench", base_url=base)
    )
    msgs = [ChatMessage("user", MESSAGES[0]["content"])]
    opts = SippTextOptions(max_tokens=16)
    headers = {"authorization": "Bearer sk-bench"}

    def httpx_json() -> None:
        r = raw.post(
            f"{base}/chat/completions",
            json={"model": "m", "messages": MESSAGES, "max_tokens": 16},
            headers=headers,
        )
        json.loads(r.content)["choices"][0]["message"]["content"]

    def httpx_stream() -> None:
        body = {"model": "m", "messages": MESSAGES, "max_tokens": 16, "stream": True}
        with raw.stream("POST", f"{base}/chat/completions", json=body, headers=headers) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    json.loads(line[6:])

    def openai_json() -> None:
        oai.chat.completions.create(model="m", messages=MESSAGES, max_tokens=16)  # type: ignore[arg-type]

    def openai_stream() -> None:
        for _ in oai.chat.completions.create(
            model="m", messages=MESSAGES, max_tokens=16, stream=True
        ):  # type: ignore[arg-type]
            pass

    def sipp_json() -> None:
        sipp.chat(msgs, endpoint=ref, options=opts).result()

    def sipp_stream() -> None:
        run = sipp.chat(msgs, endpoint=ref, options=opts, emit_tokens=True)
        for _ in run:
            pass
        run.result()

    cases: dict[str, dict[str, Callable[[], None]]] = {
        "json": {"httpx": httpx_json, "openai": openai_json, "sipp": sipp_json},
        "stream": {"httpx": httpx_stream, "openai": openai_stream, "sipp": sipp_stream},
    }
    for mode, clients in cases.items():
        times: dict[str, list[float]] = {name: [] for name in clients}
        for fn in clients.values():  # warm up connections and code paths
            for _ in range(20):
                fn()
        per_round = max(1, n // rounds)
        for _ in range(rounds):
            for name, fn in clients.items():
                for _ in range(per_round):
                    start = time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - start) * 1000)
        p50 = {k: statistics.median(v) for k, v in times.items()}
        p99 = {k: percentile(v, 0.99) for k, v in times.items()}
        print(
            f"[{mode}] "
            + "   ".join(f"{k} p50 {p50[k]:.2f} ms p99 {p99[k]:.2f} ms" for k in clients)
        )
        print(
            f"[{mode}] sipp/httpx  p50 {p50['sipp'] / p50['httpx']:.2f}  p99 {p99['sipp'] / p99['httpx']:.2f}"
        )
        print(
            f"[{mode}] sipp/openai p50 {p50['sipp'] / p50['openai']:.2f}  p99 {p99['sipp'] / p99['openai']:.2f}"
        )
    sipp.close()
    raw.close()
    oai.close()


if __name__ == "__main__":
    main()
