"""Tool-call round trip: one chat request with a tool, `tool_choice="required"`, until the
parsed call is in hand. Sipp in process vs `llama-server --jinja` built from the llama.cpp
that the installed llama-cpp-python vendors (`_llama_tools.py`), same GGUF
(qwen2.5-coder-0.5b-instruct), prompt, tool, context size and threads, greedy. Rounds
alternate sipp / server; each side keeps its prompt cache between rounds (both reuse the
cached prefix, so after the first round mostly decode is measured).

The two do not generate the same tokens: Sipp's grammar starts the reply with the call,
llama-server's lets text come first (with this model it often writes the call as
Markdown JSON and runs into `max_tokens` without a parsed call). So each side prints its
completion tokens and how many rounds ended with a parsed call, besides wall time.

    python bench/tool_call_roundtrip.py [--rounds 5] [--threads 2] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from _llama_tools import ensure_tools, tool_env
from _stats import spread

TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
QUESTION = "What's the weather in Paris?"
N_CTX = 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SippSide:
    def __init__(self, model: Path, threads: int, max_tokens: int) -> None:
        from sipp import (
            ChatMessage,
            ContextRuntimeConfig,
            FunctionTool,
            LocalModelDescriptor,
            NativeRuntimeConfig,
            PlacementRuntimeConfig,
            SippClient,
            SippTextOptions,
        )
        from sipp.local._llama import cpu_has_amx

        self.client = SippClient()
        config = NativeRuntimeConfig(
            context=ContextRuntimeConfig(n_ctx=N_CTX, n_parallel=1, n_threads=threads),
            placement=PlacementRuntimeConfig(use_extra_bufts=not cpu_has_amx()),
        )
        self.ref = self.client.add("qwen", LocalModelDescriptor(model, config))
        fn = TOOL["function"]
        tool = FunctionTool(
            name=fn["name"], description=fn["description"], parameters=fn["parameters"]
        )
        self.options = SippTextOptions(
            max_tokens=max_tokens, temperature=0, tools=[tool], tool_choice="required"
        )
        self.messages = [ChatMessage("user", QUESTION)]

    def once(self) -> tuple[float, int, str | None]:
        start = time.perf_counter()
        response = self.client.chat(self.messages, endpoint=self.ref, options=self.options).result()
        elapsed = time.perf_counter() - start
        assert response.usage is not None
        if not response.tool_calls:
            return elapsed, response.usage.output_tokens, None
        call = response.tool_calls[0]
        return elapsed, response.usage.output_tokens, f"{call.name}({call.arguments})"

    def close(self) -> None:
        self.client.close()


class ServerSide:
    def __init__(self, model: Path, threads: int, max_tokens: int, log: Path) -> None:
        from sipp.local._llama import cpu_has_amx

        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        cmd = [
            str(ensure_tools() / "llama-server"),
            "-m", str(model), "--jinja", "--host", "127.0.0.1", "--port", str(port),
            "-c", str(N_CTX), "-np", "1", "-t", str(threads), "-tb", str(threads),
            "-fa", "off",  # as sipp on CPU
            *(["--no-repack"] if cpu_has_amx() else []),
        ]  # fmt: skip
        self.log = log.open("wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=tool_env())
        self.http = httpx.Client(timeout=600)
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"llama-server exited early; see {log}")
            try:
                if self.http.get(f"{self.url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"llama-server did not become healthy; see {log}")
            time.sleep(0.5)
        self.body = {
            "messages": [{"role": "user", "content": QUESTION}],
            "tools": [TOOL],
            "tool_choice": "required",
            "temperature": 0,
            "max_tokens": max_tokens,
        }

    def once(self) -> tuple[float, int, str | None]:
        start = time.perf_counter()
        reply = self.http.post(f"{self.url}/v1/chat/completions", json=self.body)
        elapsed = time.perf_counter() - start
        reply.raise_for_status()
        data = reply.json()
        tokens = int(data["usage"]["completion_tokens"])
        calls = data["choices"][0]["message"].get("tool_calls") or []
        if not calls:
            return elapsed, tokens, None
        fn = calls[0]["function"]
        return elapsed, tokens, f"{fn['name']}({fn['arguments']})"

    def close(self) -> None:
        self.http.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    from sipp import models

    model = models.pull("qwen2.5-coder-0.5b-instruct", verify=False)
    log = Path(tempfile.gettempdir()) / "sipp-bench-llama-server.log"
    sipp = SippSide(model, args.threads, args.max_tokens)
    server = ServerSide(model, args.threads, args.max_tokens, log)
    times: dict[str, list[float]] = {"sipp": [], "llama-server": []}
    parsed = dict.fromkeys(times, 0)
    try:
        for i in range(args.rounds):
            for name, side in (("sipp", sipp), ("llama-server", server)):
                elapsed, tokens, call = side.once()
                times[name].append(elapsed)
                parsed[name] += call is not None
                shown = call or "no tool call"
                print(
                    f"round {i + 1} {name:12} {elapsed * 1000:8.0f} ms  {tokens:3d} tokens  {shown}"
                )
    finally:
        sipp.close()
        server.close()
    for name, values in times.items():
        calls = f"parsed call in {parsed[name]}/{args.rounds} rounds"
        print(f"{name:12} {spread(values, '.0f', 'ms', 1000)}; {calls}")
    ratios = [a / b for a, b in zip(times["sipp"], times["llama-server"], strict=True)]
    print(f"sipp / llama-server per round: {spread(ratios, '.2f')}")


if __name__ == "__main__":
    sys.exit(main())
