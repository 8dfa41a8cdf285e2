"""The forward-auth decision (``/auth``): credential -> session -> policy -> response.

It runs in two steps so that the server can answer most requests without leaving its
event loop: ``begin`` does no I/O (it reads the request and this process's fresh
copy of sessions) and either answers or hands back what it found; ``finish`` asks
the store and Kratos, and runs on a worker thread. A slow Kratos or Redis can then
hold up only the requests that need them.
"""

from __future__ import annotations

from dataclasses import dataclass

from bridge import policy, responses
from bridge.bounded import BoundedMap
from bridge.credentials import Credential, extract
from bridge.errors import BridgeError
from bridge.mirror import SessionMirror, now_ms
from bridge.request import HeaderView, original_url
from bridge.responses import Reply
from bridge.session import MirroredSession


@dataclass(frozen=True, slots=True)
class Pending:
    """A well-formed request the process's copy cannot answer."""

    headers: HeaderView
    credential: Credential
    required_aal: str | None
    started_ms: int


class ForwardAuth:
    def __init__(self, mirror: SessionMirror, cookie_name: str, login_url: str) -> None:
        self._mirror = mirror
        self._cookie_name = cookie_name
        self._login_url = login_url
        # Holding the session keeps its id from being reused while the entry lives.
        self._allows: BoundedMap[int, tuple[MirroredSession, Reply]] = BoundedMap(50_000)

    def __call__(self, headers: HeaderView, aal: str | None) -> Reply:
        step = self.begin(headers, aal)
        return step if isinstance(step, Reply) else self.finish(step)

    def begin(self, headers: HeaderView, aal: str | None) -> Reply | Pending:
        try:
            required = policy.required_aal(aal)
            credential = extract(headers, self._cookie_name)
            known = self._mirror.from_memory(credential)
        except BridgeError as error:
            return self._failure(error, headers)
        if known is not None and policy.meets_aal(known.session, required):
            if known.set_cookies:
                return responses.allow(known.session, known.set_cookies)
            return self._allow(known.session)
        return Pending(headers, credential, required, now_ms())

    def finish(self, pending: Pending) -> Reply:
        try:
            resolved = self._mirror.resolve(pending.credential)
            if not policy.meets_aal(resolved.session, pending.required_aal) and (
                resolved.session.validated_at_ms < pending.started_ms
            ):
                # The user may have just completed the second factor: ask Kratos, not the
                # copy (unless Kratos was just asked, for this very request).
                resolved = self._mirror.resolve(pending.credential, refresh=True)
            policy.enforce_aal(resolved.session, pending.required_aal)
        except BridgeError as error:
            return self._failure(error, pending.headers)
        return responses.allow(resolved.session, resolved.set_cookies)

    def _allow(self, session: MirroredSession) -> Reply:
        """The allow for a copy: built once per validation (a copy is one object from one
        Kratos answer to the next), then reused for each request it answers."""
        memo = self._allows.get(id(session))
        if memo is not None and memo[0] is session:
            return memo[1]
        reply = responses.allow(session, ())
        self._allows.put(id(session), (session, reply))
        return reply

    def _failure(self, error: BridgeError, headers: HeaderView) -> Reply:
        return responses.failure(error, self._login_url, original_url(headers), forward_auth=True)
