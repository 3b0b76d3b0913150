"""`[state]`, `[tokens.limits]` and `[targets.limits]`: parsed, and every mistake named by
its TOML path, by `parse_config` and by `sipp-gateway check`."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sipp.gateway.config import (
    ConfigError,
    LimitConfig,
    ProviderTarget,
    StateConfig,
    parse_config,
)

from .test_config import BASE


def _config(**top: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    data["targets"].append(
        {"name": "remote", "type": "openai_compatible", "model": "m", "base_url": "http://x/v1"}
    )
    data.update(top)
    return data


def test_limits_per_caller_and_target_and_the_state_table() -> None:
    data = _config(state={"backend": "redis", "url_env": "SIPP_REDIS_URL"})
    data["tokens"][0]["limits"] = {"requests_per_minute": 60, "tokens_per_day": 100_000}
    data["targets"][1]["limits"] = {"tokens_per_minute": 9000, "on_unavailable": "fail_closed"}
    data["limits"] = {"reserve_output_tokens": 256}
    config = parse_config(data)
    assert config.state == StateConfig("redis", "SIPP_REDIS_URL", "fail_open", "sipp")
    assert config.tokens[0].limits == LimitConfig(60, None, 100_000, None)
    remote = config.targets[1]
    assert isinstance(remote, ProviderTarget)
    assert remote.limits == LimitConfig(None, 9000, None, "fail_closed")
    assert config.targets[0].limits is None
    assert config.reserve_output_tokens == 256


def test_a_config_without_limits_reads_as_before() -> None:
    config = parse_config(copy.deepcopy(BASE))
    assert config.state == StateConfig()
    assert all(t.limits is None for t in config.tokens)
    assert all(t.limits is None for t in config.targets)


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda d: d.update(state={"backend": "redis"}), "state.url_env: is required"),
        (
            lambda d: d.update(state={"backend": "etcd"}),
            "state.backend: must be one of memory, redis",
        ),
        (
            lambda d: d.update(state={"url_env": "X"}),
            'state.url_env: is only read with backend = "redis"',
        ),
        (
            lambda d: d.update(state={"on_unavailable": "maybe"}),
            "state.on_unavailable: must be one of fail_open, fail_closed",
        ),
        (lambda d: d.update(state={"ttl": 1}), "state.ttl: unknown field"),
        (
            lambda d: d["tokens"][0].update(limits={"requests_per_minute": 0}),
            "tokens[0].limits.requests_per_minute: must be greater than zero",
        ),
        (
            lambda d: d["tokens"][0].update(limits={"tokens_per_hour": 5}),
            "tokens[0].limits.tokens_per_hour: unknown field",
        ),
        (
            lambda d: d["targets"][1].update(limits={"tokens_per_day": "lots"}),
            "targets[1].limits.tokens_per_day: must be an integer",
        ),
        (
            lambda d: d["targets"][0].update(limits=5),
            "targets[0].limits: must be a table",
        ),
        (
            lambda d: d["targets"][1].update(limits={"on_unavailable": "fail_closed"}),
            "targets[1].limits.on_unavailable: applies to no limit",
        ),
        (
            lambda d: d.update(limits={"reserve_output_tokens": -1}),
            "limits.reserve_output_tokens: must be greater than zero",
        ),
        (
            lambda d: d["tokens"].extend(
                [
                    {"env": "A", "caller": "team", "targets": [], "limits": {"tokens_per_day": 1}},
                    {"env": "B", "caller": "team", "targets": [], "limits": {"tokens_per_day": 2}},
                ]
            ),
            "tokens[2].limits: differs from tokens[1].limits of caller 'team'",
        ),
    ],
)
def test_each_mistake_names_its_path(edit: Any, problem: str) -> None:
    data = _config()
    edit(data)
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems


def test_check_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    root = Path(__file__).resolve().parents[2]
    text = (root / "config" / "local.toml").read_text()
    path.write_text(
        text.replace(
            'targets = ["local"]', 'targets = ["local"]\nlimits = { tokens_per_minute = -5 }'
        )
        + '\n[state]\nbackend = "redis"\n'
    )
    out = subprocess.run(
        [sys.executable, "-m", "sipp.cli.gateway", "check", "--config", str(path)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1, out.stdout
    assert "tokens[0].limits.tokens_per_minute: must be greater than zero" in out.stderr
    assert "state.url_env: is required" in out.stderr
    assert "Traceback" not in out.stderr
