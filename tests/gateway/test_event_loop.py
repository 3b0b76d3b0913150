"""`sipp-gateway serve --loop`: which event loop the gateway runs on."""

from __future__ import annotations

import asyncio
import sys

import click
import pytest

from sipp.cli.gateway import _runner


async def _loop_module() -> int:
    return 1 if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else 0


def test_auto_and_uvloop_run_on_uvloop() -> None:  # installed with uvicorn[standard]
    assert _runner("auto")(_loop_module()) == 1
    assert _runner("uvloop")(_loop_module()) == 1


def test_asyncio_runs_on_the_standard_loop() -> None:
    assert _runner("asyncio")(_loop_module()) == 0


def test_without_uvloop_auto_falls_back_and_uvloop_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` raises ImportError
    assert _runner("auto")(_loop_module()) == 0
    with pytest.raises(click.UsageError, match="uvloop is not installed"):
        _runner("uvloop")
