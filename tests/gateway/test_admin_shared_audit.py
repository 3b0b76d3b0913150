"""The admin audit list shared by replicas through a real redis-server (`[state] backend =
"redis"`): an edit made on one replica is listed by every replica's `/api/audit`, naming
the replica that made it, and with Redis gone the list still answers, marked partial."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import httpx
import pytest

from sipp._errors import InvalidConfigError
from sipp.gateway.admin import admin_state

from ..remote.loopback import LoopbackServer
from .admin_gateways import PASSWORD, admin_gateway, login, ups, upstream
from .pool_upstreams import Deployment
from .redis_server import running_redis
from .test_server import ENV
from .upstreams import poll

__all__ = ["ups", "upstream"]  # fixtures shared with the other admin tests

STATE = 'backend = "redis"\nurl_env = "TEST_REDIS_URL"\nkey_prefix = "audited"'


def _audit(client: httpx.Client) -> dict[str, Any]:
    r = client.get("/admin/api/audit")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def test_an_edit_on_one_replica_is_in_every_replicas_audit(
    tmp_path: Path, upstream: LoopbackServer, ups: dict[str, Deployment]
) -> None:
    with running_redis(tmp_path) as redis:
        env = {"TEST_REDIS_URL": redis.url}
        named = {**env, "SIPP_GATEWAY_REPLICA_ID": "replica-a"}
        with (
            admin_gateway(tmp_path, upstream, ups, STATE, named, name="a") as a,
            admin_gateway(tmp_path, upstream, ups, STATE, env, name="b") as b,
        ):
            client_b, _ = login(b)
            client_a, csrf_a = login(a)
            r = client_a.post(
                "/admin/api/controls/block", json={"ip": "203.0.113.9"}, headers=csrf_a
            )
            assert r.status_code == 200, r.text
            edit = {"target": "primary", "fallbacks": ["spare2"]}
            r = client_a.post("/admin/api/controls/fallbacks", json=edit, headers=csrf_a)
            assert r.status_code == 200, r.text

            seen = _audit(client_b)
            entries = seen["entries"]
            # newest first: A's two edits, A's login, then B's login
            assert [e["action"] for e in entries] == ["fallbacks", "block", "login", "login"]
            assert seen["partial"] is False
            assert [e["replica"] for e in entries[:3]] == ["replica-a"] * 3
            port = b.public.rsplit(":", 1)[1]
            assert entries[3]["replica"] == f"{socket.gethostname()}:{port}"
            assert entries[1]["ip"] == "203.0.113.9"
            assert entries[0]["target"] == "primary" and entries[0]["fallbacks"] == "spare2"
            assert entries[0]["session"] == entries[1]["session"] != entries[3]["session"]
            assert _audit(client_a)["entries"] == entries  # the same list on both replicas

            # No secret in any entry: not the password, a token, a session cookie or CSRF.
            raw = client_b.get("/admin/api/audit").text
            cookies = [c.value for c in (*client_a.cookies.jar, *client_b.cookies.jar)]
            for secret in (PASSWORD, *ENV.values(), *cookies, *csrf_a.values()):
                assert secret not in raw
            for cookie in cookies:
                assert cookie[:8] not in raw


def test_with_redis_gone_the_audit_answers_partial_then_catches_up(
    tmp_path: Path, upstream: LoopbackServer, ups: dict[str, Deployment]
) -> None:
    with running_redis(tmp_path) as redis:
        env = {"TEST_REDIS_URL": redis.url}
        with admin_gateway(tmp_path, upstream, ups, STATE, env) as gw:
            client, csrf = login(gw)
            redis.stop()
            # A control of this replica alone still works; its entry is kept here.
            r = client.post(
                "/admin/api/controls/max_concurrent_requests", json={"value": 7}, headers=csrf
            )
            assert r.status_code == 200, r.text
            seen = _audit(client)
            assert seen["partial"] is True and "Redis" in seen["reason"]
            assert [e["action"] for e in seen["entries"]] == ["max_concurrent_requests", "login"]
            assert seen["entries"][0]["value"] == 7
            for _ in range(3):  # the dashboard polls: each read tries Redis again
                assert _audit(client)["partial"] is True

            redis.start()  # an empty Redis: what was kept here is pushed to it

            def caught_up() -> bool:
                seen = _audit(client)
                actions = [e["action"] for e in seen["entries"]]
                return seen["partial"] is False and actions == ["max_concurrent_requests"]

            poll(caught_up, "the entry kept during the outage reaches Redis")
        # one warning for the outage, however often the list was read during it
        assert gw.stderr.count("kept on this replica until Redis is back") == 1


@pytest.mark.parametrize("value", ["two words", "x" * 65, "a/b"])
def test_a_replica_id_that_could_not_name_an_entry_is_refused(value: str) -> None:
    with pytest.raises(InvalidConfigError, match="SIPP_GATEWAY_REPLICA_ID"):
        admin_state("pw", {"SIPP_GATEWAY_REPLICA_ID": value})
    assert admin_state("pw", {"SIPP_GATEWAY_REPLICA_ID": "eu-1.gw:8080"}).replica == "eu-1.gw:8080"
