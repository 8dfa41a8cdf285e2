"""The one conversation the bridge has with Kratos: ``GET /sessions/whoami``.

Kratos's answer is reduced to one of four outcomes: a ``VouchedSession``, or
``SessionInvalid`` (401), ``StepUpRequired`` (403), ``KratosRateLimited`` (429).
Anything else, including a 200 whose body is not a session we can use, is
``KratosUnavailable``: the bridge never turns an answer it does not understand
into an allow.

What is sent to Kratos for a request is a pure function of that request's
credential: the HTTP client keeps no cookies and no default headers (see
``bridge.kratos.http_client``). A client that remembered a cookie Kratos re-issued on one
user's whoami would send it with the next user's, and Kratos reads the session
cookie before ``Authorization: Bearer``: a forged token would be answered as
that user.

Every field the bridge reads or mirrors is checked here, once: ids that become Redis
keys and headers must be UUIDs, timestamps must parse, lists must be lists. A body
that fails any check is ``KratosUnavailable``.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from bridge.clock import parse_timestamp_ms
from bridge.errors import KratosRateLimited, KratosUnavailable, SessionInvalid, StepUpRequired
from bridge.kratos.http_client import Answer, AsyncHTTPClient, HTTPClient, RequestFailed
from bridge.kratos.rate_limit import RateLimit, seconds
from bridge.logs import Throttled
from bridge.pipeline.credentials import Credential
from bridge.pipeline.redirects import url_parts

log = logging.getLogger(__name__)
_failures = Throttled(log)

AAL_LEVELS = ("aal0", "aal1", "aal2", "aal3")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_METHOD = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_ACCEPT_JSON = ("Accept", "application/json")
# Kratos's step-up URL becomes a response header: visible ASCII only.
_BROWSER_URL = re.compile(r"https?://[\x21-\x7e]{1,2048}")

KratosCallObserver = Callable[[int | str, float], None]
"""Told of each whoami call: Kratos's HTTP status (``"error"`` when Kratos could not be
reached) and the seconds it took (``bridge.observe.metrics``)."""


@dataclass(frozen=True, slots=True)
class VouchedSession:
    """A session Kratos has just vouched for, reduced to the unified view, and the
    cookies Kratos re-issued (to pass on to the browser)."""

    view: dict[str, Any]
    expires_at_ms: int
    set_cookies: tuple[str, ...]

    @property
    def id(self) -> str:
        return self.view["session_id"]


class KratosClient:
    """Asks Kratos about credentials; one per process, holding nothing but idle sockets.
    ``whoami`` blocks its thread; ``whoami_async`` is the same call as a coroutine on the
    running event loop (its own idle connections, the same headers, the same reading of
    the answer)."""

    def __init__(
        self,
        public_url: str,
        cookie_name: str,
        timeout: float,
        observe: KratosCallObserver | None = None,
    ) -> None:
        self._cookie_name = cookie_name
        self._timeout = timeout
        self._public = HTTPClient(public_url)
        self._public_on_loop = AsyncHTTPClient(public_url)
        self._observe = observe
        self.rate_limit = RateLimit()  # what Kratos says of the public API's budget

    @property
    def public(self) -> HTTPClient:
        """The transport to Kratos's public API, for the other calls made with a user's
        credential (``bridge.kratos.logout``)."""
        return self._public

    def whoami(self, credential: Credential) -> VouchedSession:
        started = time.perf_counter()
        try:
            answer = self._public.get("/sessions/whoami", self._headers(credential), self._timeout)
        except RequestFailed as error:
            raise self._unreachable(error, started) from None
        return self._vouched(answer, started)

    async def whoami_async(self, credential: Credential) -> VouchedSession:
        """``whoami`` on the running event loop; a cancelled call keeps no connection."""
        started = time.perf_counter()
        try:
            answer = await self._public_on_loop.get(
                "/sessions/whoami", self._headers(credential), self._timeout
            )
        except RequestFailed as error:
            raise self._unreachable(error, started) from None
        return self._vouched(answer, started)

    def _headers(self, credential: Credential) -> list[tuple[str, str]]:
        """All that is sent: a pure function of this credential."""
        return [_ACCEPT_JSON, *credential.headers(self._cookie_name).items()]

    def _unreachable(self, error: RequestFailed, started: float) -> KratosUnavailable:
        if self._observe is not None:
            self._observe("error", time.perf_counter() - started)
        _failures.warning("kratos whoami failed: %s", error)
        return KratosUnavailable(f"Kratos could not be reached ({error})")

    def _vouched(self, answer: Answer, started: float) -> VouchedSession:
        """Kratos's answer as one of the four outcomes."""
        if self._observe is not None:
            self._observe(answer.status, time.perf_counter() - started)
        self.rate_limit.saw(answer.status, answer.text_header)

        if answer.status == 200:
            view, expires_at_ms = parse_session(answer.body)
            cookies = tuple(c.decode("latin-1") for c in answer.header_list(b"set-cookie"))
            return VouchedSession(view, expires_at_ms, cookies)
        if answer.status == 401:
            raise SessionInvalid("Kratos does not accept the credential")
        if answer.status == 403:
            raise StepUpRequired(_redirect_browser_to(answer))
        if answer.status == 429:
            _failures.warning("kratos whoami answered 429 (rate limited)")
            raise KratosRateLimited(_retry_after(answer))
        _failures.warning("kratos whoami answered %d", answer.status)
        raise KratosUnavailable(f"Kratos answered {answer.status}")

    def ready(self) -> str | None:
        """``None`` when Kratos says it is ready, else what went wrong."""
        try:
            answer = self._public.get("/health/ready", [_ACCEPT_JSON], self._timeout)
        except RequestFailed as error:
            return f"unreachable ({error})"
        if answer.status != 200:
            return f"not ready (HTTP {answer.status})"
        return None

    def close(self) -> None:
        self._public.close()
        self._public_on_loop.close()


def parse_session(raw: bytes) -> tuple[dict[str, Any], int]:
    """Kratos's whoami body, checked, reduced to the fields the bridge promises apps
    (the unified view), and its expiry in Unix ms. ``KratosUnavailable`` if unusable."""
    try:
        body = _object(orjson.loads(raw), "body")
        if body.get("active") is not True:
            raise ValueError("active is not true")
        expires_at_ms = parse_timestamp_ms(body.get("expires_at"))
        view = {
            "session_id": _id(body.get("id"), "id"),
            "identity": _identity(_object(body.get("identity"), "identity")),
            "aal": _aal(body.get("authenticator_assurance_level")),
            "authentication_methods": [
                _method(_object(m, "authentication_methods[]"))
                for m in _list(body.get("authentication_methods"), "authentication_methods")
            ],
            "authenticated_at": _timestamp_or_none(body, "authenticated_at"),
            "issued_at": _timestamp_or_none(body, "issued_at"),
            "expires_at": body["expires_at"],
            "device": _first_device(_list(body.get("devices"), "devices")),
        }
    except (ValueError, KeyError, TypeError) as error:  # orjson.JSONDecodeError is a ValueError
        _failures.warning("kratos whoami returned an unusable session (%s)", error)
        raise KratosUnavailable("Kratos returned a session the bridge cannot use") from None
    return view, expires_at_ms


def _identity(identity: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": _id(identity.get("id"), "identity.id"),
        "schema_id": _string_or_none(identity.get("schema_id"), "identity.schema_id"),
        "state": _string_or_none(identity.get("state"), "identity.state"),
        "traits": _object(identity.get("traits") or {}, "identity.traits"),
        "metadata_public": identity.get("metadata_public"),
        "verifiable_addresses": [
            _address(_object(address, "identity.verifiable_addresses[]"))
            for address in _list(
                identity.get("verifiable_addresses") or [], "identity.verifiable_addresses"
            )
        ],
    }


def _address(address: dict[str, Any]) -> dict[str, Any]:
    """What a rule's ``verified_address`` condition reads."""
    return {
        "value": _string_or_none(address.get("value"), "verifiable_addresses[].value"),
        "via": _string_or_none(address.get("via"), "verifiable_addresses[].via"),
        "verified": address.get("verified") is True,
    }


def _method(method: dict[str, Any]) -> dict[str, Any]:
    name = method.get("method")
    if not (isinstance(name, str) and _METHOD.fullmatch(name)):
        raise ValueError("authentication_methods[].method")
    return {
        "method": name,
        "aal": _aal(method.get("aal")),
        "completed_at": _timestamp_or_none(method, "completed_at"),
    }


def _first_device(devices: list[Any]) -> dict[str, Any] | None:
    if not devices:
        return None
    device = _object(devices[0], "devices[]")
    return {
        "ip_address": _string_or_none(device.get("ip_address"), "devices[].ip_address"),
        "user_agent": _string_or_none(device.get("user_agent"), "devices[].user_agent"),
        "location": _string_or_none(device.get("location"), "devices[].location") or None,
    }


def _object(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{name} is not an object")
    return value


def _list(value: Any, name: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"{name} is not a list")
    return value


def _id(value: Any, name: str) -> str:
    if not (isinstance(value, str) and _UUID.fullmatch(value)):
        raise ValueError(f"{name} is not a UUID")
    return value


def _aal(value: Any) -> str:
    if value not in AAL_LEVELS:
        raise ValueError("aal is not one of " + ", ".join(AAL_LEVELS))
    return value


def _string_or_none(value: Any, name: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name} is not a string")
    return value


def _timestamp_or_none(parent: dict[str, Any], name: str) -> str | None:
    value = parent.get(name)
    if value is None:
        return None
    try:
        parse_timestamp_ms(value)
    except ValueError:
        raise ValueError(f"{name} is not a timestamp") from None
    return value


def _retry_after(answer: Answer) -> str:
    """Kratos's ``Retry-After``, else Ory Network's ``x-ratelimit-reset``, else 1 s."""
    wait = seconds(answer.text_header("retry-after"))
    wait = wait or seconds(answer.text_header("x-ratelimit-reset"))
    return str(wait or 1)


def _redirect_browser_to(answer: Answer) -> str | None:
    try:
        body = orjson.loads(answer.body)
    except orjson.JSONDecodeError:  # not JSON, or not even UTF-8
        return None
    if not isinstance(body, dict):
        return None
    target = body.get("redirect_browser_to")
    error = body.get("error")
    if target is None and isinstance(error, dict) and isinstance(error.get("details"), dict):
        target = error["details"].get("redirect_browser_to")
    if isinstance(target, str) and _BROWSER_URL.fullmatch(target) and url_parts(target) is not None:
        return target
    return None
