"""Bearer tokens: loaded from the env vars the TOML names, compared in constant time
through fixed-length digests, so neither a match nor a token's length shows in timing."""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass

from .._errors import AuthenticationError, AuthorizationError, InvalidConfigError
from .config import TokenConfig

__all__ = ["Caller", "TokenTable", "read_secret", "same_secret", "secret_digest"]


def secret_digest(secret: str) -> bytes:
    """The fixed-length form secrets are kept and compared in."""
    return hashlib.sha256(secret.encode()).digest()


def same_secret(presented: str, digest: bytes) -> bool:
    """Constant time whatever `presented`'s length: `compare_digest` on unequal lengths
    returns early, so both sides are compared as SHA-256 digests."""
    return hmac.compare_digest(secret_digest(presented), digest)


def read_secret(
    env: Mapping[str, str], name: str, what: str, *, no_whitespace: bool = False
) -> str:
    """The value of env var `name`, or a clear startup error (never echoing the value)."""
    value = env.get(name)
    if value is None:
        raise InvalidConfigError(f"{what}: environment variable {name} is not set")
    if not value.strip():
        raise InvalidConfigError(f"{what}: environment variable {name} is blank")
    if no_whitespace and any(c.isspace() for c in value):
        raise InvalidConfigError(f"{what}: environment variable {name} contains whitespace")
    return value


@dataclass(frozen=True)
class Caller:
    label: str
    targets: frozenset[str]  # empty = every target

    def may_use(self, target: str) -> bool:
        return not self.targets or target in self.targets


class TokenTable:
    def __init__(
        self, tokens: tuple[TokenConfig, ...], env: Mapping[str, str] | None = None
    ) -> None:
        source = os.environ if env is None else env
        self._entries: list[tuple[bytes, Caller]] = []
        for i, token in enumerate(tokens):
            value = read_secret(
                source, token.env, f"tokens[{i}] ({token.caller})", no_whitespace=True
            )
            self._entries.append(
                (secret_digest(value), Caller(token.caller, frozenset(token.targets)))
            )
        self.callers = [caller for _, caller in self._entries]

    def authenticate(self, authorization: str | None) -> Caller:
        if not authorization:
            raise AuthenticationError("missing bearer token (Authorization: Bearer <token>)")
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer" or not value or " " in value.strip():
            raise AuthenticationError("malformed Authorization header; expected 'Bearer <token>'")
        presented = value.strip()
        found: Caller | None = None
        # Compare against every token so timing reveals neither a match nor which one.
        for digest, caller in self._entries:
            if same_secret(presented, digest) and found is None:
                found = caller
        if found is None:
            raise AuthenticationError("invalid bearer token")
        return found

    @staticmethod
    def authorize(caller: Caller, target: str) -> None:
        if not caller.may_use(target):
            raise AuthorizationError("token is not allowed to access target")
