"""Device-change signals: a session used from another user agent or address than Kratos
recorded is recorded once per change, and refused with BRIDGE_ON_DEVICE_CHANGE=deny
(real Kratos, both stores)."""

from __future__ import annotations

import pytest

from bridge.config import load_settings
from bridge.pipeline.devices import client_address
from bridge.web.request import HeaderView
from tests.conftest import store_of
from tests.support import kratos_flows as flows
from tests.support.harness import forwarded, wait_until

FORWARDED = forwarded()


def ask(client, token, user_agent, **headers):
    headers = {**FORWARDED, "X-Session-Token": token, "User-Agent": user_agent, **headers}
    return client.get("/forward-auth", headers=headers)


def kratos_user_agent(kratos, user) -> str:
    return flows.session_of(kratos, token=user.token).json()["devices"][0]["user_agent"]


def test_a_new_user_agent_is_recorded_once_per_session_and_change(make_client, kratos):
    client = make_client(kratos)
    store = store_of(client)
    user = flows.register(kratos)
    recorded_ua = kratos_user_agent(kratos, user)
    assert ask(client, user.token, recorded_ua).status_code == 200
    for _ in range(5):
        assert ask(client, user.token, "Evil/1.0").status_code == 200  # record: allowed
    wait_until(lambda: len(store.device_changes()) == 1, 5, "the signal")
    ask(client, user.token, "Other/2.0")
    wait_until(lambda: len(store.device_changes()) == 2, 5, "the second signal")
    ask(client, user.token, "Evil/1.0")
    changes = [fields for _, fields in store.device_changes()]
    assert len(changes) == 2
    first = changes[0]
    whoami = client.get("/whoami", headers={"X-Session-Token": user.token}).get_json()
    assert first["session_id"] == whoami["session_id"]
    assert first["identity_id"] == user.identity_id
    assert (first["old_user_agent"], first["new_user_agent"]) == (recorded_ua, "Evil/1.0")
    assert first["seen_at"].endswith("Z")


def test_deny_refuses_another_device_and_still_records_it(make_client, kratos):
    client = make_client(kratos, BRIDGE_ON_DEVICE_CHANGE="deny")
    user = flows.register(kratos)
    assert ask(client, user.token, kratos_user_agent(kratos, user)).status_code == 200
    refused = ask(client, user.token, "Evil/1.0")
    assert refused.status_code == 403
    assert refused.get_json()["error"] == "device_changed"
    assert "X-User-Id" not in refused.headers
    wait_until(lambda: len(store_of(client).device_changes()) == 1, 5, "the signal")


@pytest.mark.parametrize("user_agent", [None, ""], ids=["missing", "empty"])
def test_deny_counts_a_user_agent_left_out_as_a_change(make_client, kratos, user_agent):
    """Leaving the header out must not be a way around ``deny``: Kratos recorded one."""
    client = make_client(kratos, BRIDGE_ON_DEVICE_CHANGE="deny")
    user = flows.register(kratos)
    recorded_ua = kratos_user_agent(kratos, user)
    assert recorded_ua  # what the test is about: Kratos has a user agent on record
    assert ask(client, user.token, recorded_ua).status_code == 200
    headers = {**FORWARDED, "X-Session-Token": user.token}
    if user_agent is None:
        client.environ_base.pop("HTTP_USER_AGENT")  # the Flask test client's own
    else:
        headers["User-Agent"] = user_agent
    refused = client.get("/forward-auth", headers=headers)
    assert refused.status_code == 403
    assert refused.get_json()["error"] == "device_changed"
    assert "X-User-Id" not in refused.headers
    wait_until(lambda: len(store_of(client).device_changes()) == 1, 5, "the signal")
    change = store_of(client).device_changes()[0][1]
    assert (change["old_user_agent"], change["new_user_agent"]) == (recorded_ua, "")


def test_off_records_nothing(make_client, kratos):
    client = make_client(kratos, BRIDGE_ON_DEVICE_CHANGE="off")
    user = flows.register(kratos)
    assert ask(client, user.token, "Evil/1.0").status_code == 200
    assert store_of(client).device_changes() == []


def test_the_address_counts_only_through_trusted_proxies(make_client, kratos):
    client = make_client(kratos, BRIDGE_TRUSTED_PROXIES="127.0.0.0/8")
    store = store_of(client)
    user = flows.register(kratos)
    same_ua = kratos_user_agent(kratos, user)
    # The test client's peer is 127.0.0.1, a trusted proxy: X-Forwarded-For names the client.
    assert ask(client, user.token, same_ua, **{"X-Forwarded-For": "127.0.0.1"}).status_code == 200
    assert ask(client, user.token, same_ua, **{"X-Forwarded-For": "203.0.113.9"}).status_code == 200
    wait_until(lambda: len(store.device_changes()) == 1, 5, "the signal")
    change = store.device_changes()[0][1]
    assert (change["old_ip"], change["new_ip"]) == ("127.0.0.1", "203.0.113.9")


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "trusted", "client"),
    [
        ("10.0.0.2", "198.51.100.7", "10.0.0.0/8", "198.51.100.7"),
        ("10.0.0.2", "203.0.113.1, 198.51.100.7, 10.0.0.3", "10.0.0.0/8", "198.51.100.7"),
        ("198.51.100.9", "203.0.113.1", "10.0.0.0/8", "198.51.100.9"),  # untrusted peer
        ("10.0.0.2", "not-an-address", "10.0.0.0/8", None),
        ("10.0.0.2", "10.0.0.4", "10.0.0.0/8", None),  # only proxies: no client known
        ("10.0.0.2", "198.51.100.7", None, None),  # no trusted proxies: unknown
        ("::ffff:10.0.0.2", "198.51.100.7", "10.0.0.0/8", "198.51.100.7"),  # dual-stack peer
        ("10.0.0.2", "198.51.100.7:555", "10.0.0.0/8", "198.51.100.7"),  # a hop with a port
        ("10.0.0.2", "[2001:DB8::1]:80", "10.0.0.0/8", "2001:db8::1"),
        ("10.0.0.2", "::ffff:198.51.100.7", "10.0.0.0/8", "198.51.100.7"),
    ],
)
def test_client_address_is_the_last_untrusted_hop(peer, forwarded_for, trusted, client):
    networks = (
        load_settings({"BRIDGE_TRUSTED_PROXIES": trusted}).trusted_proxies if trusted else None
    )
    headers = HeaderView([("x-forwarded-for", forwarded_for)], peer)
    assert client_address(headers, networks) == client
