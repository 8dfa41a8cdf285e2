"""SessionClient: what an app behind the bridge reads and writes, against sessions a real
Kratos vouched for, in the embedded store and in Redis (standalone, Sentinel, Cluster)."""

from __future__ import annotations

import dataclasses
import enum
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType

import pytest

from bridge.client import EndedSession, SessionClient, UnifiedSession, csrf_valid
from bridge.errors import AppDataTooLarge, SessionEnded, StoreUnavailable
from bridge.kratos.whoami import parse_session
from bridge.sessions.ending import SessionEnder
from bridge.sessions.session import MirroredSession
from bridge.store import Keys
from bridge.store.memory.store import MemoryStore
from bridge.wiring import build_store
from tests.conftest import bridge_settings, topology_url
from tests.support import kratos_flows as flows
from tests.support.harness import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["embedded", "standalone", "sentinel", "cluster"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def store_url(store_kind: str, request: pytest.FixtureRequest) -> str | None:
    return topology_url(store_kind, request)


@pytest.fixture
def settings(store_url, kratos, prefix):
    # Every /whoami asks Kratos, so a logout is seen at once.
    return bridge_settings(kratos, store_url, prefix, BRIDGE_REVALIDATE_AFTER="0")


@pytest.fixture
def sessions(store_url, store, prefix):
    """The app's client: over Redis like another process, or on the bridge's own store."""
    client = SessionClient(store_url, prefix) if store_url else SessionClient(store=store)
    yield client
    client.close()


def signed_up(client, kratos) -> tuple[str, flows.User]:
    """A user who registered with Kratos and whose session the bridge has mirrored."""
    user = flows.register(kratos)
    response = client.get("/whoami", headers={"X-Session-Token": user.token})
    assert response.status_code == 200
    return response.get_json()["session_id"], user


def mirror_from_kratos(store, kratos) -> str:
    """Mirror a real Kratos session the way the bridge does, without the bridge app."""
    user = flows.register(kratos)
    asked_at = int(time.time() * 1000)
    view, expires_at_ms = parse_session(flows.session_of(kratos, token=user.token).content)
    assert store.save(
        "fp-" + user.token[-8:], MirroredSession(view, asked_at, expires_at_ms), None, asked_at
    ).cached
    return view["session_id"]


def test_a_mirrored_session_reads_as_kratos_said(client, kratos, sessions, store):
    session_id, user = signed_up(client, kratos)
    kratos_view = flows.session_of(kratos, token=user.token).json()
    session = sessions.session(session_id)
    assert isinstance(session, UnifiedSession)
    assert session.session_id == kratos_view["id"]
    assert session.identity["id"] == user.identity_id
    assert session.identity["traits"]["email"] == user.email
    assert session.identity["verifiable_addresses"] == ()  # the test schema verifies none
    assert session.aal == "aal1"
    assert [m["method"] for m in session.authentication_methods] == ["password"]
    assert session.authenticated_at == kratos_view["authenticated_at"]
    assert session.expires_at == kratos_view["expires_at"]
    assert session.device["user_agent"] == kratos_view["devices"][0]["user_agent"]
    assert session.app == {}
    assert session.csrf_token == store.load(session_id).csrf_token != ""
    assert session.csrf_token not in repr(session)


def test_the_kratos_part_is_read_only(client, kratos, sessions):
    session_id, user = signed_up(client, kratos)
    session = sessions.session(session_id)
    assert isinstance(session.identity, MappingProxyType)
    with pytest.raises(TypeError):
        session.identity["id"] = "someone-else"
    with pytest.raises(TypeError):
        session.identity["traits"]["email"] = "mallory@example.test"
    assert isinstance(session.authentication_methods, tuple)
    with pytest.raises(TypeError):
        session.authentication_methods[0]["aal"] = "aal2"
    with pytest.raises(TypeError):
        session.device["ip_address"] = "10.0.0.1"
    with pytest.raises(dataclasses.FrozenInstanceError):
        session.aal = "aal2"

    # The only write there is goes to the app's own fields, whatever they are called.
    sessions.set(session_id, {"identity": {"id": "someone-else"}, "aal": "aal2"})
    again = sessions.session(session_id)
    assert again.identity["id"] == user.identity_id
    assert again.aal == "aal1"
    assert again.app == {"identity": {"id": "someone-else"}, "aal": "aal2"}


JSON_VALUES = [
    "text",
    "",
    "ünïcödé ✓",
    "42",
    "null",
    0,
    -(2**63),
    2**64 - 1,
    1.5,
    2.0,
    -0.0,
    True,
    False,
    None,
    [],
    [1, "a", None, [True, 2.5]],
    {},
    {"nested": {"list": [1, {"deep": False}]}, "n": 1},
]


def test_each_json_value_comes_back_as_itself(client, kratos, sessions):
    session_id, _ = signed_up(client, kratos)
    values = {f"v{i}": value for i, value in enumerate(JSON_VALUES)}
    for app in (
        sessions.set(session_id, values),
        sessions.app(session_id),
        sessions.session(session_id).app,
    ):
        assert app == values
        assert repr(app) == repr(values)  # True is no 1, 2.0 no 2, "42" no 42


def test_set_and_delete_change_only_the_fields_they_name(client, kratos, sessions):
    session_id, _ = signed_up(client, kratos)
    assert sessions.set(session_id, {"cart": ["sku-1"], "step": 1}) == {
        "cart": ["sku-1"],
        "step": 1,
    }
    assert sessions.set(session_id, {"step": 2}) == {"cart": ["sku-1"], "step": 2}
    assert sessions.delete(session_id, "step", "never-set") == {"cart": ["sku-1"]}
    assert sessions.set(session_id, {}) == {"cart": ["sku-1"]}
    assert sessions.delete(session_id, "cart") == {}
    assert sessions.app(session_id) == {}


def test_the_client_writes_what_the_user_cannot(client, kratos, sessions):
    """The client's credential is Redis; the user's own session alone cannot write the
    same section through the bridge (``PATCH /whoami/app``, off without an app token)."""
    session_id, user = signed_up(client, kratos)
    assert sessions.set(session_id, {"role": "reader"}) == {"role": "reader"}
    refused = client.patch(
        "/whoami/app",
        data=b'{"role": "admin"}',
        headers={"X-Session-Token": user.token, "Content-Type": "application/json"},
    )
    assert refused.status_code == 403
    assert sessions.app(session_id) == {"role": "reader"}
    whoami = client.get("/whoami", headers={"X-Session-Token": user.token}).get_json()
    assert whoami["app"] == {"role": "reader"}


def test_a_field_written_as_plain_text_reads_as_that_text(client, kratos, sessions, store):
    session_id, _ = signed_up(client, kratos)
    store.update_app(session_id, {"note": "3 items", "count": "3", "quoted": '"x"'}, (), 1000)
    assert sessions.app(session_id) == {"note": "3 items", "count": 3, "quoted": "x"}


class Colour(enum.IntEnum):
    RED = 1


NOT_JSON = [
    object(),
    b"bytes",
    (1, 2),
    {1, 2},
    datetime(2026, 1, 1, tzinfo=UTC),
    Colour.RED,
    float("nan"),
    float("inf"),
    {1: "key not text"},
    [1, [2, ("nested tuple",)]],
    {"deep": {"er": Colour.RED}},
    2**64,
]


def test_a_value_without_a_faithful_json_form_is_refused_naming_its_field(client, kratos, sessions):
    session_id, _ = signed_up(client, kratos)
    for value in NOT_JSON:
        with pytest.raises(TypeError, match="'the_field'"):
            sessions.set(session_id, {"fine": 1, "the_field": value})
    assert sessions.app(session_id) == {}  # not even the good field


def test_a_field_name_is_1_to_128_of_letters_digits_and_a_few_marks(client, kratos, sessions):
    session_id, _ = signed_up(client, kratos)
    for name in ["", "x" * 129, "has space", "ünï", "a/b", "a{b}", "new\nline", 7, None]:
        with pytest.raises(ValueError, match="field name"):
            sessions.set(session_id, {"fine": 1, name: 1})
        with pytest.raises(ValueError, match="field name"):
            sessions.delete(session_id, "fine", name)
    assert sessions.app(session_id) == {}
    good = {"x" * 128: 1, "A-z_0.9:-": 2}
    assert sessions.set(session_id, good) == good


def test_an_ended_or_unknown_session(client, kratos, sessions, store):
    session_id, user = signed_up(client, kratos)
    sessions.set(session_id, {"cart": ["sku-1"]})
    flows.logout_api(kratos, user.token)
    assert client.get("/whoami", headers={"X-Session-Token": user.token}).status_code == 401
    for sid in (session_id, "no-such-session"):
        assert sessions.session(sid) is None
        with pytest.raises(SessionEnded, match="expired, revoked or logged out"):
            sessions.app(sid)
        with pytest.raises(SessionEnded):
            sessions.set(sid, {"cart": ["sku-2"]})
        with pytest.raises(SessionEnded):
            sessions.delete(sid, "cart")
        with pytest.raises(SessionEnded):
            store.load_app(sid)  # the logout deleted the app data; nothing came back


def test_the_size_cap_counts_names_and_json_and_refuses_writing_anything(
    client, kratos, store_url, store, prefix
):
    session_id, _ = signed_up(client, kratos)
    kwargs = {"store": store} if store_url is None else {"redis_url": store_url}
    with SessionClient(key_prefix=prefix, max_bytes=12, **kwargs) as small:
        assert small.set(session_id, {"a": "é"}) == {"a": "é"}  # 1 + len('"é"') = 5 bytes
        assert small.set(session_id, {"bb": 12345}) == {"a": "é", "bb": 12345}  # 5 + 7 = 12
        with pytest.raises(AppDataTooLarge, match=r"12 bytes.* 13"):
            small.set(session_id, {"c": 1, "a": "x"})  # c: 2 more, a: 1 less
        assert small.app(session_id) == {"a": "é", "bb": 12345}
    with SessionClient(key_prefix=prefix, **kwargs) as default:
        assert default.max_bytes == 65536
        with pytest.raises(AppDataTooLarge):
            default.set(session_id, {"big": "x" * 65536})
        assert default.set(session_id, {"big": "x" * 60_000})["big"] == "x" * 60_000


def test_csrf_valid_only_for_the_sessions_own_token(client, kratos, sessions):
    one = sessions.session(signed_up(client, kratos)[0])
    other = sessions.session(signed_up(client, kratos)[0])
    token = one.csrf_token
    assert csrf_valid(one, token)
    assert csrf_valid(one, str(token))  # equal, not the same object
    assert not csrf_valid(one, other.csrf_token)
    assert not csrf_valid(other, token)
    for wrong in (
        "",
        None,
        token[:-1],
        token + "x",
        token[:-1] + ("A" if token[-1] != "A" else "B"),
    ):
        assert not csrf_valid(one, wrong)
    assert not csrf_valid(one, "ünïcödé")  # no error for text that is not ASCII
    assert not csrf_valid(None, token)
    assert not csrf_valid(dataclasses.replace(one, csrf_token=""), "")


def test_writers_in_two_processes_lose_nothing(redis_topology, kratos, prefix):
    """Another process writes fields of its own while this one writes others, both
    setting and deleting: whatever either wrote last is there."""
    store = build_store(bridge_settings(kratos, redis_topology.url, prefix))
    session_id = mirror_from_kratos(store, kratos)
    rounds = 120  # each keeps half its fields: under MAX_APP_FIELDS in all
    writer = """
import sys
from bridge.client import SessionClient

url, prefix, sid, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
with SessionClient(url, prefix) as sessions:
    sessions.app(sid)
    print("ready", flush=True)
    sys.stdin.readline()
    for r in range(rounds):
        sessions.set(sid, {f"theirs.{r}": r})
        if r % 2:
            sessions.delete(sid, f"theirs.{r - 1}")
"""
    other = subprocess.Popen(
        [sys.executable, "-c", writer, redis_topology.url, prefix, session_id, str(rounds)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        with SessionClient(redis_topology.url, prefix) as sessions:
            assert sessions.app(session_id) == {}
            assert other.stdout.readline().strip() == "ready"
            other.stdin.write("go\n")
            other.stdin.flush()
            for r in range(rounds):
                sessions.set(session_id, {f"ours.{r}": r})
                if r % 2:
                    sessions.delete(session_id, f"ours.{r - 1}")
            assert other.wait(60) == 0
            expected = {
                f"{who}.{r}": r for who in ("ours", "theirs") for r in range(rounds) if r % 2
            }
            assert sessions.app(session_id) == expected
    finally:
        other.kill()
        other.wait()
        store.close()


def test_every_redis_url_form_reaches_the_same_sessions(redis_topology, kratos, prefix):
    store = build_store(bridge_settings(kratos, redis_topology.url, prefix))
    session_id = mirror_from_kratos(store, kratos)
    with SessionClient(redis_topology.url, prefix, timeout=2.0) as sessions:
        assert sessions.session(session_id).session_id == session_id
        assert sessions.set(session_id, {"k": 1}) == {"k": 1}
    assert store.load_app(session_id) == {"k": "1"}
    with SessionClient(redis_topology.url, "another:prefix:") as elsewhere:
        assert elsewhere.session(session_id) is None
    store.close()


def test_a_client_is_given_one_store_and_sound_settings():
    store = MemoryStore(Keys("p:", "p:events:aal2"), 10)
    with pytest.raises(ValueError, match="either"):
        SessionClient()
    with pytest.raises(ValueError, match="either"):
        SessionClient("redis://127.0.0.1:6379/0", store=store)
    with pytest.raises(ValueError, match="not a redis"):
        SessionClient("http://127.0.0.1:6379")
    with pytest.raises(ValueError, match="key_prefix"):
        SessionClient("redis://127.0.0.1:6379/0", "has space")
    with pytest.raises(ValueError, match="max_bytes"):
        SessionClient(store=store, max_bytes=0)
    with pytest.raises(ValueError, match="timeout"):
        SessionClient("redis://127.0.0.1:6379/0", timeout=0)


def test_a_redis_out_of_reach_is_store_unavailable():
    with SessionClient(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2) as sessions:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            sessions.session("any")
        with pytest.raises(StoreUnavailable):
            sessions.set("any", {"k": 1})
        assert time.monotonic() - started < 5


def test_follow_ended_gives_each_end_once_and_a_group_shares_them(client, kratos, sessions, store):
    sid, user = signed_up(client, kratos)
    ender = SessionEnder(store, None, 1.0)
    stop = threading.Event()
    everything: list[EndedSession] = []
    shared: dict[str, list[str]] = {"a": [], "b": []}
    store.read_ended_group("apps", "setup", 1, 1)  # the group, made before any end

    def follow() -> None:
        everything.extend(sessions.follow_ended(stop=stop))

    def read_in_group(name: str) -> None:
        for ended in sessions.follow_ended(group="apps", consumer=name, stop=stop):
            shared[name].append(ended.session_id)

    readers = [threading.Thread(target=follow)]
    readers += [threading.Thread(target=read_in_group, args=(name,)) for name in shared]
    for reader in readers:
        reader.start()
    time.sleep(0.5)  # the plain reader starts at the stream's end: let it find it
    ender.end(sid, "revoked", by="admin")
    ender.end(sid, "revoked", by="admin")  # retried: still one end
    others = [str(uuid.uuid4()) for _ in range(12)]
    for other in others:
        ender.end(other, "idle")
    deadline = time.monotonic() + 10
    while len(everything) < 13 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # a second event, if there were one, would be in by now
    stop.set()
    for reader in readers:
        reader.join(5)

    first = everything[0]
    assert (first.session_id, first.identity_id, first.reason, first.by) == (
        sid,
        user.identity_id,
        "revoked",
        "admin",
    )
    assert datetime.fromisoformat(first.at) <= datetime.now(UTC)
    assert [e.session_id for e in everything] == [sid, *others]
    assert [(e.identity_id, e.reason, e.by) for e in everything[1:]] == [
        ("", "idle", "bridge")
    ] * 12
    assert sorted(shared["a"] + shared["b"]) == sorted([sid, *others])


def test_follow_ended_ends_when_the_client_is_closed(store_url, store, prefix):
    client = SessionClient(store_url, prefix) if store_url else SessionClient(store=store)
    done = threading.Event()

    def follow() -> None:
        for _ in client.follow_ended():
            pass
        done.set()

    threading.Thread(target=follow, daemon=True).start()
    time.sleep(0.3)
    client.close()
    assert done.wait(2)
