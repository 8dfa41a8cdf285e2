"""Runs the app under gunicorn (threaded workers); see README "Why gunicorn" for the figures."""

from __future__ import annotations

import logging
import os
from typing import Any

from gunicorn.app.base import BaseApplication

from bridge.app import create_app
from bridge.config import Settings

log = logging.getLogger(__name__)


def worker_count(settings: Settings) -> int:
    if settings.redis_url is None:
        return 1  # the embedded store lives in one process
    return settings.workers or (os.cpu_count() or 1)


class _Server(BaseApplication):  # type: ignore[misc]
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        super().__init__()

    def load_config(self) -> None:
        settings = self._settings
        options: dict[str, Any] = {
            "bind": f"[{settings.host}]:{settings.port}"
            if ":" in settings.host
            else f"{settings.host}:{settings.port}",
            "workers": worker_count(settings),
            "worker_class": "gthread",
            "threads": settings.threads,
            "keepalive": 75,
            "timeout": 30,
            "graceful_timeout": 10,
            "loglevel": settings.log_level,
            "accesslog": None,
            "errorlog": "-",
            "limit_request_field_size": 16384,
            "proc_name": "kratos-bridge",
        }
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return create_app(self._settings)


def serve(settings: Settings) -> None:
    if settings.redis_url is None:
        log.warning(
            "BRIDGE_REDIS_URL is not set: using the embedded in-process store "
            "(single process only; sessions and AAL2 events are lost on restart)"
        )
    _Server(settings).run()
