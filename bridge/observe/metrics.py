"""Prometheus metrics for ``/metrics`` on the admin listener, cheap on the request path
and right across the server's worker processes.

Counted: forward-auth decisions by dialect, rule, outcome (``allow`` or the refusal's
error code) and the tier that knew the session (``process``, ``redis``, ``kratos``, or
``none`` when no session was found); their latency by tier; refusals answered from the
memory of recent rejections without asking Kratos (negative-cache hits); Kratos whoami
calls by status (``error`` when Kratos could not be reached) and latency; AAL2 events by
method; failed Redis operations. At scrape time: the active sessions.

The request path does plain Python only, no lock and no file (about 0.3 µs a decision):
each thread counts into a table of its own, keyed by what the decision was, holding a
count per latency bucket and the latency sum. Under the GIL only that thread writes its
table; the flusher reads it with C-level copies, and keeps the table of a thread that
has ended. prometheus-client's own multiprocess metrics would write a file under a lock
on every ``inc`` and ``observe``.

A daemon thread folds the tables into this process's two files in the multiprocess
directory once a second (``flush``), in prometheus-client's multiprocess format, each
series as its running total. ``exposition`` flushes its own process first, then reads
every process's files with ``MultiProcessCollector``. So:

- Lag: a scrape sees its own process exactly and the others as of their last flush, at
  most ``flush_interval`` (1 s) ago. A worker that exits cleanly flushes on its way out
  (a multiprocessing finalizer: Granian's workers are multiprocessing children, which
  skip ``atexit``); a worker that is killed loses at most its last second.
- Dead workers: their files stay and are summed, which is right for counters and
  histograms: the bridge's totals do not go backwards when a worker is replaced. Files
  are named per ``Metrics`` (pid and a random token), so a reused pid never writes over
  a dead worker's numbers. ``prepare_multiprocess_dir`` empties the directory when the
  server starts, which Prometheus takes as a counter reset.
- Gauges are not multiprocess: the scraping process computes them when scraped (active
  sessions, from the store), so no dead process's value lingers.

Without ``PROMETHEUS_MULTIPROC_DIR`` (tests, WSGI, a bridge run without ``serve``) each
``Metrics`` keeps its files in a private directory, removed by ``close``: the same code,
one process's numbers.

prometheus-client is imported only where it is used: it decides when first imported
whether its own metric objects are multiprocess, so ``prepare_multiprocess_dir`` must
run first for any code that uses those.
"""

from __future__ import annotations

import atexit
import functools
import glob
import logging
import multiprocessing.util
import os
import secrets
import shutil
import tempfile
import threading
import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bridge.errors import BridgeError, RejectedRecently
from bridge.logs import Throttled
from bridge.observe.decision_log import Trace, outcome
from bridge.sessions.mirror import SessionEvents
from bridge.sessions.session import MirroredSession, first_method
from bridge.web.request import HeaderView
from bridge.web.responses import Reply

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric
    from prometheus_client.mmap_dict import MmapedDict

    from bridge.pipeline.forward_auth import DecisionWatcher

log = logging.getLogger(__name__)
_failures = Throttled(log)

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
FLUSH_INTERVAL_S = 1.0
DECISION_BUCKETS_S = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
KRATOS_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ACTIVE_SESSIONS = "bridge_active_sessions"
_KINDS = ("counter", "histogram")  # the two files of each process

_DECISION_BOUNDS_NS = tuple(round(bound * 1e9) for bound in DECISION_BUCKETS_S)


@dataclass(frozen=True)
class Family:
    """One metric as it is exposed."""

    name: str
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()  # a histogram's upper bounds, without +Inf

    @property
    def histogram(self) -> bool:
        return bool(self.buckets)


DECISIONS = Family(
    "bridge_decisions",
    "Forward-auth decisions: outcome is allow or the refusal's error code; tier is what "
    "knew the session (process, redis, kratos; none without one).",
    ("dialect", "rule", "outcome", "tier"),
)
DECISION_SECONDS = Family(
    "bridge_decision_duration_seconds",
    "Time from reading a forward-auth request to its answer, by the tier that knew the session.",
    ("tier",),
    DECISION_BUCKETS_S,
)
NEGATIVE_CACHE_HITS = Family(
    "bridge_negative_cache_hits",
    "Credentials refused from the memory of recent Kratos rejections, without asking Kratos.",
)
KRATOS_SECONDS = Family(
    "bridge_kratos_request_duration_seconds",
    "Kratos whoami calls by HTTP status (error: Kratos could not be reached).",
    ("status",),
    KRATOS_BUCKETS_S,
)
AAL2_EVENTS = Family(
    "bridge_aal2_events", "Sessions that reached AAL2, by the method that took them there.",
    ("method",),
)  # fmt: skip
REDIS_ERRORS = Family(
    "bridge_redis_errors", "Store operations Redis failed, by operation.", ("operation",)
)

# A decision's table key: (dialect, rule, outcome, tier, negative-cache hit).
_DecisionKey = tuple[str, "str | None", str, "str | None", bool]


def prepare_multiprocess_dir() -> str:
    """The directory every worker process writes its metrics to, made ready before the
    workers start: ``PROMETHEUS_MULTIPROC_DIR`` emptied of the last run's files, or a new
    temporary directory (removed when this process exits) that the variable then names,
    for the workers to inherit."""
    directory = os.environ.get(MULTIPROC_DIR_ENV)
    if directory:
        os.makedirs(directory, exist_ok=True)
        for path in glob.glob(os.path.join(directory, "*.db")):
            os.remove(path)
        return directory
    directory = tempfile.mkdtemp(prefix="bridge-metrics-")
    os.environ[MULTIPROC_DIR_ENV] = directory
    atexit.register(_remove_directory, directory, os.getpid())
    return directory


class Metrics:
    """This process's counts, and the exposition of all processes'. One per process,
    made in the process that uses it (after the fork); ``close`` when done."""

    def __init__(
        self, directory: str | None = None, flush_interval: float = FLUSH_INTERVAL_S
    ) -> None:
        shared = directory or os.environ.get(MULTIPROC_DIR_ENV)
        self._private: str | None = None
        if not shared:
            self._private = shared = tempfile.mkdtemp(prefix="bridge-metrics-")
        self.directory = shared
        # ``counter_*`` and ``histogram_*``: the prefix is the type MultiProcessCollector
        # reads; the rest never matches prometheus-client's own ``counter_<pid>.db``.
        own = f"bridge-{os.getpid()}-{secrets.token_hex(6)}.db"
        self._paths = {kind: os.path.join(self.directory, f"{kind}_{own}") for kind in _KINDS}
        self._files: dict[str, MmapedDict] = {}
        self._keys: dict[tuple[str, tuple[str, ...], tuple[str, ...]], str] = {}
        self._written: dict[str, float] = {}

        self._local = threading.local()
        self._tables: list[tuple[threading.Thread, dict[_DecisionKey, list[int]]]] = []
        self._tables_lock = threading.Lock()
        self._ended: dict[_DecisionKey, list[int]] = {}  # from threads that have ended

        self._lock = threading.Lock()  # the rarer events below
        self._kratos: dict[str, list[float]] = {}
        self._aal2: dict[str, int] = {}
        self._redis_errors: dict[str, int] = {}

        self._flush_lock = threading.Lock()
        self._closed = False
        self._stop = threading.Event()
        self._flush_interval = flush_interval
        self._thread = threading.Thread(target=self._run, name="bridge-metrics", daemon=True)
        self._thread.start()
        # Runs at exit in the main process (through atexit) and in multiprocessing
        # children (which exit without atexit); holds no reference that would keep
        # this object alive.
        self._at_exit = multiprocessing.util.Finalize(
            None, _close_if_alive, args=(weakref.ref(self),), exitpriority=10
        )

    def decision_watcher(self) -> DecisionWatcher:
        """The forward-auth watcher (``bridge.pipeline.forward_auth.DecisionWatcher``)."""
        local = self._local
        new_table = self._new_table
        bounds = _DECISION_BOUNDS_NS
        first_bound = bounds[0]  # most answers from this process's copy fall below it
        width = len(bounds) + 2  # a count per bucket, +Inf included, then the sum in ns

        def watch(
            dialect: str, method: str, headers: HeaderView, reply: Reply, trace: Trace
        ) -> None:
            if reply.status == 200:
                key = (dialect, trace.rule, "allow", trace.tier, False)
            else:
                key = _refusal_key(dialect, reply, trace)
            try:
                table = local.table
            except AttributeError:
                table = new_table()
            entry = table.get(key)
            if entry is None:
                entry = table[key] = [0] * width
            elapsed_ns = trace.finished_ns - trace.started_ns
            entry[0 if elapsed_ns <= first_bound else bisect_left(bounds, elapsed_ns)] += 1
            entry[-1] += elapsed_ns

        return watch

    def kratos_call(self, status: int | str, seconds: float) -> None:
        """A whoami call: Kratos's HTTP status, or ``"error"`` when it could not be reached."""
        bucket = bisect_left(KRATOS_BUCKETS_S, seconds)
        with self._lock:
            entry = self._kratos.get(str(status))
            if entry is None:
                entry = self._kratos[str(status)] = [0.0] * (len(KRATOS_BUCKETS_S) + 2)
            entry[bucket] += 1
            entry[-1] += seconds

    def session_events(self) -> SessionEvents:
        """The mirror's (and hooks') event watcher that counts AAL2 events."""
        return _AAL2Counter(self)

    def aal2_event(self, method: str) -> None:
        with self._lock:
            self._aal2[method] = self._aal2.get(method, 0) + 1

    def redis_error(self, operation: str) -> None:
        with self._lock:
            self._redis_errors[operation] = self._redis_errors.get(operation, 0) + 1

    def exposition(self, active_sessions: Callable[[], int] | None = None) -> tuple[bytes, str]:
        """The text exposition of every process's metrics, this one's up to now, and the
        gauges computed now (``active_sessions`` omitted when ``None`` or unknown):
        ``(body, content type)``."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self._registry(active_sessions)), CONTENT_TYPE_LATEST

    def families(self) -> Iterable[Metric]:
        """Every process's metrics, this one's up to now, as metric families (the
        dashboard reads them without a text round trip)."""
        return self._registry(None).collect()

    def _registry(self, active_sessions: Callable[[], int] | None) -> CollectorRegistry:
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        self.flush()
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.directory)
        if active_sessions is not None:
            registry.register(_ScrapeTimeGauges(active_sessions))
        return registry

    def flush(self) -> None:
        """Write this process's running totals to its files."""
        with self._flush_lock:
            if self._closed:
                return
            if not self._files:
                from prometheus_client.mmap_dict import MmapedDict

                self._files = {kind: MmapedDict(path) for kind, path in self._paths.items()}
            for family, labels, value in self._series():
                if family.histogram:
                    self._write_histogram(family, labels, value)
                else:
                    self._write("counter", family, "_total", family.labels, labels, value)

    def close(self) -> None:
        """Flush, stop the flushing thread, and let go of the files (a private directory
        is removed). Idempotent."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        try:
            self.flush()
        except OSError as error:
            _failures.warning("metrics: the last flush failed: %s", error)
        with self._flush_lock:
            self._closed = True
            for file in self._files.values():
                file.close()
            self._files = {}
        if self._private is not None:
            shutil.rmtree(self._private, ignore_errors=True)
        self._at_exit.cancel()

    def _run(self) -> None:
        while not self._stop.wait(self._flush_interval):
            try:
                self.flush()
            except OSError as error:  # a full disk, a directory removed under us
                _failures.warning("metrics: flush failed: %s", error)

    def _new_table(self) -> dict[_DecisionKey, list[int]]:
        table: dict[_DecisionKey, list[int]] = {}
        with self._tables_lock:
            self._tables.append((threading.current_thread(), table))
        self._local.table = table
        return table

    def _decision_totals(self) -> dict[_DecisionKey, list[int]]:
        with self._tables_lock:
            tables = list(self._tables)
        totals = {key: entry.copy() for key, entry in self._ended.items()}
        for thread, table in tables:
            ended = not thread.is_alive()  # asked first: an ended thread's table is final
            for key, entry in list(table.items()):  # C-level copies: safe under the GIL
                _add(totals, key, entry.copy())
                if ended:
                    _add(self._ended, key, entry)
            if ended:
                with self._tables_lock:
                    self._tables = [pair for pair in self._tables if pair[1] is not table]
        return totals

    def _series(self) -> list[tuple[Family, tuple[str, ...], Any]]:
        decisions: dict[tuple[str, ...], int] = {}
        latency: dict[tuple[str, ...], list[int]] = {}
        negative = 0
        for (dialect, rule, result, tier, hit), entry in self._decision_totals().items():
            count = sum(entry[:-1])
            labels = (dialect, rule or "none", result, tier or "none")
            decisions[labels] = decisions.get(labels, 0) + count
            _add(latency, (tier or "none",), entry)
            negative += count if hit else 0
        with self._lock:
            kratos = {(status,): entry.copy() for status, entry in self._kratos.items()}
            aal2 = {(method,): count for method, count in self._aal2.items()}
            redis_errors = {(operation,): count for operation, count in self._redis_errors.items()}
        series: list[tuple[Family, tuple[str, ...], Any]] = [(NEGATIVE_CACHE_HITS, (), negative)]
        series += [(DECISIONS, labels, count) for labels, count in decisions.items()]
        series += [
            (DECISION_SECONDS, labels, [*entry[:-1], entry[-1] / 1e9])
            for labels, entry in latency.items()
        ]
        series += [(KRATOS_SECONDS, labels, entry) for labels, entry in kratos.items()]
        series += [(AAL2_EVENTS, labels, count) for labels, count in aal2.items()]
        series += [(REDIS_ERRORS, labels, count) for labels, count in redis_errors.items()]
        return series

    def _write_histogram(self, family: Family, labels: tuple[str, ...], value: list[float]) -> None:
        # As prometheus-client's own multiprocess histograms: a count per bucket (not
        # cumulative; the collector adds them up, and derives _count) and the sum.
        names = (*family.labels, "le")
        for bound, count in zip(_bucket_texts(family), value[:-1], strict=True):
            self._write("histogram", family, "_bucket", names, (*labels, bound), count)
        self._write("histogram", family, "_sum", family.labels, labels, value[-1])

    def _write(
        self,
        kind: str,
        family: Family,
        suffix: str,
        names: tuple[str, ...],
        values: tuple[str, ...],
        value: float,
    ) -> None:
        cache_key = (family.name + suffix, names, values)
        key = self._keys.get(cache_key)
        if key is None:
            from prometheus_client.mmap_dict import mmap_key

            key = mmap_key(
                family.name, family.name + suffix, list(names), list(values), family.help
            )
            self._keys[cache_key] = key
        if self._written.get(key) != value:
            self._files[kind].write_value(key, float(value), 0.0)
            self._written[key] = value


class _AAL2Counter(SessionEvents):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def aal2_recorded(self, session: MirroredSession, event: dict[str, str]) -> None:
        # The first second factor is what took the session to AAL2 (as the analytics count).
        self._metrics.aal2_event(first_method(event))


class _ScrapeTimeGauges:
    """Gauges read when scraped, in the scraping process only."""

    def __init__(self, active_sessions: Callable[[], int]) -> None:
        self._active_sessions = active_sessions

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        try:
            value = self._active_sessions()
        except BridgeError as error:  # the store cannot answer: leave the gauge out
            _failures.warning("metrics: active sessions unknown: %s", error)
            return
        yield GaugeMetricFamily(ACTIVE_SESSIONS, "Sessions active now.", value=value)


def _refusal_key(dialect: str, reply: Reply, trace: Trace) -> _DecisionKey:
    hit = reply.cause is not None and issubclass(reply.cause, RejectedRecently)
    return (dialect, trace.rule, outcome(reply), trace.tier, hit)


def _add(totals: dict[Any, list[Any]], key: Any, entry: list[Any]) -> None:
    into = totals.get(key)
    if into is None:
        totals[key] = entry.copy()
    else:
        for index, value in enumerate(entry):
            into[index] += value


@functools.cache
def _bucket_texts(family: Family) -> tuple[str, ...]:
    from prometheus_client.utils import floatToGoString

    return (*(floatToGoString(bound) for bound in family.buckets), "+Inf")


def _close_if_alive(ref: weakref.ReferenceType[Metrics]) -> None:
    metrics = ref()
    if metrics is not None:
        metrics.close()


def _remove_directory(directory: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:  # not a forked child that inherited the atexit list
        shutil.rmtree(directory, ignore_errors=True)
