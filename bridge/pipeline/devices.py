"""Device-change signals: a known session used from another IP address or user agent than
the one Kratos recorded when it was created.

The client address is the request's peer, unless the peer is a trusted proxy
(``BRIDGE_TRUSTED_PROXIES``): then it is the last address in ``X-Forwarded-For`` that is
not itself a trusted proxy (the proxies append, so everything left of the first untrusted
address is the client's own claim). Without trusted proxies the address is not known
and only the user agent is compared.

A change is recorded once per session and change (``record``), and, with ``deny``, the
request is refused too. The check costs a string comparison on the hot path; recording
happens on a background thread, at most once per process per change (and once in all,
through the store), so a session hammering the bridge from a new device costs one write.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from bridge.bounded import BoundedMap
from bridge.clock import iso
from bridge.logs import Throttled
from bridge.sessions.session import MirroredSession
from bridge.web.request import HeaderView, declare_read

log = logging.getLogger(__name__)
_failures = Throttled(log)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_PENDING = 1000
MAX_USER_AGENT = 256  # compared, stored and remembered: one session cannot make it costly
DEVICE_HEADERS = declare_read("user-agent", "x-forwarded-for")


@dataclass(frozen=True, slots=True)
class DeviceChange:
    """What differs between Kratos's record of the session and this request."""

    change_id: str  # the same for the same session and the same new device, everywhere
    session_id: str
    identity_id: str
    expires_at_ms: int
    old_ip: str
    new_ip: str
    old_user_agent: str
    new_user_agent: str

    def fields(self, seen_at_ms: int) -> dict[str, str]:
        return {
            "change_id": self.change_id,
            "session_id": self.session_id,
            "identity_id": self.identity_id,
            "old_ip": self.old_ip,
            "new_ip": self.new_ip,
            "old_user_agent": self.old_user_agent,
            "new_user_agent": self.new_user_agent,
            "seen_at": iso(seen_at_ms),
        }


def client_address(headers: HeaderView, trusted: tuple[Network, ...] | None) -> str | None:
    """The client's address, or ``None`` when it cannot be known (see the module); in one
    spelling (``normal_ip``), so that equal addresses compare equal."""
    peer = normal_ip(headers.peer or "")
    if not trusted or peer is None:
        return None
    if not _is_trusted(peer, trusted):
        return peer
    chain = [
        hop.strip() for value in headers.get_all("x-forwarded-for") for hop in value.split(",")
    ]
    for hop in reversed(chain):
        address = normal_ip(hop)
        if address is None:
            return None  # not an address: the chain cannot be read
        if not _is_trusted(address, trusted):
            return address
    return None


def detect(
    session: MirroredSession,
    user_agent: str | None,
    ip: str | None,
    missing_user_agent_changes: bool = False,
) -> DeviceChange | None:
    """The change, when this request's user agent or address differs from Kratos's record.
    An unknown value on either side is no change, except a user agent the request leaves
    out (or sends empty) where Kratos recorded one, with ``missing_user_agent_changes``:
    ``deny`` sets it, or leaving the header out would be the way around it."""
    device = session.kratos.get("device") or {}
    old_ua = (device.get("user_agent") or "")[:MAX_USER_AGENT]
    if user_agent:
        ua_changed = bool(old_ua and user_agent != old_ua)
    else:
        ua_changed = bool(old_ua and missing_user_agent_changes)
    ip_changed = False
    old_ip = ""
    if ip or ua_changed:
        recorded = device.get("ip_address") or ""
        old_ip = normal_ip(recorded) or recorded
        ip_changed = bool(ip and old_ip and ip != old_ip)
    if not (ua_changed or ip_changed):
        return None
    new_ua = (user_agent or "") if ua_changed else old_ua
    new_ip = ip if ip_changed and ip else old_ip
    digest = hashlib.sha256(f"{session.id}\x00{new_ip}\x00{new_ua}".encode()).hexdigest()
    return DeviceChange(
        digest[:32],
        session.id,
        session.identity_id,
        session.expires_at_ms,
        old_ip,
        new_ip,
        old_ua,
        new_ua,
    )


class DeviceWatch:
    """Checks each allowed session; hands new changes to ``record`` on a background thread."""

    def __init__(
        self,
        mode: str,
        trusted: tuple[Network, ...] | None,
        record: Callable[[DeviceChange], None],
    ) -> None:
        self.mode = mode
        self._trusted = trusted
        self._record = record
        # Per (session, user agent, address): whether it is a change (already handed on).
        self._known: BoundedMap[tuple[str, str | None, str | None], bool] = BoundedMap(50_000)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="device-signals")
        self._pending = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def refuses(self, session: MirroredSession, headers: HeaderView) -> bool:
        """Whether the request came from another device than Kratos recorded and the mode
        says to refuse it; a new change is recorded either way."""
        user_agent = headers.get("user-agent")
        if user_agent is not None:
            user_agent = user_agent[:MAX_USER_AGENT]
        ip = client_address(headers, self._trusted) if self._trusted else None
        deny = self.mode == "deny"
        if not user_agent and ip is None and not deny:
            return False
        key = (session.id, user_agent, ip)
        changed = self._known.get(key)
        if changed is None:
            change = detect(session, user_agent, ip, missing_user_agent_changes=deny)
            changed = change is not None
            self._known.put(key, changed)
            if change is not None:
                self._submit(change, key)
        return changed and deny

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _submit(self, change: DeviceChange, key: tuple[str, str | None, str | None]) -> None:
        with self._lock:
            if self._pending >= MAX_PENDING:
                _failures.warning("device-change signals are backing up: one dropped")
                self._known.pop(key)
                return
            self._pending += 1
        self._pool.submit(self._write, change, key)

    def _write(self, change: DeviceChange, key: tuple[str, str | None, str | None]) -> None:
        try:
            self._record(change)
        except Exception as error:  # the store is down: the next request tries again
            self._known.pop(key)
            _failures.warning("a device-change signal was not recorded: %s", error)
        finally:
            with self._lock:
                self._pending -= 1


@functools.lru_cache(maxsize=4096)
def normal_ip(value: str) -> str | None:
    """An address in one spelling, or ``None`` for what is not one: without a port (Kratos
    records a bare connection's as ``127.0.0.1:45418`` or ``[::1]:45418``), an IPv4 address
    mapped into IPv6 (``::ffff:1.2.3.4``, a dual-stack socket's peer) as IPv4, and IPv6 in
    its compressed lower-case form."""
    value = value.strip()
    if value.startswith("["):
        value = value[1:].partition("]")[0]
    elif value.count(":") == 1:
        value = value.partition(":")[0]
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


def _is_trusted(address: str, trusted: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)
