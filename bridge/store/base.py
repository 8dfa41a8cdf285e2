"""Where mirrored sessions live: one protocol, a Redis and an in-process implementation.

Freshness belongs to a credential, not to a session: a session can be reached
through several credentials (a token, cookies re-issued by Kratos), and Kratos
may reject one while accepting another (an old cookie). So each credential
records when Kratos last accepted it, and only that time makes it fresh.

Key layout (``p`` = ``BRIDGE_KEY_PREFIX``). Every atomic step (one Lua script)
touches the keys of one Redis Cluster hash slot, so the same layout serves a
standalone Redis, Sentinel and Cluster:

Slot of ``{<sid>}``, everything about one session:

- ``p{sid}:session``      hash: ``kratos`` (JSON view), ``validated_at``, ``expires_at`` (ms),
  ``csrf`` (the session's CSRF token, made when the key is created and kept until it goes);
  expires at Kratos's ``expires_at`` (PEXPIREAT, moves on extend).
- ``p{sid}:app``          hash: data apps add to the session, one field per name; expires at
  the same instant as the session key, and is deleted with it when the session is forgotten.
- ``p{sid}:credentials``  hash: per credential fingerprint, ``<validated_at ms>`` when Kratos
  accepted it or ``-<rejected_at ms>``; field ``!ended`` = the newest rejection of any
  of the session's credentials. Lives as long as the session or the rejection.
- ``p{sid}:aal2``         the upgrade id of the session's AAL2 event, written once the event
  is in the stream (and acknowledged by a replica where there is one).
- ``p{sid}:revalidating`` short lock so one bridge process asks Kratos for a stale session.
- ``p{sid}:used``         with ``BRIDGE_IDLE_TIMEOUT``: when the session was last used (ms), or
  ``idle`` once it was found unused for too long; kept until the session's expiry.
- ``p{sid}:extend:<expires_at ms>`` with ``BRIDGE_SESSION_EXTEND``: the claim of the one
  process that extends the session expiring then; kept until that expiry.

Slot of the credential: ``pcredential:<hmac>`` = ``<sid> <validated_at ms>`` for a
credential Kratos accepted, or ``-<rejected_at ms>`` when it rejected it. A credential
belongs to one session for good, so a process keeps this pointer in memory once read.

Slot of the identity: ``pidentity:{<identity id>}:sessions``, session ids scored by expiry.

Slot of the device stream: ``<device_stream>`` (default ``pevents:device``) and, per session
and change, ``{<device_stream>}:change:<change id>``, and per session the number of signals
it added, ``{<device_stream>}:session:<sid>`` (both kept until the session's expiry).

Slot of the stream: ``<aal2_stream>`` (default ``pevents:aal2``) and, per upgrade,
``{<aal2_stream>}:upgrade:<upgrade id>`` = the stream entry id (a stream name that has a
hash tag of its own keeps it: ``<aal2_stream>:upgrade:<id>``).

Slot of the ended stream: ``pevents:ended`` and, per session that ended,
``{pevents:ended}:session:<sid>`` = the stream entry id of its end.

A save is three independent steps (credential, session, identity; one pipeline, one
round trip on a standalone Redis), plus, once per session upgrade, the stream step and
the marker. The invariants, and why they hold:

1. Exactly one AAL2 event per session upgrade. The upgrade id is derived from Kratos's
   data (session id and when its first second factor completed), so every process and
   every retry computes the same one. The stream step appends only if the upgrade's key
   is absent, in the stream's slot, in one script. The session's marker is written after
   that step succeeded, so a crash in between means a retry, which the upgrade key turns
   into a no-op. On a master with replicas the marker also waits until one acknowledged
   the event (the stream step always writes, since WAIT counts the caller's own writes),
   so a failover cannot keep a marker and lose its event. When Kratos extends a session,
   its upgrade key and its other credentials' pointers move with it. Across a Redis
   that lost its data (no persistence, or a failover that
   lost unreplicated writes), the event carries ``upgrade_id`` for consumers to
   de-duplicate on; with ``appendonly yes`` and ``appendfsync always`` none is doubled.
2. A rejection is never overwritten by an older acceptance. The credential step and the
   session step each compare the acceptance's ``validated_at`` (when Kratos was asked)
   with the rejection recorded in their own slot and write nothing when it is older. A
   rejection the session slot has not heard of yet (the pointer alone knew it) is
   carried there by the save that lost the race, before it returns.
3. A revoked session is refused within ``revalidate_after``: a request is answered only
   from an acceptance of its own credential asked no longer ago than that, read from the
   session's slot together with the mirror it answers with; nothing else makes a
   credential fresh.

4. App data never outlives its session. A write to ``p{sid}:app`` and the check that
   ``p{sid}:session`` exists are one script, which sets the app hash's expiry to the
   session key's; every step that drops the session key deletes the app hash in the same
   script. A write changes single fields (HSET, HDEL), so writers of different fields of
   one session never undo each other.

5. Exactly one ended event per session. The stream step appends only if the session's
   key in the stream's slot is absent, and writes that key, in one script; every process
   that sees the end (a 401 seen by two processes at once, a revocation retried) runs the
   same step with the same session id, so all but the first change nothing.

The identity index is written by its own step and may, for a moment after a rejection
raced a save, name a session that ended; readers check the session key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from bridge.sessions.session import MirroredSession
from bridge.store.registry import SessionRegistry

EndedListener = Callable[[str | None, int], None]
"""Told ``(session id, ended at ms)`` when a session was ended in any process, and
``(None, 0)`` when announcements may have been missed (a new subscription)."""

AAL2_MARKER_GRACE_MS = 7 * 24 * 3600 * 1000
MAX_DEVICE_CHANGES_PER_SESSION = 16
"""Device-change signals one session may add to the stream: more would let one session
(a stolen one, say) push everyone else's signals out of the capped stream."""
MAX_APP_FIELDS = 256
"""Fields one session's app data may hold, beside its byte cap: every write reads them all."""
ENDED_REASONS = ("revoked", "logged_out", "expired", "idle", "rejected")
"""Why a session ended, as the ended stream's ``reason`` says (README, "Ended sessions")."""
ENDED = "!ended"  # the field of ``p{sid}:credentials`` no fingerprint can be (base64url)
"""How long past a session's expiry its "AAL2 recorded" marker stays: Kratos can revive
an expired session (admin extend), and that must not record the same upgrade twice."""


@dataclass(frozen=True, slots=True)
class CredentialEntry:
    """What the store knows about one credential Kratos accepted."""

    session_id: str
    validated_at_ms: int

    @classmethod
    def decode(cls, value: str) -> CredentialEntry | None:
        session_id, _, validated_at = value.partition(" ")
        if not session_id or not validated_at.isdigit():
            return None
        return cls(session_id, int(validated_at))


@dataclass(frozen=True, slots=True)
class SaveResult:
    cached: bool  # False when a newer rejection of this credential won the race
    aal2_event_id: str | None
    csrf_token: str = field(default="", repr=False)  # the session's, when ``cached``


@dataclass(frozen=True, slots=True)
class Lock:
    """The short lock that lets one process re-validate a session, as its holder knows it."""

    session_id: str
    token: str


@dataclass(frozen=True, slots=True)
class Lookup:
    """What the store knows about a credential, read in one step (one Redis round trip)."""

    entry: CredentialEntry | Rejection | None
    session: MirroredSession | None = None  # the mirror, with this credential's validated_at
    lock: Lock | None = None  # the re-validation lock, when this lookup took it
    peer_busy: bool = False  # another process holds that lock
    idle: Idle | None = None  # with an idle limit: the session was found unused too long


@dataclass(frozen=True, slots=True)
class Idle:
    """A session found unused for longer than the idle limit."""

    session_id: str
    first: bool  # found so by this very step, whose caller ends the session


@dataclass(frozen=True, slots=True)
class Rejection:
    """Kratos rejected the credential; the answer arrived at ``rejected_at_ms``."""

    rejected_at_ms: int
    keep_ms: int = field(default=0, compare=False)  # how long the store remembers it


@dataclass(frozen=True)
class Keys:
    prefix: str
    aal2_stream: str
    device_stream: str = ""  # default: ``<prefix>events:device``

    def __post_init__(self) -> None:
        if not self.device_stream:
            object.__setattr__(self, "device_stream", self.prefix + "events:device")

    @property
    def ended_stream(self) -> str:
        """The stream of ended sessions, for apps (``bridge.client.SessionClient.follow_ended``)."""
        return self.prefix + "events:ended"

    def session(self, sid: str) -> str:
        return f"{self.prefix}{{{sid}}}:session"

    def app(self, sid: str) -> str:
        return f"{self.prefix}{{{sid}}}:app"

    def credentials(self, sid: str) -> str:
        return f"{self.prefix}{{{sid}}}:credentials"

    def aal2_marker(self, sid: str) -> str:
        return f"{self.prefix}{{{sid}}}:aal2"

    def revalidating(self, sid: str) -> str:
        return f"{self.prefix}{{{sid}}}:revalidating"

    def last_use(self, sid: str) -> str:
        return f"{self.prefix}{{{sid}}}:used"

    def extension(self, sid: str, expires_at_ms: int) -> str:
        return f"{self.prefix}{{{sid}}}:extend:{expires_at_ms}"

    def credential(self, fingerprint: str) -> str:
        return f"{self.prefix}credential:{fingerprint}"

    @property
    def ended_channel(self) -> str:
        """Pub/sub channel on which ended (revoked) sessions are announced."""
        return f"{self.prefix}sessions:ended"

    def identity_sessions(self, identity_id: str) -> str:
        return f"{self.prefix}identity:{{{identity_id}}}:sessions"

    def aal2_upgrade(self, upgrade_id: str) -> str:
        """The key that makes the stream hold one event per upgrade: in the stream's slot."""
        return in_slot_of(self.aal2_stream, f"upgrade:{upgrade_id}")

    def device_session_count(self, session_id: str) -> str:
        """How many device-change signals a session has added: in the device stream's slot."""
        return in_slot_of(self.device_stream, f"session:{session_id}")

    def device_change(self, change_id: str) -> str:
        """The key that makes the device stream hold one signal per session and change."""
        return in_slot_of(self.device_stream, f"change:{change_id}")

    def session_ended(self, session_id: str) -> str:
        """The key that makes the ended stream hold one event per session: in its slot."""
        return in_slot_of(self.ended_stream, f"session:{session_id}")


def in_slot_of(stream: str, suffix: str) -> str:
    """A key beside ``stream`` in Redis Cluster's hash slot of that stream."""
    if has_hash_tag(stream):
        return f"{stream}:{suffix}"
    return f"{{{stream}}}:{suffix}"


def has_hash_tag(key: str) -> bool:
    """Whether Redis Cluster hashes ``key`` by a ``{tag}`` inside it rather than whole."""
    start = key.find("{")
    return start >= 0 and key.find("}", start + 1) > start + 1


class SessionReader(Protocol):
    """Reading one mirrored session: the mirror, the admin side and the apps' client."""

    def load(self, session_id: str, *, with_app: bool = False) -> MirroredSession | None:
        """The mirrored session, or ``None`` when there is none (or it expired)."""


class SessionSaver(Protocol):
    """Recording what Kratos answered: the mirror, and the web hooks with a session Kratos
    just issued."""

    def save(
        self,
        fingerprint: str,
        session: MirroredSession,
        aal2_event: dict[str, str] | None,
        now_ms: int,
        release: Lock | None = None,
    ) -> SaveResult:
        """Record that Kratos accepted the credential at ``session.validated_at_ms`` (when
        the check started), write the mirror with expiry ``session.expires_at_ms`` unless a
        newer one is there (a mirror written where there was none gets a new CSRF token,
        returned in ``csrf_token``), index it under its identity, and append ``aal2_event``
        unless this session already has one; release ``release``. Writes nothing but the
        release (``cached=False``) when a rejection of the credential arrived after this
        check started."""


StreamEntry = tuple[str, dict[str, str]]
"""A stream entry: its id (``<ms>-<seq>``) and fields."""


class EndedStream(Protocol):
    """Where the bridge tells apps that a session ended (``<prefix>events:ended``)."""

    def record_ended(
        self, session_id: str, fields: dict[str, str], keep_until_ms: int
    ) -> str | None:
        """Append ``fields`` to the ended stream unless this session's end is in it already
        (remembered until ``keep_until_ms``), in one step in the stream's slot; the entry
        id when appended now, ``None`` when it was there."""


class EndedReader(Protocol):
    """Reading the ended stream: ``bridge.client.SessionClient.follow_ended``."""

    def last_ended_id(self) -> str:
        """The newest entry's id (``0-0`` for an empty stream): where a reader that wants
        only what comes next starts."""

    def read_ended(self, after_id: str, count: int, block_ms: int) -> list[StreamEntry]:
        """Up to ``count`` entries after ``after_id``, oldest first; when there is none,
        wait up to ``block_ms`` (> 0) for one."""

    def read_ended_group(
        self, group: str, consumer: str, count: int, block_ms: int
    ) -> list[StreamEntry]:
        """Up to ``count`` entries no consumer of ``group`` was given yet, now given to
        ``consumer`` and pending until acknowledged; waits as ``read_ended``. A new group
        starts at the stream's end."""

    def ack_ended(self, group: str, entry_ids: list[str]) -> None:
        """The group's consumer is done with these entries."""


class MirrorStore(SessionReader, SessionSaver, EndedStream, Protocol):
    """What the session mirror (``bridge.sessions.mirror``) needs."""

    def lookup(
        self,
        fingerprint: str,
        now_ms: int,
        fresh_for_ms: int,
        lock_ms: int,
        *,
        with_app: bool,
        idle_ms: int = 0,
    ) -> Lookup:
        """The credential's entry and, for an accepted one, its session (with the app data
        when ``with_app``), in one step. When the credential was validated ``fresh_for_ms``
        or longer before ``now_ms`` and ``lock_ms`` > 0, also try to take the session's
        re-validation lock for ``lock_ms``. With ``idle_ms``, first ``use`` the session
        of a credential whose session is known (``Lookup.idle`` and nothing else when it
        is idle)."""

    def use(self, session_id: str, at_ms: int, idle_ms: int) -> Idle | None:
        """Record a use of the session at ``at_ms``, unless its last recorded use is more
        than ``idle_ms`` older (0: no check): then mark it idle for good and say so (``Idle``,
        ``first`` when this call marked it). The record lives until the session's expiry
        (nothing is recorded while its mirror is gone, unless a record is there)."""

    def record_uses(self, uses: Mapping[str, int]) -> None:
        """``use`` each session at its time, without the idle check (answers a process
        gave from its copy, written in one batch)."""

    def claim_extension(self, session_id: str, expires_at_ms: int) -> bool:
        """Claim the extension of the session that expires at ``expires_at_ms``: ``True``
        for the first caller only, in any process, until that expiry."""

    def forget(
        self,
        fingerprint: str,
        seen: MirroredSession | None,
        rejection: Rejection,
        release: Lock | None = None,
    ) -> None:
        """Kratos rejected a credential: drop the mirror of the session it was last seen
        with and its app data, remember the rejection for ``rejection.keep_ms``, and
        release ``release``."""

    def follow_ended(self, listener: EndedListener) -> None:
        """Call ``listener`` for each ended session announced from now on, from any
        process, until the store is closed."""

    def release_revalidation(self, lock: Lock) -> None: ...

    def revalidation_pending(self, session_id: str) -> bool:
        """Whether someone holds the re-validation lock of this session."""

    def on_loop(self) -> MissStepsOnLoop:
        """The steps of a miss as coroutines, for the event loop that calls this."""


class MissStepsOnLoop(Protocol):
    """What a miss asks of the store, as coroutines on one event loop: each is the
    ``MirrorStore`` method of the same name, with the same answers and guarantees."""

    async def lookup(
        self,
        fingerprint: str,
        now_ms: int,
        fresh_for_ms: int,
        lock_ms: int,
        *,
        with_app: bool,
        idle_ms: int = 0,
    ) -> Lookup: ...

    async def save(
        self,
        fingerprint: str,
        session: MirroredSession,
        aal2_event: dict[str, str] | None,
        now_ms: int,
        release: Lock | None = None,
    ) -> SaveResult: ...

    async def forget(
        self,
        fingerprint: str,
        seen: MirroredSession | None,
        rejection: Rejection,
        release: Lock | None = None,
    ) -> None: ...

    async def release_revalidation(self, lock: Lock) -> None: ...

    async def revalidation_pending(self, session_id: str) -> bool: ...

    async def use(self, session_id: str, at_ms: int, idle_ms: int) -> Idle | None: ...

    async def aclose(self) -> None: ...


class AppDataStore(SessionReader, EndedReader, Protocol):
    """What the apps' side needs: ``PATCH /whoami/app`` and ``bridge.client``."""

    def update_app(
        self, session_id: str, values: Mapping[str, str], delete: Iterable[str], max_bytes: int
    ) -> dict[str, str]:
        """Set ``values`` then delete ``delete`` in the session's app hash, in one step, and
        return the whole hash after the change. ``SessionEnded`` (nothing written) when the
        session's mirror is gone; ``AppDataTooLarge`` (nothing written) when the hash would
        hold more than ``max_bytes`` (UTF-8 bytes of every field's name and value) and more
        than it holds now, so a change that shrinks it always goes through. The hash
        expires with the session."""

    def load_app(self, session_id: str) -> dict[str, str]:
        """The session's app hash; ``SessionEnded`` when the session's mirror is gone."""

    def close(self) -> None: ...


class AdminStore(SessionReader, EndedStream, Protocol):
    """What the admin side (``bridge.admin.sessions``) needs: the registry, the sessions
    of an identity, revocations and the streams it shows."""

    # Read-only here, so each backend may hold its own registry class.
    @property
    def registry(self) -> SessionRegistry: ...

    def identity_session_ids(self, identity_id: str, now_ms: int) -> list[str]:
        """Unexpired session ids of an identity, soonest expiry first."""

    def end_session(self, session_id: str, ended_at_ms: int, keep_ms: int) -> bool:
        """A session ended outside the bridge (an admin revoked it in Kratos): drop its
        mirror and app data, refuse for ``keep_ms`` every save of it asked of Kratos before
        ``ended_at_ms``, and announce it to every process following ended sessions.
        ``True`` when there was a mirror."""

    def aal2_event_range(
        self, after_id: str | None, since_ms: int, until_ms: int, count: int
    ) -> list[tuple[str, dict[str, str]]]:
        """Up to ``count`` AAL2 events, oldest first, recorded from ``since_ms`` to
        ``until_ms`` (inclusive) and after the entry ``after_id`` when given."""

    def device_changes(self, count: int = 100) -> list[tuple[str, dict[str, str]]]:
        """The oldest ``count`` device-change signals as ``(entry id, fields)``."""


class DeviceStream(Protocol):
    """Where the device watch's signals go (``bridge.web.app.device_recorder``)."""

    def record_device_change(
        self, change_id: str, fields: dict[str, str], keep_until_ms: int
    ) -> bool:
        """Append a device-change signal to the device stream unless ``change_id`` was
        recorded before (remembered until ``keep_until_ms``, the session's expiry), in one
        step in the stream's slot; ``True`` when appended."""


class HealthStore(Protocol):
    """What readiness (``bridge.web.health``) and ``kratos-bridge check`` ask."""

    def ping(self) -> None: ...

    def topology(self) -> dict[str, object]:
        """What the store runs on (``kind``: embedded, standalone, sentinel, cluster; the
        master's address, the number of masters and replicas), as found now."""


class SessionStore(MirrorStore, AppDataStore, AdminStore, DeviceStream, HealthStore, Protocol):
    """All of it: what a backend implements. Failures raise ``StoreUnavailable``."""

    keys: Keys

    # Told the name of each operation that failed for want of the store (metrics).
    error_observer: Callable[[str], None] | None

    # The three below serve no part of the bridge today; the tests read each backend's
    # state through them, so both keep them alike.
    def find_credential(self, fingerprint: str) -> CredentialEntry | Rejection | None:
        """When Kratos last accepted this credential and for which session, when it last
        rejected it, or ``None`` if unknown."""

    def claim_revalidation(self, session_id: str, ttl_ms: int) -> Lock | None:
        """Take the short lock that lets one process re-validate a session: the ``Lock``
        (with its token), or ``None`` if someone holds it."""

    def aal2_events(self, count: int = 100) -> list[tuple[str, dict[str, str]]]:
        """The oldest ``count`` AAL2 events as ``(event id, fields)``."""
