"""Warnings about a dependency that is down, at most one per interval per process.

A Redis or Kratos outage fails every request; logging each failure would bury the
log (and the disk) while saying nothing new. The first failure is logged at once,
then one line per interval with how many were left out. Messages never hold a
credential: callers pass the error's class name or status, nothing from the request.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from datetime import UTC, datetime

import orjson


class Throttled:
    def __init__(self, logger: logging.Logger, interval: float = 5.0) -> None:
        self._log = logger
        self._interval = interval
        self._lock = threading.Lock()
        self._next_at = 0.0
        self._left_out = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now < self._next_at:
                self._left_out += 1
                return
            left_out, self._left_out = self._left_out, 0
            self._next_at = now + self._interval
        if left_out:
            message += " (and %d more like it since the last such line)"
            args = (*args, left_out)
        self._log.warning(message, *args)


def log_unexpected(logger: logging.Logger, method: str, route: str | None) -> None:
    """Log the exception being handled with the request's method and the pattern of the
    route it matched (``/admin/sessions/<session_id>``; ``None``: none matched), never its
    path or query: they may hold a token (a recovery link's, a session id), which the
    decision log leaves out for the same reason."""
    where = route or "(no route)"
    fields = {"method": method, "route": where}
    logger.exception("unexpected error on %s %s", method, where, extra={"fields": fields})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and a record's ``fields``
    (a decision's, see ``bridge.observe.decision_log``); an exception as its formatted text."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def configure_logging(level: str, log_format: str, quiet: bool = False) -> None:
    """The log on stderr at ``level`` (``BRIDGE_LOG_LEVEL``) in ``log_format``
    (``BRIDGE_LOG_FORMAT``: json, text, or auto: json unless stderr is a terminal);
    ``quiet``: no log at all unless the level is ``debug``. It takes the two values, not
    the settings, so that this module stays one that the whole package can import."""
    handler = logging.StreamHandler()
    as_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    handler.setFormatter(
        JsonFormatter()
        if as_json
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    level = level.upper()
    if quiet and level != "DEBUG":
        handler.setLevel(logging.CRITICAL + 1)
    logging.basicConfig(level=level, handlers=[handler], force=True)
