"""Gateway TOML -> frozen `GatewayConfig`, with every error naming its TOML path.

Pure validation: no env reads, no model loads, no network, no binds; that is
what `sipp-gateway check` runs. All problems are collected, not just the first,
so one `check` run lists everything to fix.
"""

from __future__ import annotations

import ipaddress
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .._errors import InvalidConfigError
from .._runtime_config import NativeRuntimeConfig, runtime_config_from_mapping
from .cache.config import CacheConfig, check_embedding_targets, parse_cache
from .routing_config import RouteRule, parse_route_rules, routed_names
from .upstreams.policy import RESILIENCE_KEYS, Resilience, check_references, parse_resilience

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "ConfigError",
    "GatewayConfig",
    "LimitConfig",
    "LocalTarget",
    "ProviderTarget",
    "Routes",
    "SecurityConfig",
    "StateConfig",
    "TokenConfig",
    "load_config",
    "parse_config",
]

BACKENDS = ("auto", "cpu", "cuda", "metal", "vulkan")
MAX_EMBEDDING_INPUTS = 2048  # per /v1/embeddings request, as OpenAI's own API allows
STATS = ("off", "basic", "profile")
ON_UNAVAILABLE = ("fail_open", "fail_closed")
RESERVE_OUTPUT_TOKENS = 1024  # reserved per choice for a request that does not set max_tokens
LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "tokens_per_day", "on_unavailable")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HOSTNAME = re.compile(r"^[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?$")
_HEADER = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


class ConfigError(InvalidConfigError):
    """One or more TOML problems; `problems` lists each as `path: rule`."""

    def __init__(self, problems: Sequence[str], source: str = "config") -> None:
        self.problems = list(problems)
        super().__init__(f"{source}: " + "; ".join(self.problems))


@dataclass(frozen=True)
class Routes:
    query: str = "/v1/query"
    chat: str = "/v1/chat"
    embed: str = "/v1/embed"
    index: str | None = None
    health: str | None = None
    readiness: str | None = None
    metrics: str | None = None
    admin: str | None = None


@dataclass(frozen=True)
class SecurityConfig:
    client_ip_source: Literal["peer", "x_forwarded_for", "x_real_ip"] = "peer"
    trusted_proxy_cidrs: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    rate_limit_enabled: bool = False
    requests_per_minute: int = 60
    burst: int = 60


@dataclass(frozen=True)
class LimitConfig:
    """The limits of one caller label or one target (`[tokens.limits]`, `[targets.limits]`);
    None = not limited. `on_unavailable` None = `[state].on_unavailable`."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None  # input + output
    tokens_per_day: int | None = None  # a budget per UTC day
    on_unavailable: Literal["fail_open", "fail_closed"] | None = None


@dataclass(frozen=True)
class StateConfig:
    """Where limits keep their counts: this process, or a Redis every replica shares."""

    backend: Literal["memory", "redis"] = "memory"
    url_env: str | None = None  # the variable holding the Redis URL (it may hold a password)
    on_unavailable: Literal["fail_open", "fail_closed"] = "fail_open"
    key_prefix: str = "sipp"


@dataclass(frozen=True)
class TokenConfig:
    env: str
    caller: str
    targets: tuple[str, ...]  # empty = every target
    limits: LimitConfig | None = None


@dataclass(frozen=True)
class LocalTarget:
    name: str
    model: Path
    backend: str = "auto"
    stats: str = "basic"
    runtime: NativeRuntimeConfig = field(default_factory=NativeRuntimeConfig)
    type: Literal["local"] = "local"
    limits: LimitConfig | None = None
    resilience: Resilience = field(default_factory=Resilience)
    cache: CacheConfig | None = None
    image_url_hosts: tuple[str, ...] = ()  # hosts the gateway may fetch image URLs from


@dataclass(frozen=True)
class ProviderTarget:
    name: str
    type: Literal["openai", "openai_compatible", "anthropic"]
    model: str
    secret_env: str | None  # api_key_env / token_env
    base_url: str | None = None
    timeout_seconds: float | None = None
    correlation_header: str | None = None
    version: str | None = None
    limits: LimitConfig | None = None
    resilience: Resilience = field(default_factory=Resilience)
    cache: CacheConfig | None = None


@dataclass(frozen=True)
class GatewayConfig:
    public_bind: tuple[str, int]
    management_bind: tuple[str, int]
    max_request_bytes: int
    max_concurrent_requests: int | None
    allowed_origins: tuple[str, ...]
    admin_password_env: str
    security: SecurityConfig
    routes: Routes
    tokens: tuple[TokenConfig, ...]
    targets: tuple[LocalTarget | ProviderTarget, ...]
    max_embedding_inputs: int = MAX_EMBEDDING_INPUTS
    state: StateConfig = StateConfig()
    reserve_output_tokens: int = RESERVE_OUTPUT_TOKENS
    # `[[route_rules]]` by the public name they match, in file order
    route_rules: Mapping[str, tuple[RouteRule, ...]] = field(default_factory=dict)


def load_config(path: str | Path) -> GatewayConfig:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"cannot read {path}: {exc.strerror}"], str(path)) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError([f"not valid TOML: {exc}"], str(path)) from None
    return parse_config(data, source=str(path))


def parse_config(data: Mapping[str, Any], *, source: str = "config") -> GatewayConfig:
    p = _Parser()
    config = p.config(data)
    if p.problems:
        raise ConfigError(p.problems, source)
    assert config is not None
    return config


class _Parser:
    def __init__(self) -> None:
        self.problems: list[str] = []
        self.state_backend = "memory"  # what [state] says, once read (a cache may need Redis)

    def fail(self, path: str, rule: str) -> None:
        self.problems.append(f"{path}: {rule}")

    # -- scalars --------------------------------------------------------------------
    def keys(self, table: Mapping[str, Any], path: str, allowed: Sequence[str]) -> None:
        for key in table:
            if key not in allowed:
                where = f"{path}.{key}" if path else key
                self.fail(where, f"unknown field; valid fields are {', '.join(allowed)}")

    def string(
        self, table: Mapping[str, Any], key: str, path: str, *, required: bool = True
    ) -> str | None:
        where = f"{path}.{key}" if path else key
        if key not in table:
            if required:
                self.fail(where, "is required")
            return None
        value = table[key]
        if not isinstance(value, str) or not value.strip():
            self.fail(where, "must be a non-blank string")
            return None
        return value

    def integer(
        self, table: Mapping[str, Any], key: str, path: str, default: int | None, minimum: int
    ) -> int | None:
        where = f"{path}.{key}" if path else key
        if key not in table:
            return default
        value = table[key]
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(where, "must be an integer")
            return default
        if value < minimum:
            self.fail(
                where, f"must be >= {minimum}" if minimum != 1 else "must be greater than zero"
            )
            return default
        return value

    def choice(
        self, table: Mapping[str, Any], key: str, path: str, choices: Sequence[str], default: str
    ) -> str:
        value = table.get(key, default)
        if value not in choices:
            self.fail(f"{path}.{key}", f"must be one of {', '.join(choices)}")
            return default
        return str(value)

    def env_name(
        self, table: Mapping[str, Any], key: str, path: str, *, required: bool = True
    ) -> str | None:
        value = self.string(table, key, path, required=required)
        if value is not None and not _ENV_NAME.match(value):
            self.fail(
                f"{path}.{key}" if path else key,
                "must be an environment variable name (letters, digits, _)",
            )
            return None
        return value

    def bind(self, table: Mapping[str, Any], key: str) -> tuple[str, int] | None:
        value = self.string(table, key, "")
        if value is None:
            return None
        host, sep, port = value.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            self.fail(key, "must be HOST:PORT with a port between 1 and 65535")
            return None
        return host, int(port)

    def route(self, table: Mapping[str, Any], key: str, default: str | None) -> str | None:
        if key not in table:
            return default
        value = table[key]
        if (
            not isinstance(value, str)
            or not value.startswith("/")
            or "?" in value
            or "#" in value
            or " " in value
        ):
            self.fail(f"routes.{key}", "must be an absolute path without query or fragment")
            return default
        return value

    # -- sections ---------------------------------------------------------------------
    def config(self, data: Mapping[str, Any]) -> GatewayConfig | None:
        top = (
            "public_bind",
            "management_bind",
            "max_request_bytes",
            "max_concurrent_requests",
            "allowed_origins",
            "admin_password_env",
            "security",
            "limits",
            "state",
            "routes",
            "route_rules",
            "tokens",
            "targets",
        )
        self.keys(data, "", top)
        public = self.bind(data, "public_bind")
        management = self.bind(data, "management_bind")
        if public and management and public == management:
            self.fail("management_bind", "must differ from public_bind")
        max_bytes = self.integer(data, "max_request_bytes", "", 1 << 20, 1)
        max_conc = self.integer(data, "max_concurrent_requests", "", None, 1)
        origins = self.origins(data.get("allowed_origins", []))
        admin_env = self.env_name(data, "admin_password_env", "")
        security = self.security(data)
        max_inputs, reserve_output = self.limits(data.get("limits", {}))
        state = self.state(data.get("state", {}))
        self.state_backend = state.backend
        routes = self.routes(data.get("routes", {}))
        targets = self.targets(data.get("targets"))
        check_embedding_targets(self, targets)
        raw_rules = data.get("route_rules", [])
        # a token's allowlist may name a routed name as well as a target
        tokens = self.tokens(
            data.get("tokens", []), {t.name for t in targets} | routed_names(raw_rules)
        )
        route_rules = parse_route_rules(self, raw_rules, targets, tokens)
        if self.problems or public is None or management is None or admin_env is None:
            return None
        return GatewayConfig(
            public,
            management,
            max_bytes or 1 << 20,
            max_conc,
            origins,
            admin_env,
            security,
            routes,
            tokens,
            targets,
            max_inputs,
            state,
            reserve_output,
            route_rules,
        )

    def limits(self, table: Any) -> tuple[int, int]:
        if not isinstance(table, Mapping):
            self.fail("limits", "must be a table")
            return MAX_EMBEDDING_INPUTS, RESERVE_OUTPUT_TOKENS
        self.keys(table, "limits", ("max_embedding_inputs", "reserve_output_tokens"))
        value = self.integer(table, "max_embedding_inputs", "limits", MAX_EMBEDDING_INPUTS, 1)
        reserve = self.integer(table, "reserve_output_tokens", "limits", RESERVE_OUTPUT_TOKENS, 1)
        return value or MAX_EMBEDDING_INPUTS, reserve or RESERVE_OUTPUT_TOKENS

    def state(self, table: Any) -> StateConfig:
        if not isinstance(table, Mapping):
            self.fail("state", "must be a table")
            return StateConfig()
        self.keys(table, "state", ("backend", "url_env", "on_unavailable", "key_prefix"))
        backend = self.choice(table, "backend", "state", ("memory", "redis"), "memory")
        url_env = self.env_name(table, "url_env", "state", required=backend == "redis")
        if backend == "memory" and url_env is not None:
            self.fail("state.url_env", 'is only read with backend = "redis"')
        policy = self.choice(table, "on_unavailable", "state", ON_UNAVAILABLE, "fail_open")
        prefix = self.string(table, "key_prefix", "state", required=False) or "sipp"
        return StateConfig(backend, url_env, policy, prefix)  # type: ignore[arg-type]

    def limit_table(self, table: Mapping[str, Any], path: str) -> LimitConfig | None:
        """`path.limits`, or None when the table is absent or sets no limit."""
        if "limits" not in table:
            return None
        raw, where = table["limits"], f"{path}.limits"
        if not isinstance(raw, Mapping):
            self.fail(where, "must be a table")
            return None
        self.keys(raw, where, LIMIT_FIELDS)
        rpm = self.integer(raw, "requests_per_minute", where, None, 1)
        tpm = self.integer(raw, "tokens_per_minute", where, None, 1)
        tpd = self.integer(raw, "tokens_per_day", where, None, 1)
        policy = None
        if "on_unavailable" in raw:
            policy = self.choice(raw, "on_unavailable", where, ON_UNAVAILABLE, "fail_open")
        if rpm is None and tpm is None and tpd is None:
            if policy is not None:
                self.fail(f"{where}.on_unavailable", "applies to no limit; set one first")
            return None
        return LimitConfig(rpm, tpm, tpd, policy)  # type: ignore[arg-type]

    def origins(self, value: Any) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(o, str) for o in value):
            self.fail("allowed_origins", "must be an array of origin strings")
            return ()
        for i, origin in enumerate(value):
            if not re.match(r"^https?://[^/?#\s]+$", origin):
                self.fail(
                    f"allowed_origins[{i}]",
                    "must be an origin like https://app.example.com (no path)",
                )
        return tuple(value)

    def security(self, data: Mapping[str, Any]) -> SecurityConfig:
        table = data.get("security")
        if not isinstance(table, Mapping):
            self.fail("security", "is required ([security.client_ip] and [security.rate_limit])")
            return SecurityConfig()
        self.keys(table, "security", ("client_ip", "rate_limit"))
        client = table.get("client_ip", {})
        limit = table.get("rate_limit", {})
        if not isinstance(client, Mapping) or not isinstance(limit, Mapping):
            self.fail("security", "client_ip and rate_limit must be tables")
            return SecurityConfig()
        self.keys(client, "security.client_ip", ("source", "trusted_proxy_cidrs"))
        self.keys(limit, "security.rate_limit", ("enabled", "requests_per_minute", "burst"))
        source = self.choice(
            client, "source", "security.client_ip", ("peer", "x_forwarded_for", "x_real_ip"), "peer"
        )
        cidrs = []
        raw_cidrs = client.get("trusted_proxy_cidrs", [])
        if not isinstance(raw_cidrs, list):
            self.fail("security.client_ip.trusted_proxy_cidrs", "must be an array of CIDR strings")
            raw_cidrs = []
        for i, cidr in enumerate(raw_cidrs):
            try:
                cidrs.append(ipaddress.ip_network(cidr, strict=False))
            except (ValueError, TypeError):
                self.fail(f"security.client_ip.trusted_proxy_cidrs[{i}]", f"{cidr!r} is not a CIDR")
        enabled = limit.get("enabled", False)
        if not isinstance(enabled, bool):
            self.fail("security.rate_limit.enabled", "must be true or false")
            enabled = False
        rpm = self.integer(limit, "requests_per_minute", "security.rate_limit", 60, 1) or 60
        burst = self.integer(limit, "burst", "security.rate_limit", 60, 1) or 60
        return SecurityConfig(source, tuple(cidrs), enabled, rpm, burst)  # type: ignore[arg-type]

    def routes(self, table: Any) -> Routes:
        if isinstance(table, list):
            self.fail("routes", "is the table of paths; routing rules are [[route_rules]]")
            return Routes()
        if not isinstance(table, Mapping):
            self.fail("routes", "must be a table")
            return Routes()
        names = ("query", "chat", "embed", "index", "health", "readiness", "metrics", "admin")
        self.keys(table, "routes", names)
        defaults = Routes()
        values = {name: self.route(table, name, getattr(defaults, name)) for name in names}
        for group in (
            ("query", "chat", "embed"),
            ("index", "health", "readiness", "metrics", "admin"),
        ):
            seen: dict[str, str] = {}
            for name in group:
                route = values[name]
                if route is None:
                    continue
                if route in seen:
                    self.fail(f"routes.{name}", f"duplicates routes.{seen[route]} ({route})")
                seen[route] = name
        return Routes(**values)  # type: ignore[arg-type]

    def tokens(self, value: Any, target_names: set[str]) -> tuple[TokenConfig, ...]:
        if not isinstance(value, list):
            self.fail("tokens", "must be an array of [[tokens]] tables")
            return ()
        out = []
        limited: dict[str, tuple[str, LimitConfig]] = {}  # caller -> (path, its limits)
        for i, table in enumerate(value):
            path = f"tokens[{i}]"
            if not isinstance(table, Mapping):
                self.fail(path, "must be a table")
                continue
            self.keys(table, path, ("env", "caller", "targets", "limits"))
            env = self.env_name(table, "env", path)
            caller = self.string(table, "caller", path)
            allowed = table.get("targets", [])
            if not isinstance(allowed, list) or not all(isinstance(t, str) for t in allowed):
                self.fail(f"{path}.targets", "must be an array of target names")
                allowed = []
            for j, name in enumerate(allowed):
                if name not in target_names:
                    self.fail(f"{path}.targets[{j}]", f"references unknown target {name!r}")
            limits = self.limit_table(table, path)
            if limits is not None and caller is not None:
                # Limits count per caller label: two tables of one label must not disagree.
                seen = limited.setdefault(caller, (path, limits))
                if seen[1] != limits:
                    self.fail(
                        f"{path}.limits", f"differs from {seen[0]}.limits of caller {caller!r}"
                    )
            if env and caller:
                out.append(TokenConfig(env, caller, tuple(allowed), limits))
        return tuple(out)

    def targets(self, value: Any) -> tuple[LocalTarget | ProviderTarget, ...]:
        if not isinstance(value, list) or not value:
            self.fail("targets", "needs at least one [[targets]] table")
            return ()
        out: list[LocalTarget | ProviderTarget] = []
        names: set[str] = set()
        paths: dict[str, str] = {}
        for i, table in enumerate(value):
            path = f"targets[{i}]"
            if not isinstance(table, Mapping):
                self.fail(path, "must be a table")
                continue
            name = self.string(table, "name", path)
            if name is not None:
                if name in names:
                    self.fail(f"{path}.name", f"duplicates another target named {name!r}")
                names.add(name)
            kind = table.get("type")
            target: LocalTarget | ProviderTarget | None
            if kind == "local":
                target = self.local_target(table, path, name)
            elif kind in ("openai", "openai_compatible", "anthropic"):
                target = self.provider_target(table, path, name, kind)
            else:
                self.fail(
                    f"{path}.type", "must be one of local, openai, openai_compatible, anthropic"
                )
                continue
            if target is not None:
                out.append(target)
                paths.setdefault(target.name, path)
        check_references(self, [(paths[t.name], t.name, t.resilience) for t in out])
        return tuple(out)

    def local_target(
        self, table: Mapping[str, Any], path: str, name: str | None
    ) -> LocalTarget | None:
        self.keys(
            table,
            path,
            (
                "name",
                "type",
                "model",
                "backend",
                "stats",
                "runtime",
                "limits",
                "cache",
                "image_url_hosts",
                *RESILIENCE_KEYS,
            ),
        )
        hosts = table.get("image_url_hosts", [])
        if not isinstance(hosts, list) or not all(
            isinstance(h, str) and _HOSTNAME.match(h) for h in hosts
        ):
            self.fail(f"{path}.image_url_hosts", "must be an array of host names (no scheme)")
            hosts = []
        model = self.string(table, "model", path)
        backend = self.choice(table, "backend", path, BACKENDS, "auto")
        stats = self.choice(table, "stats", path, STATS, "basic")
        runtime = NativeRuntimeConfig()
        if "runtime" in table:
            try:
                runtime = runtime_config_from_mapping(table["runtime"])
            except InvalidConfigError as exc:
                self.fail(f"{path}.runtime", exc.message)
        limits = self.limit_table(table, path)
        resilience = parse_resilience(self, table, path, "local")
        cache = parse_cache(self, table, path, self.state_backend)
        if name is None or model is None:
            return None
        return LocalTarget(
            name,
            Path(model),
            backend,
            stats,
            runtime,
            limits=limits,
            resilience=resilience,
            cache=cache,
            image_url_hosts=tuple(h.lower() for h in hosts),
        )

    def provider_target(
        self, table: Mapping[str, Any], path: str, name: str | None, kind: str
    ) -> ProviderTarget | None:
        fields = {
            "openai": (
                "name",
                "type",
                "model",
                "api_key_env",
                "base_url",
                "timeout_seconds",
                "limits",
            ),
            "openai_compatible": (
                "name",
                "type",
                "model",
                "base_url",
                "token_env",
                "correlation_header",
                "timeout_seconds",
                "limits",
            ),
            "anthropic": (
                "name",
                "type",
                "model",
                "api_key_env",
                "base_url",
                "version",
                "timeout_seconds",
                "limits",
            ),
        }[kind] + ("cache", *RESILIENCE_KEYS)
        for key in table:
            if key not in fields:
                self.fail(
                    f"{path}.{key}",
                    f"is not allowed for type {kind!r}; valid fields are {', '.join(fields)}",
                )
        model = self.string(table, "model", path)
        secret_key = "token_env" if kind == "openai_compatible" else "api_key_env"
        resilience = parse_resilience(self, table, path, kind)
        pooled = "deployments" in table
        for key in (secret_key, "base_url"):
            if pooled and key in table:
                self.fail(f"{path}.{key}", "is set per deployment when deployments are listed")
        if pooled and kind != "openai_compatible":
            for j, dep in enumerate(resilience.deployments):
                if dep.target is None and dep.secret_env is None:
                    self.fail(f"{path}.deployments[{j}].{secret_key}", "is required")
        # A local vLLM or llama-server often takes no key: token_env is optional there.
        secret = self.env_name(
            table, secret_key, path, required=kind != "openai_compatible" and not pooled
        )
        base_url = self.string(
            table, "base_url", path, required=kind == "openai_compatible" and not pooled
        )
        if base_url is not None and not re.match(r"^https?://[^\s/?#]+(/[^\s?#]*)?$", base_url):
            self.fail(
                f"{path}.base_url", "must be an absolute http(s) URL without query or fragment"
            )
        timeout = table.get("timeout_seconds")
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0
        ):
            self.fail(f"{path}.timeout_seconds", "must be a positive number")
            timeout = None
        header = self.string(table, "correlation_header", path, required=False)
        if header is not None and not _HEADER.match(header):
            self.fail(f"{path}.correlation_header", "must be a valid HTTP header name")
        version = self.string(table, "version", path, required=False)
        limits = self.limit_table(table, path)
        cache = parse_cache(self, table, path, self.state_backend)
        if name is None or model is None:
            return None
        return ProviderTarget(
            name,
            kind,  # type: ignore[arg-type]
            model,
            secret,
            base_url,
            timeout,
            header,
            version,
            limits=limits,
            resilience=resilience,
            cache=cache,
        )
