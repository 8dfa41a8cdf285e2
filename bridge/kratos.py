"""The one conversation the bridge has with Kratos: ``GET /sessions/whoami``.

Kratos's answer is reduced to one of three outcomes: a ``KratosSession``, or
``SessionInvalid`` (401), or ``StepUpRequired`` (403). Anything else, including
a 200 whose body is not a session we can use, is ``KratosUnavailable``: the
bridge never turns an answer it does not understand into an allow.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx

from bridge.credentials import Credential
from bridge.errors import KratosUnavailable, SessionInvalid, StepUpRequired

log = logging.getLogger(__name__)

AAL_LEVELS = ("aal0", "aal1", "aal2", "aal3")


@dataclass(frozen=True, slots=True)
class KratosSession:
    """A session Kratos has just vouched for: its JSON, and a re-issued cookie if any."""

    body: dict[str, Any]
    expires_at_ms: int
    set_cookies: tuple[str, ...]  # cookies Kratos re-issued, to pass on to the browser

    @property
    def id(self) -> str:
        return self.body["id"]

    @property
    def aal(self) -> str:
        return self.body["authenticator_assurance_level"]


class KratosClient:
    """Asks Kratos about credentials over one pooled HTTP client per process."""

    def __init__(self, public_url: str, admin_url: str, cookie_name: str, timeout: float) -> None:
        self._public_url = public_url
        self._admin_url = admin_url
        self._cookie_name = cookie_name
        self._timeout = timeout
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
            headers={"Accept": "application/json"},
        )

    def whoami(self, credential: Credential) -> KratosSession:
        try:
            response = self._http.get(
                f"{self._public_url}/sessions/whoami",
                headers=credential.headers(self._cookie_name),
            )
        except httpx.HTTPError as error:
            log.warning("kratos whoami failed: %s", type(error).__name__)
            raise KratosUnavailable(
                f"Kratos could not be reached ({type(error).__name__})"
            ) from None

        if response.status_code == 200:
            return KratosSession(
                body=(body := _session_body(response)),
                expires_at_ms=parse_timestamp_ms(body["expires_at"]),
                set_cookies=tuple(response.headers.get_list("Set-Cookie")),
            )
        if response.status_code == 401:
            raise SessionInvalid("Kratos does not accept the credential")
        if response.status_code == 403:
            raise StepUpRequired(_redirect_browser_to(response))
        log.warning("kratos whoami answered %d", response.status_code)
        raise KratosUnavailable(f"Kratos answered {response.status_code}")

    def ready(self) -> str | None:
        """``None`` when Kratos says it is ready, else what went wrong."""
        try:
            response = self._http.get(f"{self._public_url}/health/ready")
        except httpx.HTTPError as error:
            return f"unreachable ({type(error).__name__})"
        if response.status_code != 200:
            return f"not ready (HTTP {response.status_code})"
        return None

    def version(self) -> str | None:
        """The Kratos version from the admin API (via the Ory SDK), or ``None``."""
        from ory_kratos_client import ApiClient, Configuration, MetadataApi
        from ory_kratos_client.exceptions import OpenApiException
        from urllib3.exceptions import HTTPError

        try:
            with ApiClient(Configuration(host=self._admin_url)) as client:
                return MetadataApi(client).get_version(_request_timeout=self._timeout).version
        except (OpenApiException, HTTPError, ValueError):
            return None

    def close(self) -> None:
        self._http.close()


def parse_timestamp_ms(value: object) -> int:
    """Kratos's RFC 3339 timestamps (nanoseconds, ``Z``) as Unix milliseconds."""
    if not isinstance(value, str):
        raise ValueError("timestamp is not a string")
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        raise ValueError("timestamp has no time zone")
    return int(moment.timestamp() * 1000)


def _session_body(response: httpx.Response) -> dict[str, Any]:
    """The whoami body, checked for every field the bridge relies on."""
    try:
        body = response.json()
        identity = body["identity"]
        if not (isinstance(body["id"], str) and body["id"]):
            raise ValueError("session id")
        if not (isinstance(identity["id"], str) and identity["id"]):
            raise ValueError("identity id")
        if body["authenticator_assurance_level"] not in AAL_LEVELS:
            raise ValueError("authenticator_assurance_level")
        if body.get("active") is not True:
            raise ValueError("active")
        if not isinstance(body.get("authentication_methods") or [], list):
            raise ValueError("authentication_methods")
        parse_timestamp_ms(body["expires_at"])
    except (ValueError, KeyError, TypeError) as error:
        log.error("kratos whoami returned an unusable session (%s)", error)
        raise KratosUnavailable("Kratos returned a session the bridge cannot use") from None
    return body


def _redirect_browser_to(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:  # not JSON, or not even UTF-8
        return None
    if not isinstance(body, dict):
        return None
    target = body.get("redirect_browser_to")
    error = body.get("error")
    if target is None and isinstance(error, dict) and isinstance(error.get("details"), dict):
        target = error["details"].get("redirect_browser_to")
    return target if isinstance(target, str) else None
