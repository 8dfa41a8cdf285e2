"""Runs the app under Granian (Rust HTTP server, WSGI interface, threaded workers).

Chosen by measurement: see README "Why Granian". Each worker process builds its
own app from the validated settings, so every process has its own HTTP and
Redis connection pools.
"""

from __future__ import annotations

import logging
import os
from functools import partial
from typing import Any

from granian import Granian
from granian.constants import Interfaces
from granian.log import LogLevels

from bridge.config import Settings

log = logging.getLogger(__name__)


def worker_count(settings: Settings) -> int:
    if settings.redis_url is None:
        return 1  # the embedded store lives in one process
    return settings.workers or (os.cpu_count() or 1)


def _load_app(settings: Settings, *_: Any) -> Any:
    from bridge.app import create_app
    from bridge.cli import configure_logging

    configure_logging(settings)
    return create_app(settings)


def serve(settings: Settings) -> None:
    if settings.redis_url is None:
        log.warning(
            "BRIDGE_REDIS_URL is not set: using the embedded in-process store "
            "(single process only; sessions and AAL2 events are lost on restart)"
        )
    server = Granian(
        target="bridge",
        address=settings.host,
        port=settings.port,
        interface=Interfaces.WSGI,
        workers=worker_count(settings),
        blocking_threads=settings.threads,
        log_level=LogLevels(settings.log_level),
        log_access=False,
        websockets=False,
        respawn_failed_workers=True,
    )
    server.serve(target_loader=partial(_load_app, settings), wrap_loader=False)
