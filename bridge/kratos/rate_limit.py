"""What Kratos says of the bridge's request budget, and what the bridge does about it.

Ory Network limits each project's calls per bucket of endpoints (the public API's apart
from the admin API's). It answers every call with ``x-ratelimit-remaining`` (calls left
in the current window) and ``x-ratelimit-reset`` (seconds until that window ends), and a
call past the limit with ``429`` (and ``Retry-After``). A self-hosted Kratos sends none
of these headers, and then nothing here ever holds a call back.

One ``RateLimit`` per client (the public one, each admin one), told of every answer:

- *Nearly used* (``x-ratelimit-remaining`` at most a fifth of the limit the window
  allows, or 1 when the limit is not given): until the window resets, ``spare()`` is
  false, and the calls made only to save time later wait (refresh-ahead, a hook's
  repeated ask). A request's own call still goes: Kratos, not a guess, refuses it.
- *Refused* (``429``): until ``Retry-After`` (else ``x-ratelimit-reset``, else one
  second) has passed, ``closed_for()`` says how long; the admin client then answers
  ``KratosRateLimited`` without sending anything, and refresh-ahead waits too.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

HeaderLookup = Callable[[str], "str | None"]
"""An answer's header by lower-case name, ``None`` when absent."""

_SECONDS = re.compile(r"[0-9]{1,5}")
_MAX_WAIT = 3600  # a value past an hour is not believed (it may be a Unix time)
_LEADING_NUMBER = re.compile(r"\s*([0-9]{1,9})")


class RateLimit:
    __slots__ = ("_closed_until", "_spare_at")

    def __init__(self) -> None:
        # Plain floats, written whole: a thread reading one mid-update sees the old
        # value or the new one, either of them a fair answer.
        self._spare_at = 0.0
        self._closed_until = 0.0

    def saw(self, status: int, header: HeaderLookup) -> None:
        """Take in one answer's status and rate-limit headers."""
        if status == 429:
            wait = seconds(header("retry-after")) or seconds(header("x-ratelimit-reset")) or 1
            until = time.monotonic() + wait
            self._closed_until = until
            self._spare_at = max(self._spare_at, until)
            return
        remaining = _count(header("x-ratelimit-remaining"))
        if remaining is None:
            return
        limit = _count(header("x-ratelimit-limit"))
        if remaining <= (max(1, limit // 5) if limit else 1):
            reset = seconds(header("x-ratelimit-reset")) or 1
            self._spare_at = time.monotonic() + reset

    def spare(self) -> bool:
        """Whether a call made only to save time later may go now."""
        return time.monotonic() >= self._spare_at

    def closed_for(self) -> int:
        """Whole seconds until Kratos takes calls again after a ``429``; 0: it does now."""
        left = self._closed_until - time.monotonic()
        return int(left) + 1 if left > 0 else 0


def seconds(value: str | None) -> int | None:
    """A header's delay in whole seconds (1 to an hour), or ``None`` when it gives none
    the bridge believes (absent, a date, a negative or huge number)."""
    if value is None or not _SECONDS.fullmatch(value.strip()):
        return None
    number = int(value)
    return number if 0 < number <= _MAX_WAIT else None


def _count(value: str | None) -> int | None:
    """The leading number of ``x-ratelimit-*`` (``10, 10;w=1, 300;w=60`` is 10)."""
    match = _LEADING_NUMBER.match(value or "")
    return int(match.group(1)) if match else None
