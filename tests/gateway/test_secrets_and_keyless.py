"""Secrets compared as fixed-length digests; `openai_compatible` targets without a key;
the `[limits]` table; how the CLI reports config problems."""

from __future__ import annotations

import copy
import hmac
import os
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from sipp import AuthenticationError
from sipp.gateway import auth
from sipp.gateway.admin import AdminState
from sipp.gateway.auth import TokenTable
from sipp.gateway.config import ConfigError, TokenConfig, parse_config

from .test_config import BASE
from .test_server import TOKEN, running_gateway
from .upstreams import CountingUpstream, add_targets, text_reply

SHORT, LONG = "tok-a", "tok-" + "b" * 300


def test_same_secret_compares_digests_of_any_length() -> None:
    digest = auth.secret_digest(SHORT)
    assert len(digest) == 32 and auth.same_secret(SHORT, digest)
    for other in ["", "tok-", "tok-ab", SHORT.upper(), LONG, "x" * 10_000]:
        assert not auth.same_secret(other, digest)


def test_tokens_and_the_admin_password_go_through_fixed_length_digests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:  # records what was compared, then compares it
        seen.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    table = TokenTable(
        (TokenConfig("T_SHORT", "short", ()), TokenConfig("T_LONG", "long", ())),
        env={"T_SHORT": SHORT, "T_LONG": LONG},
    )
    assert table.authenticate(f"Bearer {SHORT}").label == "short"
    assert table.authenticate(f"Bearer {LONG}").label == "long"
    for wrong in ["t", "tok-b", LONG + "c", "z" * 5000]:
        with pytest.raises(AuthenticationError):
            table.authenticate(f"Bearer {wrong}")
    admin = AdminState("the-admin-password")
    assert admin.check_password("the-admin-password")
    assert not admin.check_password("p")
    assert not admin.check_password("p" * 4096)
    assert len(seen) == 2 * 6 + 3  # every token against every presented value, 3 passwords
    assert set(seen) == {(32, 32)}  # never the secrets' own (differing) lengths


def test_openai_compatible_token_env_is_optional_other_keys_are_not() -> None:
    data = copy.deepcopy(BASE)
    data["tokens"] = []
    data["targets"] = [
        {"name": "vllm", "type": "openai_compatible", "model": "m", "base_url": "http://h/v1"},
        {"name": "oa", "type": "openai", "model": "m"},
    ]
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.problems == ["targets[1].api_key_env: is required"]
    del data["targets"][1]
    assert parse_config(data).targets[0].secret_env is None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "limits, problem",
    [
        ({"max_embedding_inputs": 0}, "limits.max_embedding_inputs: must be greater than zero"),
        ({"max_embedding_inputs": "9"}, "limits.max_embedding_inputs: must be an integer"),
        ({"max_inputs": 3}, "limits.max_inputs: unknown field; valid fields are"),
        ([], "limits: must be a table"),
    ],
)
def test_limits_table_is_checked(limits: object, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({**copy.deepcopy(BASE), "limits": limits})
    assert len(info.value.problems) == 1 and info.value.problems[0].startswith(problem)


def test_limits_default_and_setting() -> None:
    assert parse_config(copy.deepcopy(BASE)).max_embedding_inputs == 2048
    data = {**copy.deepcopy(BASE), "limits": {"max_embedding_inputs": 16}}
    assert parse_config(data).max_embedding_inputs == 16


def test_a_keyless_openai_compatible_target_sends_no_authorization(
    smollm_path: Path, tmp_path: Path
) -> None:
    with CountingUpstream(text_reply) as upstream:

        def edit(toml: str) -> str:
            return add_targets(toml, upstream.url, {"vllm": "served-model"}, None)

        with running_gateway(smollm_path, tmp_path, edit) as gw:
            with openai.OpenAI(base_url=gw.public + "/v1", api_key=TOKEN, max_retries=0) as c:
                answer = c.chat.completions.create(
                    model="vllm", messages=[{"role": "user", "content": "hi"}]
                )
            assert answer.choices[0].message.content == "from the provider"
            native = httpx.post(
                f"{gw.public}/v1/query",
                json={"model": "vllm", "prompt": "hi"},
                headers={"authorization": f"Bearer {TOKEN}"},
                timeout=60,
            )
            assert native.json()["text"] == "from the provider"
    sent = [r for r in upstream.requests if r.path.endswith("completions")]
    assert len(sent) == 2
    assert all("authorization" not in r.headers for r in sent)
    assert {r.json()["model"] for r in sent} == {"served-model"}


@pytest.mark.parametrize("command", ["check", "serve"])
def test_cli_prints_each_problem_and_the_count_on_their_own_lines(
    tmp_path: Path, command: str
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        'public_bind = "127.0.0.1:1"\nmanagement_bind = "127.0.0.1:2"\n'
        'admin_password_env = "X"\n[security]\n[limits]\nmax_embedding_inputs = 0\n'
        '[[targets]]\nname = "a"\ntype = "local"\n'
    )
    out = subprocess.run(
        [sys.executable, "-m", "sipp.cli.gateway", command, "--config", str(bad)],
        capture_output=True,
        text=True,
        env={**os.environ, "X": "pw"},
    )
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr == (
        "error: limits.max_embedding_inputs: must be greater than zero\n"
        "error: targets[0].model: is required\n"
        f"{bad}: 2 problem(s)\n"
    )
