"""Runs the bridge under Granian (Rust HTTP server) through its ASGI interface.

Chosen by measurement: see README "Why Granian, and why ASGI". Each worker process
builds its own parts from the validated settings, so every process has its own
Kratos connections, Redis pool and fresh-session copy; with ``BRIDGE_GRPC_PORT`` each
also serves Envoy's gRPC ``ext_authz`` from that copy (``bridge.web.envoy_grpc``), the
processes sharing the port as they share the HTTP one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
from functools import partial
from typing import Any

from granian import Granian
from granian.constants import Interfaces
from granian.log import LogLevels

from bridge.config import Settings
from bridge.errors import ConfigError
from bridge.logs import configure_logging
from bridge.web.cpu_budget import WorkerCount, worker_count

log = logging.getLogger(__name__)

GIL_SWITCH_INTERVAL = 0.001
_PR_SET_PDEATHSIG = 1


def _check_port_free(key: str, host: str, port: int) -> None:
    """Fail now, naming the key, when the port is taken (by another bridge, say): the
    server processes would otherwise wait for the admin port forever, and on Linux Granian
    binds the main port in each worker with ``SO_REUSEPORT``, so a second bridge would
    share it with the first unseen (and anything else holding it makes Granian panic)."""
    from bridge.admin.listener import bind

    try:
        bind(host, port).close()
    except OSError as error:
        raise ConfigError(key, f"cannot listen on {host}:{port} ({error.strerror})") from None


def _die_with_parent() -> None:
    """A worker ends when the server process does, however that ends: a worker that
    finished starting while the server was stopping would otherwise live on, orphaned,
    holding the admin port (Linux: PR_SET_PDEATHSIG; elsewhere nothing)."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the server ended before the signal was asked for
        os.kill(os.getpid(), signal.SIGTERM)


def _load_app(settings: Settings, workers: WorkerCount, *_: Any) -> Any:
    from bridge.web.app import create_flask_app
    from bridge.web.asgi import Front
    from bridge.wiring import build_bridge

    _die_with_parent()
    configure_logging(settings.log_level, settings.log_format)
    # The event loop answers warm requests while worker and refresh threads do Python
    # work between their I/O; a shorter GIL switch interval (default 5 ms) keeps the
    # loop from waiting behind them. Measured with bench/peers.py (README, Benchmark).
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    bridge = build_bridge(settings)
    if settings.admin_port:
        from bridge.admin.api import create_admin_app
        from bridge.admin.listener import AdminListener

        AdminListener(
            create_admin_app(bridge, workers=workers),
            settings.admin_host,
            settings.admin_port,
            settings.body_timeout,
        )
    stops = []
    if settings.grpc_port:
        from bridge.web.envoy_grpc import GrpcAuthz  # grpcio and Envoy's protos: only when on

        grpc_server = GrpcAuthz(bridge.forward_auth, settings, bridge.ready)
        grpc_server.start()
        stops.append(grpc_server.stop)
    return Front(bridge, create_flask_app(bridge), stops)


def serve(settings: Settings) -> None:
    if settings.metrics:
        from bridge.observe.metrics import prepare_multiprocess_dir

        prepare_multiprocess_dir()  # before the workers start: they inherit where to write
    if settings.admin_port:
        _check_port_free("BRIDGE_ADMIN_PORT", settings.admin_host, settings.admin_port)
    _check_port_free("BRIDGE_PORT", settings.host, settings.port)
    if settings.grpc_port:
        if settings.grpc_port == settings.port:  # --port may have made them one
            raise ConfigError("BRIDGE_GRPC_PORT", f"{settings.port} is also BRIDGE_PORT")
        _check_port_free("BRIDGE_GRPC_PORT", settings.host, settings.grpc_port)
    if settings.redis_url is None:
        log.warning(
            "BRIDGE_REDIS_URL is not set: using the embedded in-process store "
            "(single process only; sessions and AAL2 events are lost on restart)"
        )
    workers = worker_count(settings)
    log.info("server processes: %d (%s)", workers.count, workers.reason)
    server = Granian(
        target="bridge",
        address=settings.host,
        port=settings.port,
        interface=Interfaces.ASGI,
        workers=workers.count,
        log_level=LogLevels(settings.log_level),
        log_access=False,
        websockets=False,
        respawn_failed_workers=True,
    )
    server.serve(target_loader=partial(_load_app, settings, workers), wrap_loader=False)
