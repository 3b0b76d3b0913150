"""The README's provider tool-calling example runs as written, against a loopback
Anthropic upstream that calls the tool once and then answers."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sipp import ProviderDescriptor, SippClient, ToolCall

from .anthropic_wire import message
from .loopback import LoopbackServer, Request, json_reply

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_tool_loop_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    source = next(b for b in blocks if "FunctionTool(" in b)

    def handler(req: Request) -> list[Any]:
        if len(req.json()["messages"]) > 1:  # the tool's result came back
            return json_reply(message([{"type": "text", "text": "Sunny."}]))
        call = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "P"}}
        return json_reply(message([call], "tool_use"))

    with LoopbackServer(handler) as server, SippClient() as client:
        descriptor = ProviderDescriptor("anthropic", "m", api_key="k", base_url=server.url)
        namespace: dict[str, Any] = {
            "client": client,
            "claude": client.add("an", descriptor),
            "run_tool": lambda call: f"sunny in {call.name}",
        }
        exec(source, namespace)
        sent = server.requests[1].json()["messages"]
    assert namespace["first"].tool_calls == (ToolCall("toolu_1", "get_weather", '{"city": "P"}'),)
    assert namespace["answer"].text == "Sunny."
    assert sent[-1] == {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny in get_weather"}
        ],
    }
