"""Readiness: whether Redis and Kratos answer.

The admin listener answers in full: the store's topology, or what failed and why, and
how many server processes run and why. The public listener, which anyone who reaches the
bridge may ask, answers the status only (the topology and the error text are for
operators), from a result kept for ``PUBLIC_READY_FOR_S`` per process: a flood of asks
costs at most one check a second. The gRPC health service (``bridge.web.envoy_grpc``)
answers from the same kept result.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bridge.errors import StoreUnavailable
from bridge.kratos.whoami import KratosClient
from bridge.store.base import HealthStore
from bridge.web import responses
from bridge.web.cpu_budget import WorkerCount
from bridge.web.responses import Reply

PUBLIC_READY_FOR_S = 1.0


@dataclass(frozen=True, slots=True)
class Readiness:
    problems: dict[str, str] = field(default_factory=dict)  # "redis" | "kratos": why
    topology: dict[str, object] = field(default_factory=dict)  # what the store runs on

    @property
    def ready(self) -> bool:
        return not self.problems

    def full_reply(self, workers: WorkerCount) -> Reply:
        """The admin listener's answer; ``workers``: how many server processes run, and why."""
        if self.problems:
            body = {"status": "unavailable", "errors": self.problems}
        else:
            body = {"status": "ok", "redis": self.topology}
        body["workers"] = workers.as_json()
        return responses.json_reply(503 if self.problems else 200, body)


def check(store: HealthStore, kratos: KratosClient, with_topology: bool = True) -> Readiness:
    """Ask Redis (``PING``, and ``INFO`` for the topology) and Kratos now."""
    problems: dict[str, str] = {}
    topology: dict[str, object] = {}
    try:
        store.ping()
        if with_topology:
            topology = store.topology()
    except StoreUnavailable as error:
        problems["redis"] = str(error)
    kratos_problem = kratos.ready()
    if kratos_problem is not None:
        problems["kratos"] = kratos_problem
    return Readiness(problems, topology)


def status_reply(ready: bool) -> Reply:
    """The public listener's answer: the status and nothing else."""
    if ready:
        return responses.json_reply(200, {"status": "ok"})
    return responses.json_reply(503, {"status": "unavailable"})


class KeptStatus:
    """Whether ``is_ready()`` says ready, asked at most once per ``keep_for_s``. Callers
    that come while it is asked wait for that answer rather than ask again."""

    def __init__(
        self,
        is_ready: Callable[[], bool],
        keep_for_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._is_ready = is_ready
        self._keep_for_s = keep_for_s
        self._clock = clock
        self._lock = threading.Lock()
        self._ready = False
        self._fresh_until = float("-inf")

    def __call__(self) -> bool:
        with self._lock:
            if self._clock() >= self._fresh_until:
                self._ready = self._is_ready()
                self._fresh_until = self._clock() + self._keep_for_s
            return self._ready


def kept_readiness(store: HealthStore, kratos: KratosClient) -> KeptStatus:
    """The public answer's readiness: Redis and Kratos asked at most once per
    ``PUBLIC_READY_FOR_S``."""
    return KeptStatus(lambda: check(store, kratos, with_topology=False).ready, PUBLIC_READY_FOR_S)
