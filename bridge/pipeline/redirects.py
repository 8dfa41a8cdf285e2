"""Where a browser is sent when it may not pass: Kratos's login, with a ``return_to``.

``return_to`` is the URL the user asked the proxy for, rebuilt from the proxy's headers,
and only ever for an allow-listed origin (``BRIDGE_RETURN_TO_ORIGINS``, by default the
hosts the rules file names). Whatever the headers say, the browser is only ever sent to
the configured Kratos login URL; a URL outside the list is left out of ``return_to``
(Kratos then uses its own default), never passed on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import SplitResult, parse_qs, urlencode, urlsplit

from bridge.web.request import OriginalRequest

# A redirect must fit a proxy's buffer for the auth answer's headers (nginx: 4 KB by
# default) twice, with every other header: a 401 of /auth carries it in X-Bridge-Redirect
# and, for a browser navigation, in Location too. A longer one is sent without return_to.
MAX_REDIRECT = 1800
_ORIGIN = re.compile(
    r"(?P<scheme>https?)://(?P<host>(?:\*\.)?[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?"
    r"(?:\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*|\[[0-9a-f:.]+\])(?::(?P<port>[0-9]{1,5}))?/?"
)
_DEFAULT_PORTS = {"http": 80, "https": 443}
_VISIBLE = re.compile(r"[\x21-\x7e]+")


@dataclass(frozen=True, slots=True)
class Origin:
    """``scheme://host[:port]``; a host ``*.example.com`` stands for every host under it.
    ``scheme`` ``None``: http or https; ``port`` ``None``: any port."""

    scheme: str | None
    host: str
    port: int | None

    def admits(self, scheme: str, host: str, port: int) -> bool:
        if self.scheme is not None and scheme != self.scheme:
            return False
        if self.port is not None and port != self.port:
            return False
        if self.host.startswith("*."):
            return host.endswith(self.host[1:]) and len(host) > len(self.host) - 1
        return host == self.host


def parse_origin(text: str) -> Origin:
    """One entry of ``BRIDGE_RETURN_TO_ORIGINS``: an origin, the scheme's default port
    when it names none. ``ValueError`` says what is wrong."""
    found = _ORIGIN.fullmatch(text.strip().lower())
    if found is None:
        raise ValueError(
            f"{text.strip()!r} is not an origin like https://app.example.com[:port] "
            "or https://*.example.com"
        )
    scheme = found["scheme"]
    port = int(found["port"]) if found["port"] else _DEFAULT_PORTS[scheme]
    if not 1 <= port <= 65535:
        raise ValueError(f"{text.strip()!r}: port is not a number from 1 to 65535")
    return Origin(scheme, found["host"].strip("[]"), port)


def host_origin(host: str) -> Origin:
    """A host named in the rules file: http or https, any port."""
    return Origin(None, host.lower().rstrip("."), None)


class BrowserRedirects:
    """Kratos login URLs for a refused browser: log in, add a second factor, or log in
    again (``refresh=true``)."""

    def __init__(self, login_url: str, origins: tuple[Origin, ...]) -> None:
        self._login_url = login_url
        self._origins = origins

    def login(self, original: OriginalRequest | None) -> str:
        return self._to(self._login_url, original)

    def step_up(self, original: OriginalRequest | None, kratos_hint: str | None) -> str:
        """Kratos's own ``redirect_browser_to`` when its 403 gave one, else the login URL,
        at ``aal2``."""
        return self._to(kratos_hint or self._login_url, original, aal="aal2")

    def reauthenticate(self, original: OriginalRequest | None) -> str:
        return self._to(self._login_url, original, refresh="true")

    def _to(self, target: str, original: OriginalRequest | None, **params: str) -> str:
        url = with_query(target, **params, return_to=self.return_to(original))
        return url if len(url) <= MAX_REDIRECT else with_query(target, **params)

    def return_to(self, original: OriginalRequest | None) -> str | None:
        if original is None:
            return None
        if not self._admits(original.scheme, original.host):
            return None
        # A browser reads "\" as "/" in an http(s) URL; encoded, it can only ever be path.
        return original.url.replace("\\", "%5C")

    def allowed_return_to(self, url: str | None) -> str | None:
        """A ``return_to`` a client asked for (a sign-out's), when it is an absolute
        http(s) URL of visible ASCII, with neither a user name nor a backslash, on an
        allow-listed origin; else ``None``."""
        if not url or len(url) > MAX_REDIRECT or not _VISIBLE.fullmatch(url) or "\\" in url:
            return None
        parts = url_parts(url)
        if parts is None or parts.scheme not in _DEFAULT_PORTS:
            return None
        if not parts.netloc or "@" in parts.netloc:
            return None
        return url if self._admits(parts.scheme, parts.netloc) else None

    def _admits(self, scheme: str, host_and_port: str) -> bool:
        host, port = split_host(host_and_port)
        port = port or _DEFAULT_PORTS[scheme]
        return any(origin.admits(scheme, host, port) for origin in self._origins)


def url_parts(url: str) -> SplitResult | None:
    """``urlsplit(url)``, or ``None`` for text it refuses: brackets that hold no IPv6
    address (``https://[``) pass every check of visible ASCII after a scheme."""
    try:
        return urlsplit(url)
    except ValueError:
        return None


def host_of(url: str) -> str | None:
    """The lower-case ``host[:port]`` of ``url`` (an ``Origin`` header, say); ``None`` for
    text that is no URL."""
    parts = url_parts(url)
    return parts.netloc.lower() if parts is not None else None


def split_host(host: str) -> tuple[str, int | None]:
    """``host[:port]`` (an IPv6 address in brackets) as a lower-case host and a port."""
    host = host.lower()
    if host.startswith("["):
        address, _, rest = host[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        return address, int(port) if port.isascii() and port.isdigit() else None
    name, colon, port = host.rpartition(":")
    if colon and port.isascii() and port.isdigit():
        return name.rstrip("."), int(port)
    return host.rstrip("."), None


def with_query(url: str, **params: str | None) -> str:
    """``url`` with ``params`` added, skipping empty ones and ones the URL already has."""
    present = parse_qs(urlsplit(url).query)
    query = urlencode({k: v for k, v in params.items() if v and k not in present})
    if not query:
        return url
    return f"{url}{'&' if urlsplit(url).query else '?'}{query}"
