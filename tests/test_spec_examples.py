"""The spec's Python snippets are contracts: run them as written.

The snippets are read from the reference docs beside the repository
(`../shared/spec/sipp-reference-docs.txt`) at test time, not copied here.
They name `chat.gguf` / `embed.gguf` in the working directory or take the model
path from argv, so each runs in a scratch directory with those names linked
to the real default model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE_QUERY = ("Python Package", "Local GGUF Query")
SPEC = Path(__file__).resolve().parents[2] / "shared" / "spec" / "sipp-reference-docs.txt"


def _snippet(headings: tuple[str, ...], first_line: str) -> str:
    """The code from `first_line` to the next `print(` line, after each heading in turn."""
    lines = SPEC.read_text(encoding="utf-8").splitlines()
    start = 0
    for heading in headings:
        start = lines.index(heading, start)
    begin = next(i for i in range(start, len(lines)) if lines[i] == first_line)
    end = next(i for i in range(begin, len(lines)) if lines[i].startswith("print("))
    return "\n".join(lines[begin : end + 1]) + "\n"


def _run(
    code: str, cwd: Path, *args: str, name: str = "snippet.py"
) -> subprocess.CompletedProcess[str]:
    script = cwd / name
    script.write_text(code, encoding="utf-8")
    env = dict(os.environ)
    return subprocess.run(
        [sys.executable, str(script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_spec_is_available() -> None:
    assert SPEC.is_file(), f"reference docs not found at {SPEC}"


def test_python_local_quickstart_runs_as_written(tmp_path: Path, smollm_path: Path) -> None:
    code = _snippet(("Python Local",), "from sipp import (")
    assert "client.embed(" in code and "LocalEmbedOptions" in code
    (tmp_path / "chat.gguf").symlink_to(smollm_path)
    (tmp_path / "embed.gguf").symlink_to(smollm_path)
    proc = _run(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # print(query["text"], chat["text"], len(embedding["values"])): 576 dims for SmolLM2.
    assert proc.stdout.strip().endswith("576"), proc.stdout


# Runs a snippet unchanged, then reports what it printed and the objects it left behind,
# so the test can check the printed line against the response the snippet received.
_INSPECT = """
import contextlib, io, json, runpy, sys
sys.argv = ["snippet.py", *sys.argv[1:]]
printed = io.StringIO()
with contextlib.redirect_stdout(printed):
    scope = runpy.run_path("snippet.py", run_name="__main__")
client, endpoint, response = scope["client"], scope["endpoint"], scope["run"].result()
metrics = client.runtime_metrics(endpoint)
again = client.query(scope["query_prompt"], endpoint=endpoint, local=scope["LocalTextOptions"](
    context_key="python-local"), options=scope["SippTextOptions"](max_tokens=1)).result()
client.close()
print(json.dumps({
    "printed": printed.getvalue(),
    "text": response.text,
    "finish_reason": response.finish_reason,
    "output_tokens": response.usage.output_tokens,
    "prompt_tokens": response.usage.input_tokens,
    "requests": metrics["requests"],
    "completed": metrics["completed"],
    "again_cached": again.local_stats.cached_prompt_tokens,
}))
"""


def test_python_package_local_query_runs_as_written(tmp_path: Path, smollm_path: Path) -> None:
    code = _snippet(PACKAGE_QUERY, "import sys")
    assert 'CacheRuntimeConfig(mode="live_slot_prefix")' in code
    assert "max_tokens=64" in code and 'context_key="python-local"' in code
    (tmp_path / "snippet.py").write_text(code, encoding="utf-8")
    proc = _run(_INSPECT, tmp_path, str(smollm_path), name="inspect_snippet.py")
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    # It printed exactly the text of the response it received (SmolLM2 does not know the
    # raw "<|system|>" markers and samples at the default temperature, so the text itself
    # varies and may be empty).
    assert got["printed"] == got["text"] + "\n"
    assert got["finish_reason"] in ("stop", "length")
    assert got["output_tokens"] <= 64
    assert (got["finish_reason"] == "length") == (got["output_tokens"] == 64)
    assert got["requests"] == got["completed"] == 1
    # Its cache settings took effect: the same prompt under the same context_key reuses
    # everything but the last prompt token.
    assert got["again_cached"] == got["prompt_tokens"] - 1


@pytest.mark.parametrize(
    "headings, first", [(("Python Local",), "from sipp import ("), (PACKAGE_QUERY, "import sys")]
)
def test_snippets_are_the_python_ones(headings: tuple[str, ...], first: str) -> None:
    code = _snippet(headings, first)
    assert "SippClient()" in code and code.rstrip().splitlines()[-1].startswith("print(")
