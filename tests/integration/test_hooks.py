"""Kratos's web hooks, sent by the real Kratos (with the shipped snippet and Jsonnet) to a
real bridge process on a real Redis: the mirror is written at the moment of an aal2
login, its AAL2 event is recorded once whoever sees the upgrade first, a wrong key is
refused, and a bridge that is down costs no login."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
import yaml

from bridge.sessions.session import upgrade_id
from bridge.store import SessionStore
from bridge.web.app import create_app
from bridge.web.hooks import BadHookBody, read_body
from bridge.wiring import build_store
from tests.conftest import SECRET, bridge_settings
from tests.support import kratos_flows as flows
from tests.support.harness import BridgeServer, Kratos, RedisServer, SlowLink, shut_down, wait_until
from tests.support.proxies import ROOT

HOOK_SECRET = "hook-secret-for-tests-" + "k" * 20
SNIPPET = ROOT / "config" / "kratos" / "bridge-hooks.yml"
JSONNET = ROOT / "config" / "kratos" / "bridge-hook.jsonnet"


class Relay:
    """A TCP relay between Kratos and the bridge, so Kratos's config can name a fixed URL
    while each test starts its own bridge. While ``gate`` is clear, what Kratos sends
    waits in the relay: a hook that arrives late, staged."""

    def __init__(self) -> None:
        self.target_port = 0
        self.gate = threading.Event()
        self.gate.set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
            except OSError:
                client.close()  # the bridge is down
                continue
            server.settimeout(None)
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, gated: bool) -> None:
        try:
            while chunk := source.recv(65536):
                if gated:
                    self.gate.wait()
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            shut_down(source, sink)

    def close(self) -> None:
        self._listener.close()


def hook_config(bridge_url: str, secret: str) -> dict:
    """The shipped snippet with its placeholders filled in."""
    text = (
        SNIPPET.read_text()
        .replace("http://bridge:4480", bridge_url)
        .replace("REPLACE-WITH-BRIDGE_HOOK_SECRET", secret)
        .replace("file:///etc/config/kratos/bridge-hook.jsonnet", JSONNET.as_uri())
    )
    return yaml.safe_load(text)


@pytest.fixture(scope="module")
def relay() -> Iterator[Relay]:
    relay = Relay()
    yield relay
    relay.close()


@pytest.fixture(scope="module")
def hooked_kratos(workdir: Path, relay: Relay) -> Iterator[Kratos]:
    server = Kratos(workdir, extra_config=hook_config(relay.url, HOOK_SECRET))
    yield server
    server.stop()


@pytest.fixture
def start_bridge(hooked_kratos, redis_server: RedisServer, relay: Relay, prefix, workdir):
    """``start_bridge(**env)``: a bridge process that receives Kratos's hooks."""
    started: list[BridgeServer] = []
    relay.gate.set()

    def start(**env: str | None) -> BridgeServer:
        """A ``None`` value leaves the setting out."""
        values = {
            "BRIDGE_KRATOS_PUBLIC_URL": hooked_kratos.public_url,
            "BRIDGE_KRATOS_ADMIN_URL": hooked_kratos.admin_url,
            "BRIDGE_REDIS_URL": redis_server.url,
            "BRIDGE_SECRET": SECRET,
            "BRIDGE_KEY_PREFIX": prefix,
            "BRIDGE_HOOK_SECRET": HOOK_SECRET,
            "BRIDGE_WORKERS": "1",
            **env,
        }
        server = BridgeServer({k: v for k, v in values.items() if v is not None}, workdir)
        started.append(server)
        relay.target_port = server.port
        return server

    yield start
    relay.gate.set()
    for server in started:
        server.stop()


@pytest.fixture
def store(hooked_kratos, redis_server: RedisServer, prefix) -> Iterator[SessionStore]:
    store = build_store(bridge_settings(hooked_kratos, redis_server.url, prefix))
    yield store
    store.close()


def _auth(bridge: BridgeServer, token: str) -> httpx.Response:
    return httpx.get(bridge.url + "/auth", headers={"X-Session-Token": token})


def _session_id(kratos: Kratos, token: str) -> str:
    return flows.session_of(kratos, token=token).json()["id"]


def _totp_upgrade_id(kratos: Kratos, token: str) -> str:
    session = flows.session_of(kratos, token=token).json()
    totp = next(m for m in session["authentication_methods"] if m["aal"] == "aal2")
    return upgrade_id(session["id"], totp["completed_at"])


def _aal1_login_of_a_totp_user(kratos: Kratos) -> tuple[flows.User, str]:
    user = flows.register(kratos)
    flows.enable_totp(kratos, user)
    return user, flows.login_api(kratos, user)


def test_aal2_login_hook_warms_the_mirror_without_a_whoami(
    start_bridge, hooked_kratos, store, redis_server, prefix
):
    bridge = start_bridge(BRIDGE_REVALIDATE_AFTER="30")
    user, token = _aal1_login_of_a_totp_user(hooked_kratos)
    session_id = _session_id(hooked_kratos, token)
    assert _auth(bridge, token).headers["X-User-Aal"] == "aal1"  # the credential, validated

    before = hooked_kratos.whoami_calls()
    flows.upgrade_to_aal2(hooked_kratos, user, token)
    wait_until(lambda: store.load(session_id).aal == "aal2", 5, "the hook's mirror")
    assert hooked_kratos.whoami_calls() == before  # the hook asked the admin API

    # Another bridge process, which never saw this token, answers from the warm mirror.
    other = create_app(
        bridge_settings(hooked_kratos, redis_server.url, prefix, BRIDGE_REVALIDATE_AFTER="30")
    ).test_client(use_cookies=False)
    response = other.get("/auth", headers={"X-Session-Token": token})
    assert response.status_code == 200
    assert response.headers["X-User-Aal"] == "aal2"
    assert hooked_kratos.whoami_calls() == before

    mirrored = store.load(session_id)
    kratos_view = httpx.get(f"{hooked_kratos.admin_url}/admin/sessions/{session_id}").json()
    assert mirrored.kratos["expires_at"] == kratos_view["expires_at"]
    assert [m["method"] for m in mirrored.kratos["authentication_methods"]] == [
        m["method"] for m in kratos_view["authentication_methods"]
    ]


def test_first_factor_login_hook_mirrors_the_session_when_kratos_names_it(
    start_bridge, hooked_kratos, store
):
    """A first-factor login's hook carries the nil session id or, when Kratos (calling in
    the background) builds the body after saving the session, its real id: either
    nothing is mirrored, or the session is, as Kratos saved it. Registration and settings
    hooks carry no session."""
    bridge = start_bridge()
    user = flows.register(hooked_kratos)
    token = flows.login_api(hooked_kratos, user)
    session_id = _session_id(hooked_kratos, token)
    wait_until(lambda: "kratos login hook: " in bridge.log(), 5, "the login hook")
    assert "kratos registration hook: no session to mirror" in bridge.log()
    if "kratos login hook: no session to mirror" in bridge.log():
        assert store.load(session_id) is None
        return
    assert f"kratos login hook: mirrored session {session_id} (aal1)" in bridge.log()
    mirrored = store.load(session_id)
    assert mirrored.aal == "aal1"
    assert mirrored.identity_id == user.identity_id
    kratos_view = httpx.get(f"{hooked_kratos.admin_url}/admin/sessions/{session_id}").json()
    assert mirrored.kratos["expires_at"] == kratos_view["expires_at"]
    assert store.aal2_events() == []


def test_hook_first_then_forward_auth_records_one_aal2_event(start_bridge, hooked_kratos, store):
    bridge = start_bridge(BRIDGE_REVALIDATE_AFTER="1")
    user, token = _aal1_login_of_a_totp_user(hooked_kratos)
    assert _auth(bridge, token).headers["X-User-Aal"] == "aal1"
    assert store.aal2_events() == []

    flows.upgrade_to_aal2(hooked_kratos, user, token)
    wait_until(lambda: len(store.aal2_events()) == 1, 5, "the hook's AAL2 event")
    time.sleep(1.1)  # past revalidate_after: forward-auth asks Kratos and sees aal2 too
    before = hooked_kratos.whoami_calls()
    assert _auth(bridge, token).headers["X-User-Aal"] == "aal2"
    assert hooked_kratos.whoami_calls() == before + 1

    events = store.aal2_events()
    assert len(events) == 1
    assert events[0][1]["upgrade_id"] == _totp_upgrade_id(hooked_kratos, token)
    assert events[0][1]["methods"] == "totp"
    device = flows.session_of(hooked_kratos, token=token).json()["devices"][0]
    assert events[0][1]["user_agent"] == device["user_agent"] != ""
    assert events[0][1]["ip_address"] == device["ip_address"]


def test_forward_auth_first_then_hook_records_one_aal2_event(
    start_bridge, hooked_kratos, store, relay
):
    bridge = start_bridge(BRIDGE_REVALIDATE_AFTER="1")
    user, token = _aal1_login_of_a_totp_user(hooked_kratos)
    session_id = _session_id(hooked_kratos, token)
    assert _auth(bridge, token).headers["X-User-Aal"] == "aal1"

    relay.gate.clear()  # the upgrade's hook waits in the relay
    flows.upgrade_to_aal2(hooked_kratos, user, token)
    time.sleep(1.1)
    assert _auth(bridge, token).headers["X-User-Aal"] == "aal2"
    events = store.aal2_events()
    assert len(events) == 1
    mirrored = f"kratos login hook: mirrored session {session_id} (aal2)"
    assert mirrored not in bridge.log()

    relay.gate.set()
    wait_until(lambda: mirrored in bridge.log(), 5, "the late hook")
    assert store.aal2_events() == events
    assert events[0][1]["upgrade_id"] == _totp_upgrade_id(hooked_kratos, token)


def test_hook_with_a_wrong_key_is_refused_and_changes_nothing(start_bridge, hooked_kratos, store):
    bridge = start_bridge(BRIDGE_HOOK_SECRET="another-secret-the-kratos-config-lacks-x")
    body = {"session": {"id": "3f0c2a4e-5b1d-4c3e-9f7a-1b2c3d4e5f60", "aal": "aal2"}}
    url = bridge.url + "/hooks/kratos/login"
    assert httpx.post(url, json=body).status_code == 401
    assert httpx.post(url, json=body, headers={"X-Bridge-Hook-Key": HOOK_SECRET}).status_code == 401
    wrong_case = {"X-Bridge-Hook-Key": "Another-secret-the-kratos-config-lacks-x"}
    assert httpx.post(url, json=body, headers=wrong_case).status_code == 401

    # The real Kratos, holding the other key: its calls are refused, nothing is mirrored,
    # and the login goes through all the same.
    log_size = hooked_kratos.log_path.stat().st_size
    user, token = _aal1_login_of_a_totp_user(hooked_kratos)
    session_id = _session_id(hooked_kratos, token)
    flows.upgrade_to_aal2(hooked_kratos, user, token)
    wait_until(lambda: _failed_hook_logged(hooked_kratos, log_size), 5, "the refused hook")
    assert store.load(session_id) is None
    assert store.aal2_events() == []
    assert HOOK_SECRET not in bridge.log()


def test_hook_endpoint_is_off_without_a_secret(start_bridge):
    bridge = start_bridge(BRIDGE_HOOK_SECRET=None)
    response = httpx.post(
        bridge.url + "/hooks/kratos/login", json={}, headers={"X-Bridge-Hook-Key": HOOK_SECRET}
    )
    assert response.status_code == 404


def test_unknown_flow_and_bad_body(start_bridge):
    bridge = start_bridge()
    key = {"X-Bridge-Hook-Key": HOOK_SECRET}
    assert (
        httpx.post(bridge.url + "/hooks/kratos/recovery", json={}, headers=key).status_code == 404
    )
    for bad in (b"not json", b"[]", b'{"session": {"id": "../../x"}}'):
        response = httpx.post(bridge.url + "/hooks/kratos/login", content=bad, headers=key)
        assert response.status_code == 400
    nil = {"session": {"id": "00000000-0000-0000-0000-000000000000", "aal": "aal1"}}
    assert httpx.post(bridge.url + "/hooks/kratos/login", json=nil, headers=key).status_code == 204


def test_a_session_kratos_never_shows_is_nothing_to_mirror(start_bridge, hooked_kratos):
    """The hook asks Kratos until its time is up; when the last ask is still under way at
    that moment, that is "not in time" (204), not "Kratos unreachable" (503). Kratos's
    answers take 0.2 s of the 0.3 s here, so the second ask always runs out of time."""
    link = SlowLink(hooked_kratos.admin_port, delay=0.2)
    try:
        bridge = start_bridge(BRIDGE_KRATOS_ADMIN_URL=link.url, BRIDGE_KRATOS_TIMEOUT="0.3")
        unknown = {"session": {"id": str(uuid.uuid4()), "aal": "aal1"}}
        key = {"X-Bridge-Hook-Key": HOOK_SECRET}
        response = httpx.post(bridge.url + "/hooks/kratos/login", json=unknown, headers=key)
        assert response.status_code == 204, response.text
    finally:
        link.close()


@pytest.mark.parametrize(("methods", "read"), [(2, 2), (2.0, 2), (0.0, 0)])
def test_a_count_of_methods_is_any_integral_json_number(methods, read):
    """JSON (and the document's `integer`) has one kind of number: 2.0 is the integer 2."""
    body = {"session": {"id": "3f0c2a4e-5b1d-4c3e-9f7a-1b2c3d4e5f60", "methods": methods}}
    assert read_body(orjson.dumps(body)).methods == read


@pytest.mark.parametrize("methods", [2.5, -1, 65, True, "2"])
def test_a_count_of_methods_that_is_not_a_small_integer_is_refused(methods):
    body = {"session": {"id": "3f0c2a4e-5b1d-4c3e-9f7a-1b2c3d4e5f60", "methods": methods}}
    with pytest.raises(BadHookBody):
        read_body(orjson.dumps(body))


def _failed_hook_logged(kratos: Kratos, log_size: int) -> bool:
    """Kratos has logged a web hook that failed (its error ignored) since ``log_size``:
    the hook was called, and answered, so what it did (or did not do) is done."""
    with kratos.log_path.open("rb") as log:
        log.seek(log_size)
        return b"the error was ignored" in log.read()


def test_bridge_down_during_login_does_not_block_it(start_bridge, hooked_kratos, relay):
    bridge = start_bridge()
    bridge.stop()
    log_size = hooked_kratos.log_path.stat().st_size

    user, token = _aal1_login_of_a_totp_user(hooked_kratos)
    flows.upgrade_to_aal2(hooked_kratos, user, token)
    session = flows.session_of(hooked_kratos, token=token).json()
    assert session["authenticator_assurance_level"] == "aal2"

    wait_until(
        lambda: _failed_hook_logged(hooked_kratos, log_size), 5, "Kratos logging the failed hook"
    )
