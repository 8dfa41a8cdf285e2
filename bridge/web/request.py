"""What the forward-auth path reads of a request, the same from ASGI and from WSGI.

Header values are kept as the bytes the client sent, decoded as Latin-1 (one
character per byte), so a cookie header holding another app's UTF-8 cookie is
still read: its pairs are then judged one by one, as Kratos does. Only the headers
a stage declared it reads (``declare_read``) are kept; repeats are kept too, so a credential
header sent twice can be refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# The headers some stage reads, lower case. Each stage declares its own with
# ``declare_read`` when it is imported (a dialect through its ``reads`` attribute), so a
# new stage or dialect adds its headers in its own file; tests/unit/test_header_declarations.py
# finds a stage reading a header it did not declare (which would read as None).
_WANTED: frozenset[str] = frozenset()


def declare_read(*names: str) -> tuple[str, ...]:
    """Declare headers a stage reads: from now on every ``HeaderView`` keeps them.
    Returns ``names``, for the stage to keep as the list it reads."""
    global _WANTED
    for name in names:
        if name != name.lower() or not name:
            raise ValueError(f"header names are declared in lower case, not {name!r}")
    _WANTED = _WANTED | frozenset(names)
    return names


def declared() -> frozenset[str]:
    """Every header some stage has declared so far."""
    return _WANTED


class HeaderView:
    """The wanted headers of one request: ``get`` gives the first value, ``get_all``
    every value in order; ``peer`` is the address the request came from, when known."""

    __slots__ = ("_values", "peer")

    def __init__(self, pairs: Iterable[tuple[str, str]], peer: str | None = None) -> None:
        values: dict[str, list[str]] = {}
        kept = _WANTED
        for name, value in pairs:
            if name in kept:
                values.setdefault(name, []).append(value)
        self._values = values
        self.peer = peer

    def get(self, name: str) -> str | None:
        found = self._values.get(name.lower())
        return found[0] if found else None

    def get_all(self, name: str) -> list[str]:
        return self._values.get(name.lower(), [])

    @classmethod
    def from_asgi(cls, raw: Iterable[tuple[bytes, bytes]], peer: str | None = None) -> HeaderView:
        pairs = ((name.decode("latin-1").lower(), value.decode("latin-1")) for name, value in raw)
        return cls(pairs, peer)

    @classmethod
    def from_environ(cls, environ: Mapping[str, Any]) -> HeaderView:
        """WSGI has merged repeated headers already; each name has one value here."""
        return cls(
            (
                (key[5:].replace("_", "-").lower(), value)
                for key, value in environ.items()
                if key.startswith("HTTP_") and isinstance(value, str)
            ),
            environ.get("REMOTE_ADDR") or None,
        )


@dataclass(frozen=True, slots=True)
class OriginalRequest:
    """The request the user sent the proxy. ``target`` is its path and query as sent."""

    method: str
    scheme: str
    host: str
    target: str

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}{self.target}"
