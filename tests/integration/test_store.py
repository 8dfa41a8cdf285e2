"""The store protocol, run against the embedded store and real Redis in its three
topologies (standalone, Sentinel, Cluster) alike: each script of the Redis store must
keep to one hash slot, or the cluster runs fail with CROSSSLOT."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import redis
from redis.crc import key_slot

import bridge.store.memory.store
import bridge.store.redis.store
from bridge.errors import AppDataTooLarge, SessionEnded, TooManyAppFields
from bridge.sessions.session import aal2_event, upgrade_id
from bridge.store.base import (
    AAL2_MARKER_GRACE_MS,
    MAX_APP_FIELDS,
    MAX_DEVICE_CHANGES_PER_SESSION,
    CredentialEntry,
    Idle,
    Lock,
    Lookup,
    Rejection,
)
from bridge.wiring import build_store
from tests.conftest import bridge_settings, topology_url
from tests.support.harness import free_port, stop_process, wait_until
from tests.support.mirrored import now_ms, session

ROOT = Path(__file__).resolve().parents[2]
CAP = 65536
# A lifetime (ms) that several store calls fit in on a busy machine, which may stall one
# of them for a second or two; tests wait for its end.
SHORT_MS = 3000


@pytest.fixture(params=["embedded", "standalone", "sentinel", "cluster"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def store_url(store_kind: str, request: pytest.FixtureRequest) -> str | None:
    return topology_url(store_kind, request)


@pytest.fixture
def settings(store_url, kratos, prefix):
    return bridge_settings(kratos, store_url, prefix)


def save(store, fingerprint, mirrored):
    return store.save(fingerprint, mirrored, aal2_event(mirrored, now_ms()), now_ms())


def drop(store, key):
    """Lose one key, as a crash or a failover that lost unreplicated writes would."""
    if hasattr(store, "_redis"):
        store._redis.delete(key)
    else:
        store._delete(key)


def exists(store, key):
    if hasattr(store, "_redis"):
        return bool(store._redis.exists(key))
    return store._get(key) is not None


def expiry_of(store, key):
    """When the store drops a key: Redis's own PEXPIRETIME, or the embedded store's clock."""
    if hasattr(store, "_redis"):
        return store._redis.pexpiretime(key)
    return store._expires.get(key, -2)


def test_save_then_load_and_find(store):
    mirrored = session()
    assert save(store, "fp1", mirrored).cached
    assert store.find_credential("fp1") == CredentialEntry("s1", mirrored.validated_at_ms)
    loaded = store.load("s1")
    assert loaded.kratos == mirrored.kratos
    assert loaded.validated_at_ms == mirrored.validated_at_ms
    assert loaded.expires_at_ms == mirrored.expires_at_ms
    assert store.find_credential("other") is None
    assert store.load("other") is None


def test_expiry_is_absolute_and_moves_with_kratos(store):
    first = session(expires_in_ms=60_000)
    save(store, "fp1", first)
    assert expiry_of(store, store.keys.session("s1")) == first.expires_at_ms
    assert expiry_of(store, store.keys.credential("fp1")) == first.expires_at_ms
    store.update_app("s1", {"theme": "dark"}, (), CAP)
    extended = session(expires_in_ms=120_000)
    save(store, "fp1", extended)
    assert expiry_of(store, store.keys.session("s1")) == extended.expires_at_ms
    assert expiry_of(store, store.keys.app("s1")) == extended.expires_at_ms


def test_mirror_and_app_data_are_gone_at_expires_at(store):
    # A lifetime the three calls below fit in on a busy machine (on a Cluster too); the
    # end is waited for, not slept past.
    first_token = save(store, "fp1", session(expires_in_ms=SHORT_MS)).csrf_token
    store.update_app("s1", {"k": "v"}, (), CAP)
    assert store.load("s1", with_app=True).app == {"k": "v"}
    wait_until(lambda: store.load("s1") is None, 10, "the session's expiry")
    assert store.find_credential("fp1") is None
    assert store.identity_session_ids("i1", now_ms()) == []
    with pytest.raises(SessionEnded):
        store.load_app("s1")
    revived = save(store, "fp1", session(expires_in_ms=60_000))  # Kratos revived it
    assert store.load("s1", with_app=True).app == {}
    assert revived.csrf_token not in ("", first_token)  # a mirror made anew: a new token


def test_app_fields_are_set_and_deleted_one_by_one(store):
    save(store, "fp1", session())
    assert store.update_app("s1", {"a": "1", "b": "2"}, (), CAP) == {"a": "1", "b": "2"}
    assert store.update_app("s1", {"c": "3"}, ["a", "absent"], CAP) == {"b": "2", "c": "3"}
    assert store.update_app("s1", {"b": "zwéi"}, (), CAP) == {"b": "zwéi", "c": "3"}
    assert store.load_app("s1") == {"b": "zwéi", "c": "3"}
    assert store.load("s1", with_app=True).app == {"b": "zwéi", "c": "3"}
    assert store.update_app("s1", {}, (), CAP) == {"b": "zwéi", "c": "3"}
    assert store.update_app("s1", {"d": "x"}, ["d", "c"], CAP) == {"b": "zwéi"}  # set, then delete
    assert store.update_app("s1", {}, ["b"], CAP) == {}
    assert store.load_app("s1") == {}
    assert not exists(store, store.keys.app("s1"))


def test_app_data_expires_with_the_session_to_the_millisecond(store):
    first = session(expires_in_ms=60_000)
    save(store, "fp1", first)
    store.update_app("s1", {"k": "v"}, (), CAP)
    assert expiry_of(store, store.keys.app("s1")) == first.expires_at_ms
    extended = session(expires_in_ms=120_000)
    save(store, "fp1", extended)
    store.update_app("s1", {"k2": "v"}, ["k"], CAP)
    assert expiry_of(store, store.keys.app("s1")) == extended.expires_at_ms
    assert expiry_of(store, store.keys.session("s1")) == extended.expires_at_ms


def test_app_data_of_an_unknown_or_ended_session_is_refused_and_nothing_written(store):
    with pytest.raises(SessionEnded):
        store.update_app("nope", {"k": "v"}, (), CAP)
    with pytest.raises(SessionEnded):
        store.load_app("nope")
    assert not exists(store, store.keys.app("nope"))

    save(store, "fp1", session())
    store.update_app("s1", {"k": "v"}, (), CAP)
    store.forget("fp1", session(), Rejection(now_ms(), keep_ms=10_000))
    with pytest.raises(SessionEnded):
        store.update_app("s1", {"k2": "v"}, (), CAP)
    with pytest.raises(SessionEnded):
        store.load_app("s1")
    assert not exists(store, store.keys.app("s1"))


def test_forgetting_a_session_deletes_its_app_data_on_every_path(store):
    """Kratos turned a credential down: the app data goes with the mirror, whether the
    session was seen with the credential, found through its pointer, or reached by a
    save that lost the race to the rejection."""
    for n, how in enumerate(["seen", "pointer", "late save"]):
        sid = f"s{n}"
        save(store, f"{sid}-fp", session(sid=sid, validated_at=now_ms() - 100))
        store.update_app(sid, {"k": "v"}, (), CAP)
        rejection = Rejection(now_ms(), keep_ms=10_000)
        if how == "seen":
            store.forget(f"{sid}-fp", session(sid=sid), rejection)
        elif how == "pointer":
            store.forget(f"{sid}-fp", None, rejection)
        else:  # a credential never seen is rejected, then an answer from before lands
            store.forget(f"{sid}-new", None, rejection)
            assert store.load_app(sid) == {"k": "v"}
            assert not save(
                store, f"{sid}-new", session(sid=sid, validated_at=now_ms() - 50)
            ).cached
        assert not exists(store, store.keys.app(sid)), how
        assert store.load(sid) is None, how
        save(store, f"{sid}-again", session(sid=sid, validated_at=now_ms() + 1))
        assert store.load_app(sid) == {}, how


def test_app_data_cap_counts_utf8_bytes_and_a_refused_write_writes_nothing(store):
    save(store, "fp1", session())
    assert store.update_app("s1", {"name": "ééé"}, (), 10) == {"name": "ééé"}  # 4 + 6 bytes
    with pytest.raises(AppDataTooLarge) as refused:
        store.update_app("s1", {"x": "1", "name": "éééé"}, (), 10)
    assert (refused.value.max_bytes, refused.value.size) == (10, 14)
    assert "10 bytes" in str(refused.value) and "14" in str(refused.value)
    with pytest.raises(AppDataTooLarge):
        store.update_app("s1", {"y": ""}, ["absent"], 10)  # 11: one byte too many
    assert store.load_app("s1") == {"name": "ééé"}
    assert store.update_app("s1", {"a": "b"}, ["name"], 10) == {"a": "b"}

    # Past a cap that was lowered: what shrinks the data goes through, nothing else.
    store.update_app("s1", {"name": "ééé"}, ["a"], 10)
    assert store.update_app("s1", {"name": "é"}, (), 4) == {"name": "é"}  # 10 -> 6
    with pytest.raises(AppDataTooLarge):
        store.update_app("s1", {"name": "éé"}, (), 4)  # 6 -> 8
    assert store.load_app("s1") == {"name": "é"}


def test_app_data_field_count_is_capped_and_updates_still_go_through(store):
    """Many tiny fields would make every write of the session slow for Redis."""
    save(store, "fp1", session())
    full = {f"f{i}": "1" for i in range(MAX_APP_FIELDS)}
    assert len(store.update_app("s1", full, (), CAP)) == MAX_APP_FIELDS
    with pytest.raises(TooManyAppFields) as refused:
        store.update_app("s1", {"one.more": "1"}, (), CAP)
    assert str(MAX_APP_FIELDS) in str(refused.value)
    assert "one.more" not in store.load_app("s1")
    assert store.update_app("s1", {"f0": "2"}, ["f1"], CAP)["f0"] == "2"  # no new field
    assert "again" in store.update_app("s1", {"again": "1"}, (), CAP)  # f1's place


def test_device_changes_are_recorded_once_each_and_capped_per_session(store):
    keep = now_ms() + 60_000
    fields = {"session_id": "s1", "new_user_agent": "A"}
    assert store.record_device_change("c1", fields, keep)
    assert not store.record_device_change("c1", fields, keep)
    for n in range(2, MAX_DEVICE_CHANGES_PER_SESSION + 5):
        store.record_device_change(f"c{n}", {**fields, "new_user_agent": str(n)}, keep)
    mine = [f for _, f in store.device_changes(1000) if f["session_id"] == "s1"]
    assert len(mine) == MAX_DEVICE_CHANGES_PER_SESSION
    assert store.record_device_change("d1", {"session_id": "s2"}, keep)  # others unaffected


def test_concurrent_writers_of_different_fields_lose_nothing(store):
    """Each writer sets fields of its own and deletes some of them again, all at once:
    a write that replaced the hash as a whole would lose or revive others' fields."""
    save(store, "fp1", session())
    writers, rounds = 8, 40
    start = threading.Barrier(writers)

    def write(i: int) -> None:
        start.wait()
        for r in range(rounds):
            gone = [f"w{i}.{r - 1}"] if r % 2 else []
            store.update_app("s1", {f"w{i}.{r}": "x", f"last.{i}": str(r)}, gone, CAP)

    with ThreadPoolExecutor(writers) as pool:
        list(pool.map(write, range(writers)))
    expected = {f"w{i}.{r}": "x" for i in range(writers) for r in range(rounds) if r % 2 == 1}
    expected |= {f"last.{i}": str(rounds - 1) for i in range(writers)}
    assert store.load_app("s1") == expected


def test_a_session_gets_a_csrf_token_with_its_mirror_and_keeps_it(store):
    token = save(store, "fp1", session()).csrf_token
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", token)  # 32 random bytes, base64url
    assert store.load("s1").csrf_token == token
    assert store.lookup("fp1", now_ms(), 5000, 0, with_app=False).session.csrf_token == token
    assert save(store, "fp1", session(expires_in_ms=120_000)).csrf_token == token  # extended
    assert save(store, "fp2", session()).csrf_token == token  # another credential
    older = session(validated_at=now_ms() - 10_000)  # an answer a newer one has overtaken
    assert save(store, "fp3", older).csrf_token == token
    assert store.load("s1").csrf_token == token

    other = save(store, "fp9", session(sid="s2")).csrf_token
    assert other not in ("", token)
    store.forget("fp1", session(), Rejection(now_ms(), keep_ms=10_000))
    renewed = save(store, "fp4", session(validated_at=now_ms() + 1)).csrf_token
    assert renewed not in ("", token, other)
    assert store.load("s1").csrf_token == renewed


def test_the_csrf_token_is_in_no_repr_encoding_or_json_view(store):
    result = save(store, "fp1", session())
    loaded = store.lookup("fp1", now_ms(), 5000, 0, with_app=True).session
    assert loaded.csrf_token == result.csrf_token
    assert result.csrf_token not in repr(result)
    for shown in (repr(loaded), loaded.encode().decode(), str(loaded.to_json())):
        assert result.csrf_token not in shown
    assert "csrf" not in loaded.to_json()


def test_aal2_event_is_appended_once(store):
    save(store, "fp1", session(aal="aal1"))
    assert store.aal2_events() == []
    event_id = save(store, "fp1", session(aal="aal2")).aal2_event_id
    assert event_id is not None
    assert save(store, "fp1", session(aal="aal2")).aal2_event_id is None
    assert save(store, "fp2", session(aal="aal2")).aal2_event_id is None
    [(stored_id, fields)] = store.aal2_events()
    assert stored_id == event_id
    assert fields["session_id"] == "s1"
    assert fields["identity_id"] == "i1"
    assert fields["methods"] == "totp"
    assert fields["completed_at"] == "2026-11-22T10:01:00Z"
    assert fields["ip_address"] == "10.1.2.3"


def test_aal2_marker_outlives_the_session_by_the_grace_and_never_shrinks(store):
    mirrored = session(aal="aal2")
    save(store, "fp1", mirrored)
    marker = store.keys.aal2_marker("s1")
    assert expiry_of(store, marker) == mirrored.expires_at_ms + AAL2_MARKER_GRACE_MS
    extended = session(aal="aal2", expires_in_ms=120_000)
    save(store, "fp1", extended)
    assert expiry_of(store, marker) == extended.expires_at_ms + AAL2_MARKER_GRACE_MS
    save(store, "fp1", session(aal="aal2", expires_in_ms=30_000))
    assert expiry_of(store, marker) == extended.expires_at_ms + AAL2_MARKER_GRACE_MS


def test_aal2_event_once_under_concurrent_saves(store):
    with ThreadPoolExecutor(16) as pool:
        results = list(
            pool.map(lambda i: save(store, f"fp{i % 3}", session(aal="aal2")), range(64))
        )
    assert len([r for r in results if r.aal2_event_id]) == 1
    assert len(store.aal2_events()) == 1


def test_forget_drops_mirror_keeps_event_marker_and_rejects(store):
    save(store, "fp1", session(aal="aal2"))
    rejected_at = now_ms()
    store.forget("fp1", session(aal="aal2"), Rejection(rejected_at, keep_ms=SHORT_MS))
    assert store.load("s1") is None
    assert store.find_credential("fp1") == Rejection(rejected_at)
    assert store.identity_session_ids("i1", now_ms()) == []
    save(store, "fp9", session(aal="aal2"))  # seen again (identity re-activated): no new event
    assert len(store.aal2_events()) == 1
    # the rejection is forgotten after keep_ms
    wait_until(lambda: store.find_credential("fp1") is None, 10, "the rejection's end")


def test_an_acceptance_asked_before_a_rejection_arrived_is_not_cached(store):
    asked_before_logout = session(validated_at=now_ms() - 50)
    store.forget("fp1", None, Rejection(now_ms(), keep_ms=10_000))
    result = save(store, "fp1", asked_before_logout)
    assert not result.cached
    assert isinstance(store.find_credential("fp1"), Rejection)
    assert store.load("s1") is None

    asked_after = session(validated_at=now_ms() + 1)  # e.g. the identity was re-activated
    assert save(store, "fp1", asked_after).cached
    assert store.find_credential("fp1") == CredentialEntry("s1", asked_after.validated_at_ms)


def test_an_older_answer_does_not_overwrite_a_newer_one(store):
    newer = session(aal="aal2", validated_at=now_ms())
    older = replace(session(aal="aal1"), validated_at_ms=newer.validated_at_ms - 500)
    save(store, "fp1", newer)
    save(store, "fp1", older)
    assert store.load("s1").aal == "aal2"
    assert store.find_credential("fp1").validated_at_ms == newer.validated_at_ms
    save(store, "fp2", older)  # a second credential: its own acceptance time is recorded
    assert store.find_credential("fp2").validated_at_ms == older.validated_at_ms


def test_identity_index_score_never_moves_back(store):
    later = session(expires_in_ms=120_000)
    save(store, "fp1", later)
    save(store, "fp2", session(expires_in_ms=30_000))  # a late answer from before an extend
    key = store.keys.identity_sessions("i1")
    if hasattr(store, "_redis"):
        score = store._redis.zscore(key, "s1")
    else:
        score = store._values[key]["s1"]
    assert score == later.expires_at_ms


def test_identity_index_drops_expired_sessions(store):
    save(store, "fpa", session(sid="a", expires_in_ms=SHORT_MS))
    save(store, "fpb", session(sid="b", expires_in_ms=60_000))
    assert set(store.identity_session_ids("i1", now_ms())) == {"a", "b"}
    wait_until(lambda: store.identity_session_ids("i1", now_ms()) == ["b"], 10, "a's expiry")
    save(store, "fpc", session(sid="c", expires_in_ms=30_000))
    key = store.keys.identity_sessions("i1")
    if hasattr(store, "_redis"):
        members = {m.decode() for m in store._redis.zrange(key, 0, -1)}
    else:
        members = set(store._values[key])
    assert members == {"b", "c"}  # the write trimmed "a" away, not just the reader


def test_revalidation_lock_is_exclusive_owned_and_expires(store):
    lock = store.claim_revalidation("s1", SHORT_MS)
    assert lock == Lock("s1", lock.token)
    assert store.revalidation_pending("s1")
    assert store.claim_revalidation("s1", SHORT_MS) is None
    store.release_revalidation(Lock("s1", "not-the-owner"))
    assert store.revalidation_pending("s1")
    store.release_revalidation(lock)
    assert not store.revalidation_pending("s1")
    assert store.claim_revalidation("s1", SHORT_MS)
    wait_until(lambda: not store.revalidation_pending("s1"), 10, "the lock's expiry")
    assert store.claim_revalidation("s1", SHORT_MS)


def test_stream_length_is_capped(kratos, store_url, prefix):
    settings = bridge_settings(kratos, store_url, prefix, BRIDGE_AAL2_STREAM_MAXLEN="10")
    store = build_store(settings)
    for i in range(300):
        save(store, f"fp{i}", session(sid=f"s{i}", aal="aal2"))
    kept = store.aal2_events(1000)
    assert 10 <= len(kept) < 300  # MAXLEN ~ trims in whole nodes
    assert kept[-1][1]["session_id"] == "s299"


def test_keys_of_one_session_share_a_cluster_slot(store):
    sid = "9b1deb4d-3b7d-4bad-9bdd-2b0d7b3dcb6d"
    keys = [
        store.keys.session(sid),
        store.keys.app(sid),
        store.keys.aal2_marker(sid),
        store.keys.revalidating(sid),
        store.keys.last_use(sid),
        store.keys.extension(sid, 1_800_000_000_000),
    ]
    assert {key_slot(k.encode()) for k in keys} == {key_slot(sid.encode())}


def test_lookup_reads_entry_session_and_app_in_one_step(store):
    mirrored = session(validated_at=now_ms() - 1000)
    save(store, "fp1", mirrored)
    store.update_app("s1", {"cart": "3"}, (), CAP)
    assert store.lookup("nobody", now_ms(), 5000, 100, with_app=False) == Lookup(None)

    found = store.lookup("fp1", now_ms(), 5000, 100, with_app=True)
    assert found.entry == CredentialEntry("s1", mirrored.validated_at_ms)
    assert found.session.kratos == mirrored.kratos
    assert found.session.validated_at_ms == mirrored.validated_at_ms
    assert found.session.app == {"cart": "3"}
    assert (found.lock, found.peer_busy) == (None, False)  # fresh: no lock taken
    assert not store.revalidation_pending("s1")
    assert store.lookup("fp1", now_ms(), 5000, 100, with_app=False).session.app == {}


def test_lookup_of_a_stale_credential_takes_the_lock_once(store):
    save(store, "fp1", session(validated_at=now_ms() - 6000))
    first = store.lookup("fp1", now_ms(), 5000, 10_000, with_app=False)
    assert first.lock is not None and first.lock.session_id == "s1"
    assert not first.peer_busy
    second = store.lookup("fp1", now_ms(), 5000, 10_000, with_app=False)
    assert (second.lock, second.peer_busy) == (None, True)
    assert store.lookup("fp1", now_ms(), 5000, 0, with_app=False).lock is None  # asked for none

    # Saving with the lock lets go of it, in the same step.
    save_result = store.save("fp1", session(), None, now_ms(), first.lock)
    assert save_result.cached
    assert not store.revalidation_pending("s1")


def test_forget_lets_go_of_the_lock(store):
    save(store, "fp1", session(validated_at=now_ms() - 6000))
    found = store.lookup("fp1", now_ms(), 5000, 10_000, with_app=False)
    store.forget("fp1", found.session, Rejection(now_ms(), keep_ms=10_000), found.lock)
    assert not store.revalidation_pending("s1")
    assert isinstance(store.lookup("fp1", now_ms(), 5000, 100, with_app=False).entry, Rejection)


def test_lookup_of_a_rejected_credential(store):
    save(store, "fp1", session())
    rejection = Rejection(now_ms(), keep_ms=10_000)
    store.forget("fp1", None, rejection)
    found = store.lookup("fp1", now_ms(), 5000, 100, with_app=False)
    assert found == Lookup(Rejection(rejection.rejected_at_ms))


def test_an_event_carries_an_upgrade_id_made_from_kratos_data_alone(store):
    save(store, "fp1", session(aal="aal2"))
    [(_, fields)] = store.aal2_events()
    assert fields["upgrade_id"] == upgrade_id("s1", "2026-11-22T10:01:00Z")
    seen_later = aal2_event(session(aal="aal2"), now_ms() + 60_000)
    assert seen_later["upgrade_id"] == fields["upgrade_id"]
    assert aal2_event(session(sid="s2", aal="aal2"), now_ms())["upgrade_id"] != fields["upgrade_id"]


def test_a_lost_marker_does_not_double_the_event(store):
    """A crash between the stream step and the marker, or a failover that lost the
    marker: the next save tries again, and the stream keeps one event."""
    first = save(store, "fp1", session(aal="aal2")).aal2_event_id
    drop(store, store.keys.aal2_marker("s1"))
    assert save(store, "fp1", session(aal="aal2")).aal2_event_id is None
    [(stored_id, _)] = store.aal2_events()
    assert stored_id == first
    assert expiry_of(store, store.keys.aal2_marker("s1")) > 0  # marked again


def test_after_redis_lost_everything_a_repeat_has_the_same_upgrade_id(store):
    save(store, "fp1", session(aal="aal2"))
    [(_, fields)] = store.aal2_events()
    drop(store, store.keys.aal2_marker("s1"))
    drop(store, store.keys.aal2_upgrade(fields["upgrade_id"]))
    save(store, "fp1", session(aal="aal2"))
    first, second = store.aal2_events()
    assert first[0] != second[0]
    assert first[1]["upgrade_id"] == second[1]["upgrade_id"]  # what consumers de-duplicate on


def test_a_rejection_through_one_credential_ends_older_acceptances_of_others(store):
    save(store, "fp1", session())
    asked_before = session(validated_at=now_ms() - 20)
    store.forget("fp1", session(), Rejection(now_ms(), keep_ms=10_000))
    assert not save(store, "fp2", asked_before).cached  # the same session, another cookie
    assert store.load("s1") is None
    asked_after = session(validated_at=now_ms() + 1)
    assert save(store, "fp2", asked_after).cached
    assert store.load("s1") is not None
    assert isinstance(store.find_credential("fp1"), Rejection)  # still, for its own credential


def test_a_rejection_is_not_undone_by_an_older_acceptance_landing_later(store):
    rejected_at = now_ms()
    save(store, "fp1", session(validated_at=rejected_at - 100))
    store.forget("fp1", None, Rejection(rejected_at, keep_ms=10_000))
    late = save(store, "fp1", session(aal="aal2", validated_at=rejected_at - 10))
    assert not late.cached
    assert store.load("s1") is None
    assert store.aal2_events() == []  # nothing is recorded from an answer that lost
    found = store.lookup("fp1", now_ms(), 5000, 100, with_app=False)
    assert found == Lookup(Rejection(rejected_at))


def test_a_newer_acceptance_is_not_undone_by_an_older_rejection(store):
    asked_at = now_ms()
    save(store, "fp1", session(validated_at=asked_at))
    store.forget("fp1", None, Rejection(asked_at - 10, keep_ms=10_000))
    assert store.find_credential("fp1") == CredentialEntry("s1", asked_at)
    assert store.load("s1") is not None


@pytest.mark.parametrize("store_kind", ["standalone", "sentinel", "cluster"])
def test_a_process_that_knew_the_credential_sees_its_rejection(store_url, kratos, prefix):
    one, other = (build_store(bridge_settings(kratos, store_url, prefix)) for _ in range(2))
    save(one, "fp1", session(validated_at=now_ms() - 10))
    assert other.lookup("fp1", now_ms(), 5000, 0, with_app=False).entry.session_id == "s1"
    rejected_at = now_ms()
    one.forget("fp1", None, Rejection(rejected_at, keep_ms=10_000))
    assert other.lookup("fp1", now_ms(), 5000, 0, with_app=False) == Lookup(Rejection(rejected_at))
    one.close()
    other.close()


def test_the_shipped_redis_config_is_what_a_real_redis_runs(tmp_path):
    """config/redis/redis.conf (used by the compose stack) is read by a real redis-server,
    and the settings the README relies on for durable AAL2 events are in force."""
    port = free_port()
    process = subprocess.Popen(
        [
            "redis-server",
            str(ROOT / "config" / "redis" / "redis.conf"),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(port=port)
        wait_until(client.ping, 10, "redis-server with the shipped config")
        settings = {
            name: client.config_get(name)[name]
            for name in ("appendonly", "appendfsync", "maxmemory-policy")
        }
        assert settings == {
            "appendonly": "yes",
            "appendfsync": "always",
            "maxmemory-policy": "noeviction",
        }
        client.close()
    finally:
        stop_process(process)


def test_a_remarked_session_keeps_the_later_expiry(store):
    """A marker written again (after it was lost) by a late answer from before an extend
    keeps the extended expiry."""
    newer = session(aal="aal2", expires_in_ms=120_000)
    save(store, "fp1", newer)
    marker = store.keys.aal2_marker("s1")
    drop(store, marker)
    older = session(aal="aal2", expires_in_ms=30_000, validated_at=newer.validated_at_ms - 10)
    save(store, "fp2", older)
    assert expiry_of(store, marker) == newer.expires_at_ms + AAL2_MARKER_GRACE_MS


def test_an_extend_keeps_the_upgrade_recorded_as_long_as_the_session(store, monkeypatch):
    """The upgrade key follows the session's expiry when Kratos extends it, so a marker
    lost after the first expiry still finds the upgrade recorded (grace shortened)."""
    for module in (bridge.store.redis.store, bridge.store.memory.store):
        monkeypatch.setattr(module, "AAL2_MARKER_GRACE_MS", 200)
    save(store, "fp1", session(aal="aal2", expires_in_ms=SHORT_MS))
    save(store, "fp1", session(aal="aal2", expires_in_ms=60_000))  # Kratos extended it
    time.sleep((SHORT_MS + 300) / 1000)  # past the first expiry and its grace; it lives on
    drop(store, store.keys.aal2_marker("s1"))
    save(store, "fp1", session(aal="aal2", expires_in_ms=60_000))
    assert len(store.aal2_events()) == 1


@pytest.mark.parametrize("store_kind", ["standalone", "sentinel", "cluster"])
def test_an_old_cookie_rejected_where_it_was_never_seen_still_ends_the_session(
    store_url, kratos, prefix
):
    """After an extend the browser holds a re-issued cookie; the old one's pointer lives
    as long as the session, so a 401 for it, met by a process that never saw it, still
    reaches the session's slot."""
    one, other = (build_store(bridge_settings(kratos, store_url, prefix)) for _ in range(2))
    save(one, "old", session(expires_in_ms=SHORT_MS))
    save(one, "new", session(expires_in_ms=60_000))
    time.sleep((SHORT_MS + 100) / 1000)  # the old cookie's own expiry has passed
    asked_before = session(validated_at=now_ms() - 20)
    other.forget("old", None, Rejection(now_ms(), keep_ms=10_000))
    found = one.lookup("old", now_ms(), 5000, 0, with_app=False)
    assert isinstance(found.entry, Rejection) and found.session is None
    assert not save(one, "third", asked_before).cached
    one.close()
    other.close()


@pytest.mark.parametrize("store_kind", ["standalone", "sentinel", "cluster"])
def test_a_stream_step_that_fails_costs_no_login_and_is_retried(store):
    """The stream's key holds something else (as a misconfigured neighbour could): the
    session is saved, the event is not marked, and the next save records it."""
    store._redis.set(store.keys.aal2_stream, "not a stream")
    first = save(store, "fp1", session(aal="aal2"))
    assert first.cached and first.aal2_event_id is None
    assert store.load("s1") is not None
    assert not store._redis.exists(store.keys.aal2_marker("s1"))
    store._redis.delete(store.keys.aal2_stream)
    assert save(store, "fp1", session(aal="aal2")).aal2_event_id is not None
    assert len(store.aal2_events()) == 1


@pytest.mark.parametrize("store_kind", ["sentinel"])  # a master with a replica
def test_the_stream_step_writes_even_when_the_event_is_there(store):
    """Redis 7.2+ WAIT counts only the calling connection's writes: a stream step that
    found the event recorded by another process must still write, so the WAIT before
    the marker covers the event."""
    save(store, "fp1", session(aal="aal2"))
    drop(store, store.keys.aal2_marker("s1"))
    offset = store._redis.info("replication")["master_repl_offset"]
    save(store, "fp1", session(aal="aal2"))
    assert store._redis.info("replication")["master_repl_offset"] > offset
    assert len(store.aal2_events()) == 1


def ended_fields(sid: str, reason: str = "revoked") -> dict[str, str]:
    return {"session_id": sid, "identity_id": "i1", "reason": reason, "at": "t", "by": "admin"}


def test_a_sessions_end_is_recorded_once_however_many_processes_see_it(store):
    start = store.last_ended_id()
    keep_until = now_ms() + 60_000
    with ThreadPoolExecutor(8) as pool:
        ids = list(
            pool.map(lambda _: store.record_ended("s1", ended_fields("s1"), keep_until), range(16))
        )
    appended = [entry_id for entry_id in ids if entry_id is not None]
    assert len(appended) == 1
    # Another reason for the same session later (a 401 after the revocation): still one.
    assert store.record_ended("s1", ended_fields("s1", "rejected"), keep_until) is None
    assert store.read_ended(start, 100, 1) == [(appended[0], ended_fields("s1"))]
    assert store.last_ended_id() == appended[0]
    assert key_slot(store.keys.session_ended("s1").encode()) == key_slot(
        store.keys.ended_stream.encode()
    )
    assert keep_until - 100 <= expiry_of(store, store.keys.session_ended("s1")) <= keep_until


def test_a_reader_waiting_on_the_ended_stream_wakes_at_once(store):
    start = store.last_ended_id()
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(store.read_ended, start, 10, 5000)
        time.sleep(0.2)
        began = time.monotonic()
        store.record_ended("s2", ended_fields("s2"), now_ms() + 60_000)
        found = waiting.result()
        assert time.monotonic() - began < 1.0
    assert [fields["session_id"] for _, fields in found] == ["s2"]
    assert store.read_ended(found[-1][0], 10, 100) == []  # nothing after it: waited, none


def test_a_consumer_group_of_two_readers_gets_each_end_once(store):
    store.record_ended("before", ended_fields("before"), now_ms() + 60_000)
    assert store.read_ended_group("apps", "a", 10, 1) == []  # makes the group at the end
    for sid in ("f1", "f2", "f3"):
        store.record_ended(sid, ended_fields(sid), now_ms() + 60_000)
    first = store.read_ended_group("apps", "a", 2, 1)
    second = store.read_ended_group("apps", "b", 2, 1)
    assert [f["session_id"] for _, f in first] == ["f1", "f2"]
    assert [f["session_id"] for _, f in second] == ["f3"]
    assert store.read_ended_group("apps", "a", 2, 1) == []
    store.ack_ended("apps", [entry_id for entry_id, _ in first + second])

    sids = [f"g{i}" for i in range(40)]
    got: dict[str, list[str]] = {"a": [], "b": []}

    def read(consumer: str) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(got["a"]) + len(got["b"]) < len(sids):
            for entry_id, fields in store.read_ended_group("apps", consumer, 3, 100):
                got[consumer].append(fields["session_id"])
                store.ack_ended("apps", [entry_id])

    readers = [threading.Thread(target=read, args=(c,)) for c in ("a", "b")]
    for reader in readers:
        reader.start()
    for sid in sids:
        store.record_ended(sid, ended_fields(sid), now_ms() + 60_000)
        store.record_ended(sid, ended_fields(sid), now_ms() + 60_000)  # a second process
    for reader in readers:
        reader.join()
    assert sorted(got["a"] + got["b"]) == sorted(sids)


def test_a_session_is_idle_once_its_last_use_is_older_than_the_limit_and_stays_so(store):
    mirrored = session(expires_in_ms=60_000)
    save(store, "fp1", mirrored)
    start = now_ms()
    assert store.use("s1", start, 5000) is None  # the first use: nothing to compare
    assert expiry_of(store, store.keys.last_use("s1")) == mirrored.expires_at_ms
    assert store.lookup("fp1", start + 5000, 60_000, 0, with_app=False, idle_ms=5000).idle is None
    store.record_uses({"s1": start + 9000, "s2": start})  # s2 has no mirror: not recorded
    assert not exists(store, store.keys.last_use("s2"))
    assert store.use("s1", start + 4000, 5000) is None  # an older use changes nothing

    found = store.lookup("fp1", start + 14_001, 60_000, 0, with_app=False, idle_ms=5000)
    assert found == Lookup(None, idle=Idle("s1", first=True))
    # Found once: every later step, in any process, sees it idle and is not the first.
    assert store.use("s1", start + 14_002, 5000) == Idle("s1", first=False)
    store.record_uses({"s1": start + 14_003})
    again = store.lookup("fp1", start + 14_004, 60_000, 0, with_app=False, idle_ms=5000)
    assert again.idle == Idle("s1", first=False)
    assert expiry_of(store, store.keys.last_use("s1")) == mirrored.expires_at_ms
    # Without an idle limit the lookup is what it always was.
    assert store.lookup("fp1", start, 60_000, 0, with_app=False).session is not None


def test_the_last_use_outlives_the_mirror_and_follows_an_extension(store):
    first = session(expires_in_ms=60_000)
    save(store, "fp1", first)
    start = now_ms()
    assert store.use("s1", start, 5000) is None
    store.end_session("s1", now_ms(), 1000)  # the mirror goes, the record stays
    assert store.use("s1", start + 1000, 5000) is None
    assert expiry_of(store, store.keys.last_use("s1")) == first.expires_at_ms
    extended = session(expires_in_ms=120_000)
    save(store, "fp2", extended)
    store.record_uses({"s1": start + 2000})
    assert expiry_of(store, store.keys.last_use("s1")) == extended.expires_at_ms
    assert store.use("s1", start + 7001, 5000) == Idle("s1", first=True)  # 2000 was kept


def test_an_extension_is_claimed_once_per_expiry(store):
    expires_at = now_ms() + 60_000
    with ThreadPoolExecutor(8) as pool:
        claims = list(pool.map(lambda _: store.claim_extension("s1", expires_at), range(16)))
    assert claims.count(True) == 1
    assert expiry_of(store, store.keys.extension("s1", expires_at)) == expires_at
    assert store.claim_extension("s1", expires_at + 60_000)  # the next window's own claim
    assert store.claim_extension("s2", expires_at)
