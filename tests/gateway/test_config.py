"""`sipp-gateway check`: the TOML schema, every rule failing with its TOML path."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sipp.gateway.config import ConfigError, LocalTarget, ProviderTarget, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]
BASE: dict[str, Any] = {
    "public_bind": "0.0.0.0:8080",
    "management_bind": "0.0.0.0:9090",
    "max_request_bytes": 1048576,
    "max_concurrent_requests": 4,
    "allowed_origins": [],
    "admin_password_env": "SIPP_GATEWAY_ADMIN_PASSWORD",
    "security": {
        "client_ip": {"source": "peer", "trusted_proxy_cidrs": []},
        "rate_limit": {"enabled": False, "requests_per_minute": 60, "burst": 60},
    },
    "routes": {
        "query": "/v1/query",
        "chat": "/v1/chat",
        "embed": "/v1/embed",
        "index": "/",
        "health": "/healthz",
        "readiness": "/readyz",
        "metrics": "/metrics",
        "admin": "/admin",
    },
    "tokens": [{"env": "SIPP_GATEWAY_TOKEN", "caller": "production-client", "targets": ["local"]}],
    "targets": [
        {
            "name": "local",
            "type": "local",
            "model": "/models/model.gguf",
            "backend": "auto",
            "stats": "basic",
        }
    ],
}


def _with(path: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    node: Any = data
    keys = path.replace("]", "").replace("[", ".").split(".")
    for key in keys[:-1]:
        node = node[int(key)] if key.isdigit() else node[key]
    last = keys[-1]
    if value is _DELETE:
        del node[int(last) if last.isdigit() else last]
    else:
        node[int(last) if last.isdigit() else last] = value
    return data


_DELETE = object()


def test_the_spec_example_parses() -> None:
    config = parse_config(BASE)
    assert config.public_bind == ("0.0.0.0", 8080) and config.max_concurrent_requests == 4
    assert config.routes.admin == "/admin" and config.tokens[0].targets == ("local",)
    target = config.targets[0]
    assert isinstance(target, LocalTarget) and target.model == Path("/models/model.gguf")


@pytest.mark.parametrize("name", ["local.toml", "provider-only.toml", "hybrid.toml"])
def test_shipped_configs_pass_check(name: str) -> None:
    config = load_config(ROOT / "config" / name)
    assert config.targets


@pytest.mark.parametrize(
    "path, value, expected",
    [
        (
            "targets[0].backend",
            "tpu",
            "targets[0].backend: must be one of auto, cpu, cuda, metal, vulkan",
        ),
        ("targets[0].stats", "verbose", "targets[0].stats: must be one of off, basic, profile"),
        ("targets[0].type", "gemini", "targets[0].type: must be one of local, openai"),
        ("targets[0].model", _DELETE, "targets[0].model: is required"),
        ("targets[0].api_key_env", "X", "targets[0].api_key_env: unknown field"),
        (
            "targets[0].runtime",
            {"context": {"n_ctx": 2}},
            "targets[0].runtime: context: ContextRuntimeConfig.n_ctx must be >= 16",
        ),
        ("targets[0].runtime", {"gpu": {}}, "targets[0].runtime: gpu: unknown runtime group"),
        ("targets", [], "targets: needs at least one [[targets]] table"),
        ("management_bind", "0.0.0.0:8080", "management_bind: must differ from public_bind"),
        ("public_bind", "localhost", "public_bind: must be HOST:PORT"),
        ("public_bind", "0.0.0.0:70000", "public_bind: must be HOST:PORT"),
        ("max_request_bytes", 0, "max_request_bytes: must be greater than zero"),
        ("max_concurrent_requests", 0, "max_concurrent_requests: must be greater than zero"),
        ("admin_password_env", _DELETE, "admin_password_env: is required"),
        ("admin_password_env", "   ", "admin_password_env: must be a non-blank string"),
        (
            "admin_password_env",
            "MY-PASSWORD",
            "admin_password_env: must be an environment variable name",
        ),
        ("security", _DELETE, "security: is required"),
        (
            "security.client_ip.source",
            "cookie",
            "security.client_ip.source: must be one of peer, x_forwarded_for, x_real_ip",
        ),
        (
            "security.client_ip.trusted_proxy_cidrs",
            ["10.0.0.0/33"],
            "security.client_ip.trusted_proxy_cidrs[0]: '10.0.0.0/33' is not a CIDR",
        ),
        ("security.rate_limit.burst", 0, "security.rate_limit.burst: must be greater than zero"),
        (
            "security.rate_limit.enabled",
            "yes",
            "security.rate_limit.enabled: must be true or false",
        ),
        (
            "routes.query",
            "v1/query",
            "routes.query: must be an absolute path without query or fragment",
        ),
        (
            "routes.chat",
            "/v1/chat?x=1",
            "routes.chat: must be an absolute path without query or fragment",
        ),
        ("routes.embed", "/v1/query", "routes.embed: duplicates routes.query (/v1/query)"),
        ("routes.metrics", "/healthz", "routes.metrics: duplicates routes.health (/healthz)"),
        ("routes.favicon", "/f", "routes.favicon: unknown field"),
        (
            "tokens[0].targets",
            ["local", "missing"],
            "tokens[0].targets[1]: references unknown target 'missing'",
        ),
        ("tokens[0].env", "bad name", "tokens[0].env: must be an environment variable name"),
        ("tokens[0].caller", _DELETE, "tokens[0].caller: is required"),
        (
            "allowed_origins",
            ["https://app.example.com/path"],
            "allowed_origins[0]: must be an origin",
        ),
        ("listen", "x", "listen: unknown field"),
    ],
)
def test_each_rule_names_its_toml_path(path: str, value: Any, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_with(path, value))
    assert any(p.startswith(expected) for p in info.value.problems), info.value.problems


def test_provider_target_fields_are_type_specific() -> None:
    data = _with(
        "targets",
        [
            {
                "name": "oa",
                "type": "openai",
                "model": "m",
                "api_key_env": "OPENAI_API_KEY",
                "timeout_seconds": 60,
            },
            {
                "name": "cc",
                "type": "openai_compatible",
                "model": "m",
                "base_url": "https://p.example/v1",
                "token_env": "PROVIDER_TOKEN",
                "correlation_header": "x-request-id",
            },
            {
                "name": "an",
                "type": "anthropic",
                "model": "m",
                "api_key_env": "ANTHROPIC_API_KEY",
                "version": "2023-06-01",
            },
        ],
    )
    data["tokens"] = []
    _, cc, an = parse_config(data).targets
    assert isinstance(cc, ProviderTarget) and (cc.secret_env, cc.correlation_header) == (
        "PROVIDER_TOKEN",
        "x-request-id",
    )
    assert isinstance(an, ProviderTarget) and an.version == "2023-06-01"
    bad = copy.deepcopy(data)
    bad["targets"][0]["backend"] = "cuda"
    bad["targets"][1].pop("base_url")
    bad["targets"][2]["timeout_seconds"] = -1
    with pytest.raises(ConfigError) as info:
        parse_config(bad)
    assert "targets[0].backend: is not allowed for type 'openai'" in info.value.problems[0]
    assert any(p.startswith("targets[1].base_url: is required") for p in info.value.problems)
    assert any(
        p.startswith("targets[2].timeout_seconds: must be a positive number")
        for p in info.value.problems
    )


def test_all_problems_are_reported_at_once() -> None:
    data = _with("public_bind", "nope")
    data["targets"][0]["backend"] = "tpu"
    data["routes"]["query"] = "x"
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert len(info.value.problems) == 3


def test_check_cli(tmp_path: Path) -> None:
    good = subprocess.run(
        [
            sys.executable,
            "-m",
            "sipp.cli.gateway",
            "check",
            "--config",
            str(ROOT / "config" / "local.toml"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "SIPP_GATEWAY_TOKEN": ""},
    )
    assert good.returncode == 0 and "ok (1 targets" in good.stdout
    bad_file = tmp_path / "bad.toml"
    bad_file.write_text(
        (ROOT / "config" / "local.toml").read_text().replace('backend = "auto"', 'backend = "tpu"')
    )
    bad = subprocess.run(
        [sys.executable, "-m", "sipp.cli.gateway", "check", "--config", str(bad_file)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1
    assert "error: targets[0].backend: must be one of auto, cpu, cuda, metal, vulkan" in bad.stderr
    assert "Traceback" not in bad.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("public_bind = [")
    out = subprocess.run(
        [sys.executable, "-m", "sipp.cli.gateway", "check", "--config", str(broken)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1 and "not valid TOML" in out.stderr
    missing = subprocess.run(
        [
            sys.executable,
            "-m",
            "sipp.cli.gateway",
            "check",
            "--config",
            str(tmp_path / "none.toml"),
        ],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 1 and "cannot read" in missing.stderr
