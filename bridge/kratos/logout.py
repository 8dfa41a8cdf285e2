"""Kratos's two logout flows, done with the user's own credential over the whoami
client's stateless transport (``bridge.kratos.http_client``): nothing of one user's
logout can reach another's.

- A browser (the session cookie): ``GET /self-service/logout/browser`` gives the logout
  URL, whose token the bridge presents at once with the same cookie
  (``GET /self-service/logout?token=…``, on the bridge's own Kratos URL): Kratos ends the
  session there and answers with the ``Set-Cookie`` that clears its cookie, which the
  bridge passes on to the browser. Done here rather than by the browser, so the session
  is over in Kratos before the bridge answers: no re-validation can find it alive.
- A token: ``DELETE /self-service/logout/api`` with ``{"session_token": …}`` ends it.

Kratos not answering as documented is ``KratosUnavailable``; an answer's body is never
logged or passed on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qs, quote

import orjson

from bridge.errors import KratosUnavailable
from bridge.kratos.http_client import Answer, HTTPClient, RequestFailed
from bridge.pipeline.credentials import Credential, Kind
from bridge.pipeline.redirects import url_parts

_ACCEPT_JSON = ("Accept", "application/json")
# Kratos's redirect and cookies become response headers: visible ASCII (and space) only.
_BROWSER_URL = re.compile(r"https?://[\x21-\x7e]{1,2048}")
_HEADER_VALUE = re.compile(r"[\x20-\x7e]{1,4096}")


@dataclass(frozen=True, slots=True)
class BrowserLogout:
    """What Kratos answered a completed browser logout with: the cookies it set (its
    session cookie cleared) and where it would send the browser."""

    set_cookies: tuple[str, ...]
    location: str | None


class KratosLogout:
    def __init__(self, public: HTTPClient, cookie_name: str, timeout: float) -> None:
        self._public = public
        self._cookie_name = cookie_name
        self._timeout = timeout

    def log_out_browser(self, credential: Credential) -> BrowserLogout | None:
        """End the cookie's session through Kratos's browser flow; ``None`` when Kratos
        knows no session for it (401)."""
        cookie = list(credential.headers(self._cookie_name).items())
        flow = self._ask("GET", "/self-service/logout/browser", [_ACCEPT_JSON, *cookie])
        if flow.status == 401:
            return None
        if flow.status != 200:
            raise KratosUnavailable(f"Kratos's browser logout answered {flow.status}")
        token = _logout_token(flow.body)
        done = self._ask("GET", f"/self-service/logout?token={quote(token, safe='')}", cookie)
        if done.status not in (204, 302, 303):
            raise KratosUnavailable(f"Kratos's logout answered {done.status}")
        cookies = [c.decode("latin-1") for c in done.header_list(b"set-cookie")]
        location = (done.header(b"location") or b"").decode("latin-1")
        return BrowserLogout(
            tuple(c for c in cookies if _HEADER_VALUE.fullmatch(c)),
            location if _BROWSER_URL.fullmatch(location) else None,
        )

    def log_out_token(self, credential: Credential) -> bool:
        """End the token's session in Kratos; ``False`` when Kratos knows no session for
        it (Kratos v1.3.1 answers 403 for an unknown token, 401 for none)."""
        if credential.kind is Kind.COOKIE:
            raise ValueError("a cookie is logged out through the browser flow")
        body = orjson.dumps({"session_token": credential.values[0]})
        headers = [_ACCEPT_JSON, ("Content-Type", "application/json")]
        answer = self._ask("DELETE", "/self-service/logout/api", headers, body)
        if answer.status == 204:
            return True
        if answer.status in (400, 401, 403):
            return False
        raise KratosUnavailable(f"Kratos's API logout answered {answer.status}")

    def _ask(
        self, method: str, path: str, headers: list[tuple[str, str]], body: bytes = b""
    ) -> Answer:
        try:
            return self._public.request(method, path, headers, self._timeout, body)
        except RequestFailed as error:
            raise KratosUnavailable(f"Kratos could not be reached ({error})") from None


def _logout_token(body: bytes) -> str:
    """The token of the ``logout_url`` Kratos gave (its ``logout_token``, as a fallback)."""
    try:
        flow = orjson.loads(body)
        url = flow.get("logout_url")
        token = flow.get("logout_token")
    except (orjson.JSONDecodeError, AttributeError):
        raise KratosUnavailable("Kratos's browser logout did not answer JSON") from None
    parts = url_parts(url) if isinstance(url, str) else None
    if parts is not None:
        token = (parse_qs(parts.query).get("token") or [token])[0]
    if not (isinstance(token, str) and _HEADER_VALUE.fullmatch(token)):
        raise KratosUnavailable("Kratos's browser logout gave no usable logout token")
    return token
