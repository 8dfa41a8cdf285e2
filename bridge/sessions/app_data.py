"""The app-owned section of a session: field names, and values as JSON per field.

Each field holds one JSON value, so values keep their type (str, int, float, bool, None,
list, dict) through the store, and two writers of different fields never touch each
other's. A value some other writer stored as plain text reads back as that text.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

import orjson

from bridge.errors import BadRequest

_FIELD_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_JSON_LEAVES = (str, int, bool, type(None))


def checked_name(name: str) -> str:
    if not isinstance(name, str) or not _FIELD_NAME.fullmatch(name):
        raise ValueError(f"app field name {name!r} is not 1-128 of A-Z a-z 0-9 _ . : -")
    return name


def encoded(name: str, value: Any) -> str:
    """The field's JSON, for a value that comes back from it as itself."""
    try:
        encoded = orjson.dumps(value)  # refuses cycles, deep nesting, ints past 64 bits
    except orjson.JSONEncodeError as error:
        raise TypeError(f"app field {name!r}: {error}") from None
    problem = _not_plain_json(value)
    if problem is not None:
        raise TypeError(f"app field {name!r}: {problem}")
    return encoded.decode()


def _not_plain_json(value: Any) -> str | None:
    """What in ``value`` would not come back as itself from JSON, or ``None``. orjson also
    writes tuples, datetimes, UUIDs, dataclasses, enums and subclasses, as other types."""
    pending = [value]
    while pending:
        item = pending.pop()
        kind = type(item)
        if kind in _JSON_LEAVES:
            continue
        if kind is float:
            if not math.isfinite(item):
                return f"{item!r} has no JSON form"
        elif kind is list:
            pending.extend(item)
        elif kind is dict:
            pending.extend(item.values())  # orjson has refused keys that are not str
        else:
            return f"{kind.__name__} is not JSON (str, int, float, bool, None, list, dict)"
    return None


def decoded(app: Mapping[str, str]) -> dict[str, Any]:
    return {name: _value(raw) for name, raw in app.items()}


def _value(raw: str) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw  # written as plain text by some other writer


def _exact_int(text: str) -> int:
    number = int(text)
    if not -(2**63) <= number < 2**64:
        raise ValueError(f"{text[:40]} does not fit in 64 bits")
    return number


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def merge_patch(body: bytes) -> tuple[dict[str, str], list[str]]:
    """A JSON merge patch of the app section: the fields to set (encoded) and the ones to
    delete (``null``). ``BadRequest`` naming what is wrong."""
    try:
        # The standard parser, unlike orjson, says when a number cannot be kept exactly.
        patch = json.loads(body, parse_int=_exact_int, parse_constant=_no_constant)
    except (ValueError, RecursionError) as error:
        raise BadRequest(f"the body is not JSON the app section can keep ({error})") from None
    if not isinstance(patch, dict) or not patch:
        raise BadRequest("the body must be a JSON object of app fields")
    values: dict[str, str] = {}
    delete: list[str] = []
    try:
        for name, value in patch.items():
            if value is None:
                delete.append(checked_name(name))
            else:
                values[checked_name(name)] = encoded(name, value)
    except (ValueError, TypeError) as error:
        raise BadRequest(str(error)) from None
    return values, delete
