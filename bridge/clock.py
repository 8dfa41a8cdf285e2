"""The wall clock as the bridge counts it, in Unix milliseconds, and moments as RFC 3339
text: what Kratos writes, and what the bridge writes back."""

from __future__ import annotations

import time
from datetime import UTC, datetime


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def iso(ms: int) -> str:
    return (
        datetime.fromtimestamp(ms / 1000, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def parse_timestamp_ms(value: object) -> int:
    """Kratos's RFC 3339 timestamps (nanoseconds, ``Z``) as Unix milliseconds."""
    if not isinstance(value, str):
        raise ValueError("timestamp is not a string")
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        raise ValueError("timestamp has no time zone")
    return int(moment.timestamp() * 1000)
