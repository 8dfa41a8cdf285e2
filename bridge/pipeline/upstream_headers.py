"""What the upstream app receives on an allow: identity headers from a mapping, and a JWT.

The mapping (``BRIDGE_IDENTITY_HEADERS``) names each header and where its value comes
from in the session: ``identity.id``, ``identity.schema_id``, ``identity.state``,
``session.id``, ``session.aal``, ``session.amr`` (the authentication methods, comma
separated), ``session.authenticated_at``, ``session.expires_at``, or a dotted path under
``traits.`` or ``metadata_public.``.

Every mapped header is on every 200, empty when the session lacks the value (and all of
them empty for an anonymous request on a ``public`` route), so a proxy that copies the
headers of the auth answer overwrites whatever copy the client sent.

A value is sent as is when it is visible ASCII without ``%``; anything else (spaces,
non-ASCII letters, ``%``) is UTF-8 percent-encoded, so no value can hold CR or LF and
every value decodes back exactly (``urllib.parse.unquote``, ``decodeURIComponent``). A
list of scalars is sent comma separated, a comma inside an item encoded (``%2C``), so it
splits back exactly; an object, or a value longer than ``MAX_VALUE`` once encoded, is
sent empty.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from bridge.sessions.session import MirroredSession, dig

if TYPE_CHECKING:
    from bridge.pipeline.tokens import TokenMinter

DEFAULT_MAPPING = (
    "X-User-Id=identity.id,X-Session-Id=session.id,X-User-Aal=session.aal,X-User-Email=traits.email"
)
MAX_VALUE = 4096
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")
_PLAIN = re.compile(r"[\x21\x22\x23\x24\x26-\x7e]*")
_SAFE = "".join(c for c in string.punctuation if c != "%")
_SAFE_IN_LIST = _SAFE.replace(",", "")
_PATH_PART = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Headers that would change how the proxy or the browser treats the answer.
RESERVED = frozenset(
    (
        "authorization",
        "cache-control",
        "connection",
        "content-length",
        "content-type",
        "cookie",
        "host",
        "keep-alive",
        "location",
        "proxy-authorization",
        "retry-after",
        "set-cookie",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "x-bridge-redirect",
    )
)

Source = Callable[[MirroredSession], Any]

_FIELDS: dict[str, Source] = {
    "identity.id": lambda s: s.identity_id,
    "identity.schema_id": lambda s: s.kratos["identity"].get("schema_id"),
    "identity.state": lambda s: s.kratos["identity"].get("state"),
    "session.id": lambda s: s.id,
    "session.aal": lambda s: s.aal,
    "session.amr": lambda s: _methods(s),
    "session.authenticated_at": lambda s: s.kratos.get("authenticated_at"),
    "session.expires_at": lambda s: s.kratos.get("expires_at"),
}


def _methods(session: MirroredSession) -> list[str]:
    return list(dict.fromkeys(m["method"] for m in session.kratos["authentication_methods"]))


def parse_mapping(text: str) -> tuple[tuple[str, str], ...]:
    """``Name=source,Name=source``: ``ValueError`` naming the entry that is wrong."""
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for entry in text.split(","):
        entry = entry.strip()
        if not entry:
            continue
        name, equals, source = (part.strip() for part in entry.partition("="))
        if not equals or not name or not source:
            raise ValueError(f"{entry!r} is not Header-Name=source")
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a header name")
        if name.lower() in RESERVED:
            raise ValueError(f"{name!r} is a header the bridge or the proxy owns")
        if name.lower() in seen:
            raise ValueError(f"{name!r} is mapped twice")
        _source(source)
        seen.add(name.lower())
        pairs.append((name, source))
    if not pairs:
        raise ValueError("maps no header")
    return tuple(pairs)


def _source(source: str) -> Source:
    found = _FIELDS.get(source)
    if found is not None:
        return found
    root, _, rest = source.partition(".")
    parts = rest.split(".") if rest else []
    if root not in ("traits", "metadata_public") or not parts:
        raise ValueError(
            f"source {source!r} is not one of {', '.join(_FIELDS)}, traits.<path> "
            "or metadata_public.<path>"
        )
    if not all(_PATH_PART.fullmatch(part) for part in parts):
        raise ValueError(f"source {source!r}: each part of the path is 1-64 of A-Z a-z 0-9 _ -")
    return lambda session: dig(session.kratos["identity"].get(root), parts)


def header_value(value: Any) -> str:
    """A session value as a header value (see the module's docstring)."""
    if value is None or isinstance(value, dict):
        return ""
    if isinstance(value, list):
        if any(isinstance(item, dict | list) or item is None for item in value):
            return ""
        # A comma inside an item is encoded, so that the items split back exactly.
        text = ",".join(_encoded(_scalar(item), in_list=True) for item in value)
    else:
        text = _encoded(_scalar(value), in_list=False)
    return text if len(text) <= MAX_VALUE else ""


def _encoded(text: str, *, in_list: bool) -> str:
    if _PLAIN.fullmatch(text) and not (in_list and "," in text):
        return text
    return quote(text, safe=_SAFE_IN_LIST if in_list else _SAFE)


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class UpstreamHeaders:
    """The headers of an allow, for a session or for an anonymous request."""

    def __init__(
        self,
        mapping: tuple[tuple[str, str], ...],
        minter: TokenMinter | None = None,
        jwt_header: str | None = None,
    ) -> None:
        self._mapping = tuple((name, _source(source)) for name, source in mapping)
        self._minter = minter
        self._jwt_header = jwt_header if minter is not None else None
        names = [name for name, _ in mapping]
        if self._jwt_header is not None:
            names.append(self._jwt_header)
        self.names: tuple[str, ...] = tuple(names)
        self.anonymous: tuple[tuple[str, str], ...] = tuple((name, "") for name in names)

    def for_session(
        self, session: MirroredSession, jwt_audience: str | None = None
    ) -> tuple[tuple[tuple[str, str], ...], int]:
        """The headers, and until when (Unix ms) they may be reused: the session's expiry,
        or sooner, when its JWT is due to be re-minted. ``jwt_audience``: the matched
        rule's, else the bridge's (``BRIDGE_JWT_AUDIENCE``)."""
        headers = [(name, header_value(source(session))) for name, source in self._mapping]
        valid_until = session.expires_at_ms
        if self._minter is not None and self._jwt_header is not None:
            token, refresh_at_ms = self._minter.token_for(session, jwt_audience)
            if self._jwt_header.lower() == "authorization":
                token = "Bearer " + token
            headers.append((self._jwt_header, token))
            valid_until = min(valid_until, refresh_at_ms)
        return tuple(headers), valid_until
