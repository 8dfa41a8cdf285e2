"""What the forward-auth path reads of a request, the same from ASGI and from WSGI.

Header values are kept as the bytes the client sent, decoded as Latin-1 (one
character per byte), so a cookie header holding another app's UTF-8 cookie is
still read: its pairs are then judged one by one, as Kratos does. Only the headers
the decision uses are kept; repeats are kept too, so a credential header sent twice
can be refused.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

# The headers the decision reads, lower case.
CREDENTIAL_HEADERS = ("x-session-token", "cookie", "authorization")
ORIGIN_HEADERS = ("x-original-url", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-uri")
_WANTED = frozenset(CREDENTIAL_HEADERS + ORIGIN_HEADERS)

_FORWARDED_HOST = re.compile(r"[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?")
_FORWARDED_URI = re.compile(r"/[\x21-\x7e]{0,2047}")
_ORIGINAL_URL = re.compile(r"https?://[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?(/[\x21-\x7e]{0,2047})?")


class HeaderView:
    """The wanted headers of one request: ``get`` gives the first value, ``get_all``
    every value in order."""

    __slots__ = ("_values",)

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        values: dict[str, list[str]] = {}
        for name, value in pairs:
            if name in _WANTED:
                values.setdefault(name, []).append(value)
        self._values = values

    def get(self, name: str) -> str | None:
        found = self._values.get(name.lower())
        return found[0] if found else None

    def get_all(self, name: str) -> list[str]:
        return self._values.get(name.lower(), [])

    @classmethod
    def from_asgi(cls, raw: Iterable[tuple[bytes, bytes]]) -> HeaderView:
        return cls((name.decode("latin-1").lower(), value.decode("latin-1")) for name, value in raw)

    @classmethod
    def from_environ(cls, environ: Mapping[str, Any]) -> HeaderView:
        """WSGI has merged repeated headers already; each name has one value here."""
        return cls(
            (key[5:].replace("_", "-").lower(), value)
            for key, value in environ.items()
            if key.startswith("HTTP_") and isinstance(value, str)
        )


def original_url(headers: HeaderView) -> str | None:
    """The URL the user asked the proxy for, if the proxy told us and it looks sane."""
    original = headers.get("x-original-url")
    if original and _ORIGINAL_URL.fullmatch(original):
        return original
    proto = headers.get("x-forwarded-proto") or ""
    host = headers.get("x-forwarded-host") or ""
    uri = headers.get("x-forwarded-uri") or "/"
    if (
        proto in ("http", "https")
        and _FORWARDED_HOST.fullmatch(host)
        and _FORWARDED_URI.fullmatch(uri)
    ):
        return f"{proto}://{host}{uri}"
    return None
