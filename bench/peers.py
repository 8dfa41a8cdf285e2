"""Benchmark: the bridge beside heimdall, Ory Oathkeeper and Kratos's own whoami, in one run.

Not a test: it prints figures and writes them to JSON and a PNG chart.

    .venv/bin/python bench/peers.py [--duration 10] [--connections 64]
        [--rounds cpu-limit,started-pinned[,unpinned]]
        [--scenarios warm-100,warm-1000,zipf-10000,invalid-10]
        [--systems bridge,bridge-1worker,heimdall,oathkeeper,kratos[,bridge-sentinel,bridge-cluster]
                   [,bridge-forward,bridge-rules,bridge-jwt,bridge-rules-jwt,bridge-bare,bridge-analytics]
                   [,bridge-grpc]]
        [--base-tree CHECKOUT] [--repeat N] [--sessions-cache DIR] [--out FILE.json]
        [--chart FILE.png]

With --base-tree, `bridge-base` (the bridge run from that other checkout, e.g. a
`git worktree` of the commit before a change) is driven right after `bridge` in every
scenario: what a change costs, both trees under the same load in the same run.

With --repeat N (N > 1; odd is best), each scenario of a round drives its systems N times,
interleaved (every system once, then every system again, ...), on the same started servers,
so that drift on the machine hits each system alike; one run's figures swing by a third on a
shared machine, too much to see a 5-10% change in one A/B. Each repeat warms its system
again as the first does (see Load): heimdall's cache and the bridge's revalidation last 5 s,
less than the other systems' runs in between, so an unwarmed repeat would start colder than
the first one did. Repeat r's wrk runs use the scenario's seed + 2r (warm-up + 2r + 1), so
the invalid tokens of invalid-10 are new to each repeat (the bridge caches rejections) and
the same for every system within it. Every figure reported is then the median over the
repeats (the lower middle for an even N: a figure a repeat measured), with the min-max of
req/s, p99 and CPU per request beside it; and bridge-base/bridge, for req/s and CPU per
request, is the median of the per-repeat ratios: both figures of a pair measured moments
apart. The JSON keeps every repeat's figures ("runs") beside the medians ("results").

What runs: redis-server, Kratos v1.3.1 on a SQLite file (the test suite's build and config,
sessions valid for 720h), the bridge started as a user starts it (`python -m bridge serve`,
production settings: Redis store, BRIDGE_REVALIDATE_AFTER=5, BRIDGE_WORKERS unset, so the
default worker count), the same bridge with BRIDGE_WORKERS=1 (`bridge-1worker`: by default
in warm-1000 only, to compare its default worker count with one worker on the same CPU),
heimdall v0.17.2 (decision mode, 5 s cache) and Oathkeeper v0.40.9 (decisions API, no
cache), each configured as its documentation advises for production (bench/peers/: the
comments there say which setting is there for what); asked for by name, the same bridge on
Redis Sentinel (master, replica, three sentinels: `bridge-sentinel`) or Redis Cluster
(three masters, three replicas: `bridge-cluster`), set up as the test suite does
(tests/support/topologies.py), every Redis process counted as the bridge's own; and, asked for by
name, the bridge on /forward-auth with Traefik's X-Forwarded-* headers: plain
(`bridge-forward`), with the 20-rule file bench/peers/rules-20.yml (`bridge-rules`, the
request matching none of the first 19), with the JWT on (`bridge-jwt`), with both
(`bridge-rules-jwt`), with analytics and metrics off (`bridge-bare`, to see what they
cost) and with metrics alone off (`bridge-analytics`); and, asked for by name, the
bridge's Envoy gRPC ext_authz (`bridge-grpc`: BRIDGE_GRPC_PORT, the same original request
as a CheckRequest), driven by ghz instead of wrk (see Load). Missing binaries are built
first (Kratos, heimdall, Oathkeeper, ghz: minutes, once per machine).

Rounds: every server (the systems, Kratos, Redis) is started afresh for each round, and
the servers share CPU 0 while wrk has CPU 1 to itself:
  cpu-limit       as in a container with a 1-CPU limit: each server starts seeing every
                  CPU, inside its own cgroup with a 1-CPU quota (cgroup v1 cpu.cfs_quota_us
                  or v2 cpu.max; needs root and a writable cpu controller, else no quota,
                  and the round says so); once all are ready, every thread of each is
                  pinned to CPU 0. Whatever sizes itself from the CPUs it sees at start
                  (the bridge's default worker count, Go's GOMAXPROCS) does so here as it
                  would in such a container. The cgroups are removed afterwards.
  started-pinned  each server started already pinned to CPU 0 (a cpuset, taskset), so it
                  sees one CPU from the start: the bridge's default is then one worker.
  unpinned        (asked for by name) nothing pinned, no quota, wrk included.
Each round reports the CPUs every server's threads were allowed at the end of start-up
(Cpus_allowed_list) and the number of Granian worker processes each bridge started.

Sessions: users registered through Kratos's API registration flow, one session token each
(one at a time, about 2 minutes for 10,000: see build_sessions). The Kratos database and
the token list are cached in --sessions-cache, keyed by their number, and reused (the first
N tokens of a bigger set) while sampled tokens still answer 200 at whoami.

Load: `wrk -t1 -c{connections} -d{duration}s` with bench/wrk/tokens.lua, one
X-Session-Token per request. `bridge-grpc` gets the same tokens in the same order from
ghz (`--concurrency {connections} --connections 8`: Envoy keeps a few HTTP/2 connections
to an ext_authz cluster, and each server process takes its own), one CheckRequest per
call from a JSON array it goes through in turn (a Zipf run: 20,000 draws, fixed seed);
not in invalid-10, whose 401s are inside OK calls where ghz cannot count them. For it
"non-2xx" is the calls that did not end OK. For each round and scenario the systems are
driven one after another with the same load, each warmed first (one request per token,
then 2 s of the same load, not counted):
  warm-100     100 sessions, tokens in rotation
  warm-1000    1,000 sessions, tokens in rotation
  zipf-10000   10,000 sessions, token rank k drawn with weight k^-1.1 (fixed seed)
  invalid-10   1,000 sessions; 10% of requests carry a fresh random token of Kratos's
               shape ("ory_st_" + 32 alphanumerics), so it cannot have been seen before

Figures per round, system and scenario: req/s, p50/p99 latency (wrk), non-2xx answers (for
invalid-10 the share of 401, from the statuses tokens.lua counts), Kratos whoami calls per
1,000 requests (Kratos's own Prometheus counter, read before and after the run), CPU us
per request of the system's own processes (user + system time of its process tree from
/proc, before and after; for the bridge that includes redis-server, which only the bridge
uses) and, apart, Kratos's CPU us per request during the same run; RSS (MB, summed over
the process tree) at the end of the run. "Per request" is per request sent: wrk's completed
requests plus the few (at most one per connection) in flight when it stopped, which the
systems and Kratos served too; counters are read 0.5 s after wrk stops, so those are in.
Two checks on the measurement itself, as shares of one CPU over the counted window: wrk's
CPU (near 100%: the load generator, not the system, was the limit) and "other": busy CPU
time of the machine (/proc/stat) charged to none of the system, Kratos and wrk, i.e. the
kernel's loopback work and any other program running at the time (noise).
Then bridge/peer ratios of req/s and p99 (and the default bridge over `bridge-1worker`).

CPU per rejected token (invalid-10): the run's CPU, less what its valid requests would
have cost at the CPU per request of the same system's warm-1000 run (same 1,000 tokens,
same rotation), divided by the number of requests answered 401:
    (cpu_invalid10 - cpu_per_request_warm1000 * answered_200) / answered_401
It is given for the system's own processes and for the system together with Kratos. It
is rough: it assumes a valid request costs the same in both runs. For the bridge and
heimdall it is an upper bound: they re-validate each session every 5 s whatever the
request rate, so when the rejected tokens slow a run down, a larger share of its valid
requests call Kratos than in warm-1000, and that extra cost is counted as the rejected
tokens'.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import importlib
import json
import os
import random
import re
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench" / "peers"))

from render import render  # noqa: E402

from bench.cpu_limit import CpuQuota, cpu_affinity, pin_tree  # noqa: E402
from bench.measure import (  # noqa: E402
    allowed_cpus,
    child_pids,
    cpu_seconds,
    parse_ghz,
    parse_wrk,
    process_tree,
    rss_mb,
    run_ghz,
    run_wrk,
)
from bridge.pipeline.tokens import generate_key  # noqa: E402
from tests.support import kratos_flows as flows  # noqa: E402
from tests.support.harness import (  # noqa: E402
    KRATOS_BIN,
    KRATOS_VERSION,
    Kratos,
    RedisServer,
    free_port,
    stop_process,
    wait_until,
)
from tests.support.topologies import ClusterSet, SentinelSet  # noqa: E402

CACHE = Path(os.environ.get("KSB_CACHE") or Path.home() / ".cache" / "kratos-session-bridge")
PEERS = ROOT / "bench" / "peers"
WRK_SCRIPT = ROOT / "bench" / "wrk" / "tokens.lua"
PEER_VERSIONS = {"heimdall": "v0.17.2", "oathkeeper": "v0.40.9"}
GHZ_VERSION = "v0.120.0"
SYSTEMS = ("bridge", "heimdall", "oathkeeper", "kratos")
# The bridge with a fixed worker count beside its default one (BRIDGE_WORKERS unset).
BRIDGE_WORKERS = {"bridge-1worker": 1}
# Run when --systems is not given, in these scenarios only.
DEFAULT_SYSTEMS = {
    "bridge": None,
    "bridge-1worker": {"warm-1000"},
    "heimdall": None,
    "oathkeeper": None,
    "kratos": None,
}
# The bridge on the other Redis topologies (tests/support/topologies.py): asked for by name.
BRIDGE_TOPOLOGIES = {"bridge-sentinel": SentinelSet, "bridge-cluster": ClusterSet}
# The bridge on /forward-auth (Traefik's request), plain and with the features that cost
# per request: a 20-rule file, the JWT, both. Asked for by name, compared with each other.
FORWARDED = {
    "X-Forwarded-Method": "GET",
    "X-Forwarded-Proto": "https",
    "X-Forwarded-Host": "app.example.com",
    "X-Forwarded-Uri": "/reports/2026?page=2",
}
BRIDGE_FEATURES = {
    "bridge-forward": {},
    "bridge-rules": {"rules": True},
    "bridge-jwt": {"jwt": True},
    "bridge-rules-jwt": {"rules": True, "jwt": True},
    "bridge-bare": {"bare": True},  # analytics and metrics off: what they cost
    "bridge-analytics": {"analytics_only": True},  # metrics off, analytics on
}
# The bridge's Envoy gRPC ext_authz, driven by ghz: asked for by name.
GRPC = "bridge-grpc"
GRPC_CALL = "envoy.service.auth.v3.Authorization.Check"
GRPC_CONNECTIONS = 8
GRPC_SCENARIOS = {"warm-100", "warm-1000", "zipf-10000"}  # invalid-10: see Load
ZIPF_DRAWS = 20_000
# The bridge from another checkout (--base-tree), beside this one: a change's cost, with
# both trees driven in turn by the same load in the same run.
BASE = "bridge-base"
ALL_SYSTEMS = (*SYSTEMS, *BRIDGE_WORKERS, *BRIDGE_TOPOLOGIES, *BRIDGE_FEATURES, GRPC, BASE)
SESSION_LIFESPAN = "720h"
WARMUP_SECONDS = 2
SETTLE_SECONDS = 0.5  # after wrk stops, for the requests it left in flight to finish
ZIPF_S = 1.1
SERVER_CPUS = {0}
WRK_CPUS = "1"
ROUNDS = ("cpu-limit", "started-pinned", "unpinned")


@dataclass(frozen=True)
class Scenario:
    name: str
    sessions: int
    pattern: str = "rotate"
    invalid_percent: int = 0
    seed: int = 1


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("warm-100", 100, seed=100),
        Scenario("warm-1000", 1000, seed=1000),
        Scenario("zipf-10000", 10_000, pattern="zipf", seed=10_000),
        Scenario("invalid-10", 1000, invalid_percent=10, seed=10),
    )
}


# ---------------------------------------------------------------- tools and binaries


def ensure_wrk() -> None:
    if shutil.which("wrk"):
        return
    if os.geteuid() != 0:
        sys.exit("wrk is not installed: apt-get install wrk")
    print("wrk is not installed: apt-get install wrk", flush=True)
    subprocess.run(["apt-get", "update"], check=True)
    subprocess.run(["apt-get", "install", "-y", "wrk"], check=True)


def load_pyplot():
    """matplotlib.pyplot with the Agg backend, installed into this venv if missing; or None."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is missing: pip install matplotlib (into this venv)", flush=True)
        installed = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"])
        if installed.returncode != 0:
            print("could not install matplotlib: no chart will be drawn", flush=True)
            return None
        importlib.invalidate_caches()
        import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot

    return matplotlib.pyplot


def peer_binary(name: str) -> Path:
    """heimdall or oathkeeper from the cache, built by bench/peers/build-peer.sh if missing."""
    version = PEER_VERSIONS[name]
    binary = CACHE / f"{name}-{version}" / name
    if not binary.exists():
        print(f"building {name} {version} (minutes, once)", flush=True)
        subprocess.run(
            ["bash", str(PEERS / "build-peer.sh"), name, str(binary), version],
            check=True,
            env={**os.environ, "KSB_CACHE": str(CACHE)},
        )
    return binary


def ghz_binary() -> Path:
    """ghz from the cache, built by bench/peers/build-ghz.sh if missing."""
    binary = CACHE / f"ghz-{GHZ_VERSION}" / "ghz"
    if not binary.exists():
        print(f"building ghz {GHZ_VERSION} (minutes, once)", flush=True)
        build = PEERS / "build-ghz.sh"
        subprocess.run(["bash", str(build), str(binary), GHZ_VERSION], check=True)
    return binary


def ensure_kratos() -> None:
    if not KRATOS_BIN.exists():
        print(f"building Kratos {KRATOS_VERSION} (minutes, once)", flush=True)
        subprocess.run(
            [
                "bash",
                str(ROOT / "tests" / "tools" / "build-kratos.sh"),
                str(KRATOS_BIN),
                KRATOS_VERSION,
            ],
            check=True,
        )


def in_parallel(function, items, threads: int = 8) -> Iterator:
    """function(item) for each item, THREADS at a time, in order; on an error or Ctrl-C the
    items not yet started are dropped (a plain `with ThreadPoolExecutor` would run them all)."""
    pool = ThreadPoolExecutor(threads)
    try:
        yield from pool.map(function, items)
    finally:
        pool.shutdown(cancel_futures=True)


# ---------------------------------------------------------------- Kratos and its sessions


class FileKratos(Kratos):
    """tests.support.harness.Kratos on a SQLite file, migrated before it serves, so that the
    sessions made in one run outlive it."""

    def __init__(self, workdir: Path, db: Path, dsn_options: str = "") -> None:
        self.db = db
        self.dsn_options = dsn_options
        super().__init__(workdir, lifespan=SESSION_LIFESPAN)

    def start(self) -> None:
        dsn = f"sqlite://{self.db}?_fk=true&mode=rwc{self.dsn_options}"
        config = yaml.safe_load(self.config_path.read_text())
        config["dsn"] = dsn
        self.config_path.write_text(yaml.safe_dump(config))
        subprocess.run(
            [str(KRATOS_BIN), "migrate", "sql", "-e", "--yes"],
            env={**os.environ, "DSN": dsn},
            check=True,
            capture_output=True,
            timeout=300,
        )
        try:
            super().start()
        except BaseException:
            self.stop()
            raise


def cached_sets(cache: Path) -> list[int]:
    """Session counts that have both a database and a token list in the cache, largest first
    (so that runs of fewer scenarios use the same database as full runs)."""
    counts = []
    for tokens in cache.glob("tokens-*.txt"):
        count = tokens.stem.removeprefix("tokens-")
        if count.isdigit() and (cache / f"kratos-{count}.sqlite").exists():
            counts.append(int(count))
    return sorted(counts, reverse=True)


def register(client: httpx.Client, public_url: str) -> str:
    """One user through Kratos's API registration flow (as tests/kratos_flows.register, but on
    a shared keep-alive client: a new client per call costs more CPU than Kratos does);
    returns the session token. Tried three times."""
    for attempt in range(3):
        try:
            flow = client.get(public_url + "/self-service/registration/api")
            password = "correct-horse-" + secrets.token_hex(8)
            body = client.post(
                flow.raise_for_status().json()["ui"]["action"],
                json={
                    "method": "password",
                    "traits": {"email": f"bench-{secrets.token_hex(8)}@example.test"},
                    "password": password,
                },
            )
            return body.raise_for_status().json()["session_token"]
        except httpx.HTTPError:
            if attempt == 2:
                raise
            time.sleep(0.5)
    raise AssertionError("unreachable")


def build_sessions(cache: Path, count: int, work: Path) -> None:
    """Register COUNT users against a fresh Kratos database; cache it and their tokens.

    One at a time: Kratos on SQLite answers "database is locked" (500) to registrations
    made concurrently (seen with 2 to 8 at once), and retrying them is slower than queueing.
    Writes are unsynced while building (``_sync=OFF``, journal in memory): about 110
    registrations/s instead of 70. The file is complete once Kratos has stopped."""
    db = work / f"build-{count}.sqlite"
    print(f"registering {count} users (cached for later runs in {cache})", flush=True)
    kratos = FileKratos(work, db, dsn_options="&_sync=OFF&_journal=MEMORY")
    started = time.monotonic()
    tokens: list[str] = []
    try:
        with httpx.Client(timeout=30) as client:
            while len(tokens) < count:
                tokens.append(register(client, kratos.public_url))
                if len(tokens) % 1000 == 0:
                    rate = len(tokens) / (time.monotonic() - started)
                    print(f"  {len(tokens)} users, {rate:.0f}/s", flush=True)
    finally:
        kratos.stop()
    cache.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(db, cache / f"kratos-{count}.sqlite.tmp")
    (cache / f"kratos-{count}.sqlite.tmp").replace(cache / f"kratos-{count}.sqlite")
    (cache / f"tokens-{count}.txt.tmp").write_text("\n".join(tokens) + "\n")
    (cache / f"tokens-{count}.txt.tmp").replace(cache / f"tokens-{count}.txt")


def sessions_valid(cache: Path, count: int, work: Path) -> bool:
    """Do a few of the cached tokens (first, last, some in between) still answer 200?"""
    tokens = (cache / f"tokens-{count}.txt").read_text().split()
    if len(tokens) < count:
        return False
    db = work / f"check-{count}.sqlite"
    shutil.copyfile(cache / f"kratos-{count}.sqlite", db)
    sample = [tokens[0], tokens[-1], *random.Random(count).sample(tokens, min(5, count))]
    kratos = FileKratos(work, db)
    try:
        return all(flows.session_of(kratos, token=t).status_code == 200 for t in sample)
    finally:
        kratos.stop()
        db.unlink()


def prepare_sessions(cache: Path, needed: int, work: Path) -> tuple[Path, Path]:
    """(database, token list) with at least NEEDED sessions: from the cache, else built."""
    for count in cached_sets(cache):
        if count < needed:
            continue
        if sessions_valid(cache, count, work):
            print(f"reusing {count} cached sessions from {cache}", flush=True)
            return cache / f"kratos-{count}.sqlite", cache / f"tokens-{count}.txt"
        print(f"cached sessions kratos-{count} no longer valid: rebuilding", flush=True)
    build_sessions(cache, needed, work)
    return cache / f"kratos-{needed}.sqlite", cache / f"tokens-{needed}.txt"


# ---------------------------------------------------------------- the systems under test


@dataclass
class System:
    name: str
    url: str  # the endpoint wrk drives
    processes: list[subprocess.Popen]  # roots of the process trees that are the system's own
    headers: dict[str, str] = field(default_factory=dict)  # sent with every request
    grpc: bool = False  # url is host:port of Envoy's gRPC Check, driven by ghz

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.processes)


@dataclass
class Stack:
    """Kratos, Redis and the systems under test, started and placed on CPUs as ROUND says."""

    work: Path
    db: Path
    names: list[str]
    round: str  # a key of ROUNDS
    quota: CpuQuota | None = None  # cpu-limit: where the 1-CPU cgroups are made
    base_tree: Path | None = None  # bridge-base: the checkout it runs from
    kratos: Kratos | None = None
    redis: RedisServer | None = None
    topologies: list[SentinelSet | ClusterSet] = field(default_factory=list)
    systems: dict[str, System] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    servers: dict[str, dict] = field(default_factory=dict)
    cgroups: list[Path] = field(default_factory=list)
    _started: list[subprocess.Popen] = field(default_factory=list)

    def describe(self) -> str:
        if self.round == "unpinned":
            return "nothing pinned"
        if self.round == "started-pinned":
            return "servers started pinned to CPU 0; wrk on CPU 1"
        quota = (
            f"1-CPU quota ({self.quota.describe()})"
            if self.quota
            else "no quota (no writable cgroup)"
        )
        return f"servers started seeing every CPU, {quota}, then pinned to CPU 0; wrk on CPU 1"

    def start(self) -> None:
        db = self.work / f"kratos-{self.round}.sqlite"
        shutil.copyfile(self.db, db)
        starters = {
            "bridge": self._bridge,
            "heimdall": self._heimdall,
            "oathkeeper": self._oathkeeper,
            "kratos": self._kratos_direct,
            **{name: functools.partial(self._bridge, name) for name in BRIDGE_WORKERS},
            **{name: functools.partial(self._bridge, name) for name in BRIDGE_TOPOLOGIES},
            **{name: functools.partial(self._bridge, name) for name in BRIDGE_FEATURES},
            GRPC: functools.partial(self._bridge, GRPC),
            BASE: functools.partial(self._bridge, BASE),
        }
        with self._placed("kratos"):
            self.kratos = FileKratos(self.work, db)
        if any(name not in BRIDGE_TOPOLOGIES and name.startswith("bridge") for name in self.names):
            with self._placed("redis"):
                self.redis = RedisServer(self.work)
        for name in self.names:
            try:
                with self._placed(name):
                    self.systems[name] = starters[name]()
            except Exception as error:  # a system that does not start is reported, not fatal
                self.failures[name] = f"did not start: {error}"
                print(f"{name} did not start: {error}", flush=True)
        if self.round == "cpu-limit":
            every = {*self._roots().values(), *(p for s in self.systems.values() for p in s.pids)}
            for pid in every:
                pin_tree(pid, SERVER_CPUS)
        self.servers = self.layout()

    @contextlib.contextmanager
    def _placed(self, name: str) -> Iterator[None]:
        """Servers started inside are placed as the round says: pinned from the start
        (started-pinned), in a cgroup of their own with a 1-CPU quota (cpu-limit, when
        the machine allows it; pinned once all have started), or left alone."""
        if self.round == "started-pinned":
            with cpu_affinity(SERVER_CPUS):
                yield
        elif self.round == "cpu-limit" and self.quota is not None:
            group = self.quota.make(name, cpus=1)  # the kratos system: Kratos's own
            if group not in self.cgroups:
                self.cgroups.append(group)
            with self.quota.inside(group):
                yield
        else:
            yield

    def stop(self) -> None:
        for process in reversed(self._started):
            stop_process(process)
        if self.redis is not None:
            self.redis.stop()
        for topology in self.topologies:
            topology.stop()
        if self.kratos is not None:
            self.kratos.stop()
        for group in self.cgroups:
            try:
                self.quota.remove(group)
            except OSError as error:
                print(f"could not remove cgroup {group}: {error}", flush=True)

    def _roots(self) -> dict[str, int]:
        """The first process of each server, Redis and Kratos included."""
        roots = {name: system.pids[0] for name, system in self.systems.items()}
        roots["kratos"] = self.kratos.process.pid
        if self.redis is not None:
            roots["redis"] = self.redis.process.pid
        return roots

    def layout(self) -> dict[str, dict]:
        """Per server: the CPUs its threads may run on (Cpus_allowed_list), its processes
        and threads, and for a bridge its Granian worker processes (the server process's
        children)."""
        layout = {}
        for name, pid in self._roots().items():
            tree = process_tree(pid)
            layout[name] = {
                "cpus": ",".join(sorted(allowed_cpus(pid))),
                "processes": len(tree),
                "threads": sum(len(list(Path(f"/proc/{p}/task").iterdir())) for p in tree),
            }
            if name in self.systems and name.startswith("bridge"):
                layout[name]["workers"] = len(child_pids(pid))
        return layout

    def _spawn(self, argv: list[str], log: Path | None, env: dict | None = None):
        sink = log.open("ab") if log else subprocess.DEVNULL
        try:
            process = subprocess.Popen(
                argv, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=self.work
            )
        finally:
            if log:
                sink.close()
        self._started.append(process)
        return process

    def _wait(self, process: subprocess.Popen, url: str, what: str, log: Path | None) -> None:
        """Until URL answers 200; an early exit is reported with the end of its log."""

        def ready_or_gone() -> bool:
            return process.poll() is not None or httpx.get(url, timeout=2).status_code == 200

        wait_until(ready_or_gone, 60, what)
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log else ""
            raise RuntimeError(f"{what} exited with {process.returncode}\n{tail}")

    def _bridge(self, name: str = "bridge") -> System:
        """The bridge on the standalone redis-server, or (``bridge-sentinel``,
        ``bridge-cluster``) on a Sentinel or Cluster set; all of its Redis processes
        count as the bridge's own."""
        if name not in BRIDGE_TOPOLOGIES:
            redis_url, redis_processes = self.redis.url, [self.redis.process]
        else:
            topology = BRIDGE_TOPOLOGIES[name](self.work / name)
            self.topologies.append(topology)
            redis_url = topology.url
            nodes = topology.servers if isinstance(topology, SentinelSet) else topology.nodes
            redis_processes = [node.process for node in nodes.values()]
            redis_processes += [s.process for s in getattr(topology, "sentinels", [])]
        port = free_port()
        log = self.work / f"bridge-{port}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
        env.update(
            BRIDGE_REDIS_URL=redis_url,
            BRIDGE_SECRET=secrets.token_hex(24),
            BRIDGE_KEY_PREFIX="bench:",
            BRIDGE_REVALIDATE_AFTER="5",
            BRIDGE_KRATOS_PUBLIC_URL=self.kratos.public_url,
            BRIDGE_KRATOS_ADMIN_URL=self.kratos.admin_url,
            BRIDGE_LOG_LEVEL="warning",
            BRIDGE_ADMIN_PORT=str(free_port()),
        )
        if name == BASE:
            env["BRIDGE_KEY_PREFIX"] = f"bench-{name}:"
            env["PYTHONPATH"] = str(self.base_tree)  # its `bridge` package before this one
        if name in BRIDGE_WORKERS:
            env["BRIDGE_KEY_PREFIX"] = f"bench-{name}:"
            env["BRIDGE_WORKERS"] = str(BRIDGE_WORKERS[name])
        features = BRIDGE_FEATURES.get(name)
        if features is not None:
            env["BRIDGE_KEY_PREFIX"] = f"bench-{name}:"
            if features.get("bare"):
                env.update(BRIDGE_ANALYTICS="false", BRIDGE_METRICS="false")
            if features.get("analytics_only"):
                env.update(BRIDGE_METRICS="false")
            if features.get("rules"):
                env["BRIDGE_RULES_FILE"] = str(PEERS / "rules-20.yml")
            if features.get("jwt"):
                keys = self.work / f"jwt-{name}"
                if not keys.exists():
                    generate_key(keys)
                env.update(BRIDGE_JWT_HEADER="X-Bridge-Jwt", BRIDGE_JWT_KEYS_DIR=str(keys))
        if name == GRPC:
            env.update(BRIDGE_KEY_PREFIX=f"bench-{name}:", BRIDGE_GRPC_PORT=str(free_port()))
        argv = [sys.executable, "-m", "bridge", "serve", "--port", str(port)]
        process = self._spawn(argv, log, env)
        url = f"http://127.0.0.1:{port}"
        self._wait(process, url + "/health/alive", name, log)
        if name == GRPC:
            target = f"127.0.0.1:{env['BRIDGE_GRPC_PORT']}"
            return System(name, target, [process, *redis_processes], grpc=True)
        if features is not None:
            return System(name, url + "/forward-auth", [process, *redis_processes], dict(FORWARDED))
        return System(name, url + "/auth", [process, *redis_processes])

    def _heimdall(self) -> System:
        port, admin_port = free_port(), free_port()
        config = self.work / f"heimdall-{port}.yaml"
        config.write_text(
            render(
                PEERS / "heimdall.yaml",
                kratos_public_url=self.kratos.public_url,
                port=port,
                admin_port=admin_port,
            )
        )
        argv = [str(peer_binary("heimdall")), "serve", "decision", "-c", str(config)]
        process = self._spawn([*argv, "--insecure-skip-all-tls-enforcement"], None)
        health = f"http://127.0.0.1:{admin_port}/.well-known/health"
        self._wait(process, health, "heimdall", None)
        return System("heimdall", f"http://127.0.0.1:{port}/auth", [process])

    def _oathkeeper(self) -> System:
        port, proxy_port, metrics_port = free_port(), free_port(), free_port()
        config = self.work / f"oathkeeper-{port}.yaml"
        config.write_text(
            render(
                PEERS / "oathkeeper.yaml",
                kratos_public_url=self.kratos.public_url,
                port=port,
                proxy_port=proxy_port,
                metrics_port=metrics_port,
                rules_path=PEERS / "oathkeeper-rules.json",
            )
        )
        log = self.work / f"oathkeeper-{port}.log"
        process = self._spawn([str(peer_binary("oathkeeper")), "serve", "-c", str(config)], log)
        url = f"http://127.0.0.1:{port}"
        self._wait(process, url + "/health/ready", "oathkeeper", log)
        return System("oathkeeper", url + "/decisions/auth", [process])

    def _kratos_direct(self) -> System:
        return System("kratos", self.kratos.public_url + "/sessions/whoami", [self.kratos.process])


# ---------------------------------------------------------------- measuring


def wrk_env(scenario: Scenario, tokens: Path, seed: int) -> dict[str, str]:
    return {
        "BENCH_TOKENS": str(tokens),
        "BENCH_COUNT": str(scenario.sessions),
        "BENCH_PATTERN": scenario.pattern,
        "BENCH_ZIPF_S": str(ZIPF_S),
        "BENCH_INVALID_PERCENT": str(scenario.invalid_percent),
        "BENCH_SEED": str(seed),
    }


def parse_lua_counts(out: str) -> dict:
    """The request kinds and answer statuses tokens.lua counted (its done() lines)."""
    sent = re.search(r"^bench-sent valid (\d+) invalid (\d+)$", out, re.M)
    statuses = {
        code: int(count) for code, count in re.findall(r"^bench-status (\d+) (\d+)$", out, re.M)
    }
    return {
        "sent_valid": int(sent.group(1)) if sent else None,
        "sent_invalid": int(sent.group(2)) if sent else None,
        "statuses": dict(sorted(statuses.items())),
    }


def warm(system: System, tokens: list[str]) -> dict[str, int]:
    """One request per token, 8 at a time; the statuses seen."""
    with httpx.Client(timeout=10) as client:

        def status(token: str) -> str:
            try:
                headers = {**system.headers, "X-Session-Token": token}
                return str(client.get(system.url, headers=headers).status_code)
            except httpx.HTTPError as error:
                return type(error).__name__

        return dict(Counter(in_parallel(status, tokens)))


def cpu_of(pids: list[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


@dataclass(frozen=True)
class Counters:
    """What is read before and after a run."""

    at: float  # time.monotonic()
    kratos_calls: int  # whoami answered, by Kratos's own count
    cpu: float  # CPU seconds of the system's own process trees
    kratos_cpu: float  # CPU seconds of Kratos
    wrk_cpu: float  # CPU seconds of this process's finished children: the wrk runs
    machine_cpu: float  # busy CPU seconds of the whole machine, all cores (/proc/stat)

    @staticmethod
    def read(stack: Stack, system: System) -> Counters:
        kratos = stack.kratos
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return Counters(
            at=time.monotonic(),
            kratos_calls=kratos.whoami_calls(),
            cpu=cpu_of(system.pids),
            kratos_cpu=cpu_seconds(kratos.process.pid),
            wrk_cpu=children.ru_utime + children.ru_stime,
            machine_cpu=machine_busy_seconds(),
        )


def machine_busy_seconds() -> float:
    """Busy time of all CPUs together (user, nice, system, irq, softirq, steal)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def measure(
    stack: Stack, system: System, scenario: Scenario, args, tokens: Path, repeat: int = 0
) -> dict:
    """Warm SYSTEM, then one counted wrk run of SCENARIO against it; REPEAT (from 0) picks
    the seeds, so that each repeat sends invalid tokens none before it sent."""
    prefix = ("taskset", "-c", WRK_CPUS) if stack.round != "unpinned" else ()

    def wrk(duration: float, seed: int) -> str:
        env = wrk_env(scenario, tokens, seed)
        env["BENCH_HEADERS"] = "\n".join(f"{k}: {v}" for k, v in system.headers.items())
        return run_wrk(
            system.url,
            WRK_SCRIPT,
            connections=args.connections,
            duration=duration,
            env=env,
            prefix=prefix,
        )

    if system.grpc:
        return measure_grpc(stack, system, scenario, args, tokens, prefix)
    warm_statuses = warm(system, tokens.read_text().split()[: scenario.sessions])
    seed = scenario.seed + 2 * repeat
    wrk(WARMUP_SECONDS, seed + 1)  # another seed: no invalid token seen before
    time.sleep(SETTLE_SECONDS)
    before = Counters.read(stack, system)
    out = wrk(args.duration, seed)
    rss = sum(rss_mb(pid) for pid in system.pids)
    time.sleep(SETTLE_SECONDS)
    after = Counters.read(stack, system)
    row = {"round": stack.round, "scenario": scenario.name, "system": system.name}
    figures, counts = parse_wrk(out), parse_lua_counts(out)
    row.update(summarise(figures, counts, before, after, system.name == "kratos"))
    row.update(rss_mb=rss, warm_statuses=warm_statuses)
    return row


def check_request_json(token: str) -> dict:
    """The CheckRequest Envoy sends for FORWARDED's original request, in protobuf's JSON."""
    http = {
        "method": FORWARDED["X-Forwarded-Method"],
        "path": FORWARDED["X-Forwarded-Uri"],
        "host": FORWARDED["X-Forwarded-Host"],
        "scheme": FORWARDED["X-Forwarded-Proto"],
        "headers": {"x-session-token": token, "x-forwarded-proto": FORWARDED["X-Forwarded-Proto"]},
    }
    return {"attributes": {"request": {"http": http}}}


def grpc_order(scenario: Scenario, tokens: list[str]) -> list[str]:
    """The tokens in the order ghz sends them (it goes round the list): as tokens.lua
    picks them, rank k of a Zipf run with weight k^-s."""
    chosen = tokens[: scenario.sessions]
    if scenario.pattern != "zipf":
        return chosen
    weights = [k**-ZIPF_S for k in range(1, len(chosen) + 1)]
    return random.Random(scenario.seed).choices(chosen, weights, k=ZIPF_DRAWS)


def grpc_protoset(work: Path) -> Path:
    """Envoy's Authorization service and every file it imports, as a FileDescriptorSet
    (ghz's --protoset), from the protos the bridge itself uses (xds-protos)."""
    from envoy.service.auth.v3 import external_auth_pb2
    from google.protobuf.descriptor_pb2 import FileDescriptorProto, FileDescriptorSet

    path = work / "envoy-authz.protoset"
    if path.exists():
        return path
    ordered, seen = [], set()

    def add(descriptor) -> None:  # dependencies first
        if descriptor.name in seen:
            return
        seen.add(descriptor.name)
        for dependency in descriptor.dependencies:
            add(dependency)
        proto = FileDescriptorProto()
        descriptor.CopyToProto(proto)
        ordered.append(proto)

    add(external_auth_pb2.DESCRIPTOR)
    path.write_bytes(FileDescriptorSet(file=ordered).SerializeToString())
    return path


def warm_grpc(system: System, tokens: list[str]) -> dict[str, int]:
    """One Check per token, 8 at a time; the HTTP statuses the answers carry."""
    import grpc
    from envoy.service.auth.v3.external_auth_pb2 import CheckRequest, CheckResponse
    from google.protobuf.json_format import ParseDict

    with grpc.insecure_channel(system.url) as channel:
        check = channel.unary_unary(
            f"/{GRPC_CALL.rpartition('.')[0]}/Check",
            request_serializer=CheckRequest.SerializeToString,
            response_deserializer=CheckResponse.FromString,
        )

        def status(token: str) -> str:
            try:
                answer = check(ParseDict(check_request_json(token), CheckRequest()), timeout=10)
            except grpc.RpcError as error:
                return str(error.code())
            return "200" if answer.status.code == 0 else str(answer.denied_response.status.code)

        return dict(Counter(in_parallel(status, tokens)))


def measure_grpc(
    stack: Stack, system: System, scenario: Scenario, args, tokens: Path, prefix: tuple
) -> dict:
    """As ``measure``, with ghz sending CheckRequests in place of wrk."""
    order = grpc_order(scenario, tokens.read_text().split())
    data = stack.work / f"grpc-{scenario.name}.json"
    data.write_text(json.dumps([check_request_json(token) for token in order]))
    protoset = grpc_protoset(stack.work)

    def ghz(duration: float) -> str:
        return run_ghz(
            ghz_binary(),
            system.url,
            protoset=protoset,
            call=GRPC_CALL,
            data=data,
            concurrency=args.connections,
            connections=GRPC_CONNECTIONS,
            duration=duration,
            prefix=prefix,
        )

    warm_statuses = warm_grpc(system, tokens.read_text().split()[: scenario.sessions])
    ghz(WARMUP_SECONDS)
    time.sleep(SETTLE_SECONDS)
    before = Counters.read(stack, system)
    out = ghz(args.duration)
    rss = sum(rss_mb(pid) for pid in system.pids)
    time.sleep(SETTLE_SECONDS)
    after = Counters.read(stack, system)
    figures = parse_ghz(out)
    counts = {"sent_valid": figures["sent"], "sent_invalid": 0, "statuses": {}}
    row = {"round": stack.round, "scenario": scenario.name, "system": system.name}
    row.update(summarise(figures, counts, before, after, kratos_is_system=False))
    row.update(rss_mb=rss, warm_statuses=warm_statuses, load="ghz", grpc_codes=figures["codes"])
    row["grpc_errors"] = figures["error_kinds"]
    return row


def summarise(
    figures: dict, counts: dict, before: Counters, after: Counters, kratos_is_system: bool
) -> dict:
    """One run's figures (the load generator's summary and, from wrk, what tokens.lua
    counted); per request means per request sent (see requests_sent)."""
    # Sent: wrk's completed requests plus the few (at most one per connection) still in
    # flight when it stopped, which the systems and Kratos worked on too.
    sent = (counts["sent_valid"] or 0) + (counts["sent_invalid"] or 0) or figures["requests"]
    calls = after.kratos_calls - before.kratos_calls
    cpu, kratos_cpu = after.cpu - before.cpu, after.kratos_cpu - before.kratos_cpu
    wrk_cpu, elapsed = after.wrk_cpu - before.wrk_cpu, after.at - before.at
    # Busy CPU that is neither the system, Kratos nor wrk: the kernel's loopback work that
    # no process is charged for, and anything else running on the machine (noise).
    ours = cpu + wrk_cpu + (0 if kratos_is_system else kratos_cpu)
    other = after.machine_cpu - before.machine_cpu - ours
    per_request = 1 / max(1, sent)
    return {
        "rps": figures["rps"],
        "p50_ms": figures["p50"],
        "p99_ms": figures["p99"],
        "requests": figures["requests"],
        "requests_sent": sent,
        "non_2xx": figures["errors"],
        "socket_errors": figures["socket_errors"],
        **counts,
        "kratos_calls": calls,
        "kratos_calls_per_1000": 1000 * calls * per_request,
        "cpu_s": cpu,
        "cpu_us_per_req": 1e6 * cpu * per_request,
        "kratos_cpu_s": kratos_cpu,
        "kratos_cpu_us_per_req": 1e6 * kratos_cpu * per_request,
        "wrk_cpu_share": wrk_cpu / elapsed,  # near 1: wrk was the limit, not the system
        "other_cpu_share": other / elapsed,  # of one CPU, over the counted window
    }


def run_round(stack: Stack, scenarios: list[Scenario], args, tokens: Path) -> list[dict]:
    """Each scenario in turn, every system once in it (interleaved), --repeat times over;
    with repeats each row says which one it is."""
    results = []
    for scenario in scenarios:
        for repeat in range(args.repeat):
            for name in stack.names:
                system = stack.systems.get(name)
                if system is None or scenario.name not in args.scenarios_of.get(name, SCENARIOS):
                    continue
                if system.grpc and scenario.name not in GRPC_SCENARIOS:
                    continue
                row = {"round": stack.round, "scenario": scenario.name, "system": name}
                if not system.alive():
                    row["error"] = "process exited"
                else:
                    try:
                        row = measure(stack, system, scenario, args, tokens, repeat)
                    except Exception as error:  # a system misbehaving must not stop the others
                        row["error"] = f"{type(error).__name__}: {error}"
                if args.repeat > 1:
                    row["repeat"] = repeat + 1
                print(progress_line(row), flush=True)
                results.append(row)
    return results


# ---------------------------------------------------------------- repeats

# The figures whose min-max is shown beside their median.
SPREAD = ("rps", "p99_ms", "cpu_us_per_req")
# bridge-base / bridge per repeat: the figures compared, as pairs measured moments apart.
PAIRED = ("rps", "cpu_us_per_req")


def median(values: list):
    """The lower middle for an even count: a figure some repeat measured (counts stay whole)."""
    return statistics.median_low(values)


def median_of(rows: list[dict]) -> dict:
    """One row of the medians of ROWS' figures, nested counts (statuses, ...) included, a count
    absent from a row being 0; text (round, scenario, ...) is the first row's."""
    merged = {}
    for key in dict.fromkeys(k for row in rows for k in row):
        values = [row.get(key, 0) for row in rows]
        if isinstance(values[0], dict):
            merged[key] = median_of(values)
        elif all(isinstance(value, (int, float)) for value in values):
            merged[key] = median(values)
        else:
            merged[key] = values[0]
    return merged


def medians(runs: list[dict]) -> list[dict]:
    """Per round, scenario and system, in the order first run: the median of its repeats
    that did not fail, with REPEATS (how many) and the min-max of SPREAD; when all failed,
    the first failure."""
    groups: dict[tuple, list[dict]] = {}
    for row in runs:
        groups.setdefault((row["round"], row["scenario"], row["system"]), []).append(row)
    out = []
    for rows in groups.values():
        measured = [
            {k: v for k, v in row.items() if k != "repeat"} for row in rows if "error" not in row
        ]
        if not measured:
            out.append({k: v for k, v in rows[0].items() if k != "repeat"})
            continue
        row = median_of(measured)
        row["repeats"] = len(measured)
        row["spread"] = {
            key: [min(r[key] for r in measured), max(r[key] for r in measured)] for key in SPREAD
        }
        out.append(row)
    return out


def paired_ratios(runs: list[dict]) -> list[dict]:
    """bridge-base / bridge per round and scenario: the median, over the repeats where both
    were measured, of each repeat's ratio of PAIRED (req/s above 1: the base tree serves more;
    CPU per request above 1: it costs more)."""
    pairs: dict[tuple, list[tuple[dict, dict]]] = {}
    for row in runs:
        if row["system"] != BASE or "error" in row:
            continue
        for other in runs:
            same = all(other[k] == row[k] for k in ("round", "scenario", "repeat"))
            if same and other["system"] == "bridge" and "error" not in other:
                pairs.setdefault((row["round"], row["scenario"]), []).append((row, other))
    out = []
    for (round_, scenario), both in pairs.items():
        entry = {"round": round_, "scenario": scenario, "repeats": len(both)}
        for key in PAIRED:
            per_repeat = [base[key] / bridge[key] for base, bridge in both if bridge[key]]
            entry[key] = median(per_repeat) if per_repeat else None
            entry[f"{key}_per_repeat"] = per_repeat
        out.append(entry)
    return out


# ---------------------------------------------------------------- derived figures


def find(results: list[dict], round_: str, scenario: str, system: str) -> dict | None:
    for row in results:
        key = (row["round"], row["scenario"], row["system"])
        if key == (round_, scenario, system) and "error" not in row:
            return row
    return None


def ratios(results: list[dict]) -> list[dict]:
    """bridge / peer for req/s (above 1: the bridge serves more) and p99 (below 1: faster);
    the default bridge is also compared with its fixed worker counts (bridge-1worker)."""
    out = []
    for row in results:
        if not row["system"].startswith("bridge") or "error" in row:
            continue
        peers = [*SYSTEMS[1:], *(BRIDGE_WORKERS if row["system"] == "bridge" else ())]
        for peer in peers:
            other = find(results, row["round"], row["scenario"], peer)
            if other:
                out.append(
                    {
                        "round": row["round"],
                        "scenario": row["scenario"],
                        "system": row["system"],
                        "peer": peer,
                        "rps": row["rps"] / other["rps"] if other["rps"] else None,
                        "p99": row["p99_ms"] / other["p99_ms"] if other["p99_ms"] else None,
                    }
                )
    return out


def invalid_summary(results: list[dict]) -> list[dict]:
    """invalid-10 against warm-1000: valid throughput kept, CPU per rejected token."""
    out = []
    for row in results:
        if row["scenario"] != "invalid-10" or "error" in row:
            continue
        answered = sum(row["statuses"].values()) or 1
        ok, rejected = row["statuses"].get("200", 0), row["statuses"].get("401", 0)
        summary = {
            "round": row["round"],
            "system": row["system"],
            "share_401": rejected / answered,
            "valid_rps": row["rps"] * ok / answered,
        }
        base = find(results, row["round"], "warm-1000", row["system"])
        if base and rejected:
            summary["valid_rps_vs_warm_1000"] = summary["valid_rps"] / base["rps"]
            own = (row["cpu_s"] - base["cpu_s"] / base["requests_sent"] * ok) / rejected
            total = row["cpu_s"] + row["kratos_cpu_s"]
            per_valid = (base["cpu_s"] + base["kratos_cpu_s"]) / base["requests_sent"]
            summary["cpu_us_per_rejected"] = 1e6 * own
            summary["cpu_us_per_rejected_with_kratos"] = 1e6 * (total - per_valid * ok) / rejected
            if row["system"] == "kratos":  # its own CPU is Kratos's: do not count it twice
                summary["cpu_us_per_rejected_with_kratos"] = summary["cpu_us_per_rejected"]
        out.append(summary)
    return out


# ---------------------------------------------------------------- output


def progress_line(row: dict) -> str:
    where = f"[{row['round']}] {row['scenario']:<11} {row['system']:<15}"
    if "repeat" in row:
        where += f" #{row['repeat']}"
    if "error" in row:
        return f"{where} ERROR {row['error']}"
    return (
        f"{where} {row['rps']:>8.0f} req/s  p99 {row['p99_ms']:.1f} ms  "
        f"non-2xx {row['non_2xx']}  kratos/1000 {row['kratos_calls_per_1000']:.1f}"
    )


def non_2xx_cell(row: dict) -> str:
    if row["scenario"] == "invalid-10":
        answered = sum(row["statuses"].values()) or 1
        return f"{100 * row['statuses'].get('401', 0) / answered:.1f}% 401"
    return str(row["non_2xx"] + row["socket_errors"])


def spread_cell(row: dict, key: str, form: str) -> str:
    """ROW's KEY in FORM, with its min-max over the repeats beside it when there were some."""
    cell = format(row[key], form)
    if "spread" in row:
        low, high = row["spread"][key]
        cell += f" ({low:{form}}\u2013{high:{form}})"
    return cell


def print_results(results: list[dict], rounds: dict[str, dict]) -> None:
    # The columns with a spread beside their median are wider when there is one.
    wide = any("spread" in row for row in results)
    rps_w, p99_w, cpu_w = (22, 22, 20) if wide else (9, 9, 12)
    header = (
        f"{'scenario':<12}{'system':<16}{'req/s':>{rps_w}}{'p50 ms':>9}{'p99 ms':>{p99_w}}"
        f"{'non-2xx':>11}{'kratos/1k':>11}{'CPU us/req':>{cpu_w}}{'kratos us/req':>15}"
        f"{'RSS MB':>9}{'wrk CPU':>9}{'other CPU':>11}"
    )
    for round_, placed in rounds.items():
        rows = [r for r in results if r["round"] == round_]
        if not rows:
            continue
        print(f"\n{round_}: {placed['placement']}")
        workers = [
            f"{name} {server['workers']}"
            for name, server in placed["servers"].items()
            if "workers" in server
        ]
        print("bridge workers (Granian processes): " + (", ".join(workers) or "-"))
        print(header)
        for row in rows:
            if "error" in row:
                print(f"{row['scenario']:<12}{row['system']:<16}  ERROR {row['error'][:90]}")
                continue
            kratos_us = "" if row["system"] == "kratos" else f"{row['kratos_cpu_us_per_req']:.0f}"
            print(
                f"{row['scenario']:<12}{row['system']:<16}{spread_cell(row, 'rps', '.0f'):>{rps_w}}"
                f"{row['p50_ms']:>9.2f}{spread_cell(row, 'p99_ms', '.2f'):>{p99_w}}"
                f"{non_2xx_cell(row):>11}{row['kratos_calls_per_1000']:>11.1f}"
                f"{spread_cell(row, 'cpu_us_per_req', '.0f'):>{cpu_w}}"
                f"{kratos_us:>15}{row['rss_mb']:>9.0f}{100 * row['wrk_cpu_share']:>8.0f}%"
                f"{100 * row['other_cpu_share']:>10.0f}%"
            )


def print_ratios(table: list[dict]) -> None:
    if not table:
        return
    print("\nbridge / peer (req/s: above 1 = bridge serves more; p99: below 1 = bridge faster)")
    print(f"{'round':<16}{'scenario':<12}{'bridge':<16}{'peer':<16}{'req/s':>8}{'p99':>8}")
    for row in table:
        rps = f"{row['rps']:.2f}" if row["rps"] else "-"
        p99 = f"{row['p99']:.2f}" if row["p99"] else "-"
        print(
            f"{row['round']:<16}{row['scenario']:<12}{row['system']:<16}{row['peer']:<16}"
            f"{rps:>8}{p99:>8}"
        )


def print_paired(table: list[dict]) -> None:
    if not table:
        return
    print(
        f"\n{BASE} / bridge, median of the per-repeat ratios "
        "(req/s above 1: base serves more; CPU/req above 1: base costs more)"
    )
    print(f"{'round':<16}{'scenario':<12}{'repeats':>8}{'req/s':>8}{'CPU/req':>9}")
    for row in table:
        rps = f"{row['rps']:.3f}" if row["rps"] else "-"
        cpu = f"{row['cpu_us_per_req']:.3f}" if row["cpu_us_per_req"] else "-"
        print(f"{row['round']:<16}{row['scenario']:<12}{row['repeats']:>8}{rps:>8}{cpu:>9}")


def print_invalid(table: list[dict]) -> None:
    if not table:
        return
    print("\ninvalid-10: valid-only throughput and CPU per rejected token (method: --help)")
    print(
        f"{'round':<16}{'system':<16}{'401 share':>10}{'valid req/s':>13}{'of warm-1000':>14}"
        f"{'CPU us/rejected':>17}{'with Kratos':>13}"
    )
    for row in table:
        kept = row.get("valid_rps_vs_warm_1000")
        own = row.get("cpu_us_per_rejected")
        total = row.get("cpu_us_per_rejected_with_kratos")
        print(
            f"{row['round']:<16}{row['system']:<16}{100 * row['share_401']:>9.1f}%"
            f"{row['valid_rps']:>13.0f}"
            f"{(f'{100 * kept:.0f}%' if kept else '-'):>14}"
            f"{(f'{own:.0f}' if own is not None else '-'):>17}"
            f"{(f'{total:.0f}' if total is not None else '-'):>13}"
        )


def draw_chart(pyplot, results: list[dict], path: Path, title: str) -> None:
    """Grouped bars: req/s per scenario and system above, p99 below; with repeats, the
    medians, with whiskers from the lowest to the highest repeat."""
    rows = [r for r in results if "error" not in r]
    groups = list(dict.fromkeys((r["round"], r["scenario"]) for r in rows))
    systems = [s for s in ALL_SYSTEMS if any(r["system"] == s for r in rows)]
    labels = [f"{scenario}\n({round_})" for round_, scenario in groups]
    figure, (top, bottom) = pyplot.subplots(2, 1, figsize=(11, 8), sharex=True)
    width = 0.8 / max(1, len(systems))
    for i, system in enumerate(systems):
        positions: list[float] = []
        bars: dict[str, list[float]] = {"rps": [], "p99_ms": []}
        whiskers: dict[str, list[list[float]]] = {"rps": [[], []], "p99_ms": [[], []]}
        for g, (round_, scenario) in enumerate(groups):
            row = find(rows, round_, scenario, system)
            if row:
                positions.append(g + (i - (len(systems) - 1) / 2) * width)
                for key in bars:
                    low, high = row.get("spread", {}).get(key, (row[key], row[key]))
                    bars[key].append(row[key])
                    whiskers[key][0].append(row[key] - low)
                    whiskers[key][1].append(high - row[key])
        for axes, key in ((top, "rps"), (bottom, "p99_ms")):
            spread = whiskers[key] if any("spread" in row for row in rows) else None
            axes.bar(positions, bars[key], width, label=system, yerr=spread, capsize=2)
    top.set_ylabel("requests/s (higher is better)")
    bottom.set_ylabel("p99 latency, ms (lower is better)")
    bottom.set_xticks(range(len(groups)), labels)
    top.legend()
    top.set_title(title)
    for axes in (top, bottom):
        axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def meta(args, rounds: dict) -> dict:
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "bridge_commit": commit,
        "versions": {"kratos": KRATOS_VERSION, **PEER_VERSIONS, "ghz": GHZ_VERSION},
        "wrk": f"wrk -t1 -c{args.connections} -d{args.duration:g}s --latency",
        "duration_s": args.duration,
        "connections": args.connections,
        "warmup_s": WARMUP_SECONDS,
        "zipf_s": ZIPF_S,
        "session_lifespan": SESSION_LIFESPAN,
        **({"repeat": args.repeat} if args.repeat > 1 else {}),
        "bridge_settings": "Redis store, BRIDGE_REVALIDATE_AFTER=5, BRIDGE_WORKERS unset",
        "rounds": rounds,
    }


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n\n", 3)[3],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--duration", type=float, default=10, help="seconds per run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument(
        "--rounds", default="cpu-limit,started-pinned", help=f"of {', '.join(ROUNDS)}"
    )
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument(
        "--systems", help=f"default: {', '.join(DEFAULT_SYSTEMS)} (bridge-1worker in warm-1000)"
    )
    parser.add_argument(
        "--base-tree",
        type=Path,
        help=f"another checkout of this repository: adds {BASE}, the bridge run from it",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="measure each scenario's systems N times, interleaved; report medians",
    )
    parser.add_argument("--sessions-cache", type=Path, default=CACHE / "bench")
    parser.add_argument("--out", type=Path, help="JSON results (default: in the cache)")
    parser.add_argument("--chart", type=Path, help="PNG chart (default: beside the JSON)")
    args = parser.parse_args()
    args.rounds = [r for r in args.rounds.split(",") if r]
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    if args.repeat < 1:
        parser.error(f"--repeat {args.repeat}: at least 1")
    for name in args.rounds:
        if name not in ROUNDS:
            parser.error(f"unknown round {name!r}: choose from {', '.join(ROUNDS)}")
    for name in args.scenarios:
        if name not in SCENARIOS:
            parser.error(f"unknown scenario {name!r}: choose from {', '.join(SCENARIOS)}")
    # Each system's scenarios: every one asked for, but a default system's own list.
    if args.systems is None:
        args.scenarios_of = {
            name: only & set(args.scenarios)
            for name, only in DEFAULT_SYSTEMS.items()
            if only is not None
        }
        args.systems = [n for n in DEFAULT_SYSTEMS if args.scenarios_of.get(n, True)]
    else:
        args.systems = [s for s in args.systems.split(",") if s]
        args.scenarios_of = {}
    if args.base_tree is not None:
        if not (args.base_tree / "bridge" / "__main__.py").is_file():
            parser.error(f"--base-tree {args.base_tree}: no bridge/__main__.py there")
        args.base_tree = args.base_tree.resolve()
        if BASE not in args.systems:
            args.systems.insert(
                args.systems.index("bridge") + 1 if "bridge" in args.systems else 0, BASE
            )
    elif BASE in args.systems:
        parser.error(f"{BASE} needs --base-tree")
    for name in args.systems:
        if name not in ALL_SYSTEMS:
            parser.error(f"unknown system {name!r}: choose from {', '.join(ALL_SYSTEMS)}")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out = args.out or CACHE / "bench" / "results" / f"peers-{stamp}.json"
    args.chart = args.chart or args.out.with_suffix(".png")
    return args


def run_stack(stack: Stack, scenarios: list[Scenario], args, tokens: Path) -> list[dict]:
    try:
        print(f"round {stack.round}: {stack.describe()}", flush=True)
        stack.start()
        for name, server in stack.servers.items():
            print(f"  {stack.round:<14} {name:<15} {server}", flush=True)
        results = run_round(stack, scenarios, args, tokens)
        for name, why in stack.failures.items():
            results.append({"round": stack.round, "scenario": "*", "system": name, "error": why})
        return results
    finally:
        stack.stop()


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops them all
    ensure_wrk()
    pyplot = load_pyplot()
    ensure_kratos()
    for name in ("heimdall", "oathkeeper"):
        if name in args.systems:
            peer_binary(name)
    if GRPC in args.systems:
        ghz_binary()
    scenarios = [SCENARIOS[name] for name in args.scenarios]
    needed = max(s.sessions for s in scenarios)
    work = Path(tempfile.mkdtemp(prefix="peers-bench-"))
    quota = CpuQuota.find() if "cpu-limit" in args.rounds else None
    results: list[dict] = []
    rounds: dict[str, dict] = {}
    try:
        db, tokens = prepare_sessions(args.sessions_cache, needed, work)
        for round_ in args.rounds:
            stack = Stack(work, db, args.systems, round_, quota=quota, base_tree=args.base_tree)
            results += run_stack(stack, scenarios, args, tokens)
            rounds[round_] = {"placement": stack.describe(), "servers": stack.servers}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(args, results, rounds, pyplot)


def report(args, runs: list[dict], rounds: dict, pyplot) -> None:
    """Print and write RUNS' figures; with repeats, every figure is the median of its repeats
    (the raw runs are kept in the JSON) and bridge-base / bridge is paired per repeat."""
    results = medians(runs) if args.repeat > 1 else runs
    ratio_table, invalid_table = ratios(results), invalid_summary(results)
    paired_table = paired_ratios(runs) if args.repeat > 1 else []
    print(
        f"\n{os.cpu_count()} CPUs; wrk -t1 -c{args.connections} -d{args.duration:g}s per run, "
        f"{WARMUP_SECONDS}s warm-up; Kratos {KRATOS_VERSION}, heimdall "
        f"{PEER_VERSIONS['heimdall']}, Oathkeeper {PEER_VERSIONS['oathkeeper']}"
        + (f"; median (min\u2013max) of {args.repeat} repeats" if args.repeat > 1 else "")
    )
    print_results(results, rounds)
    print_ratios(ratio_table)
    print_paired(paired_table)
    print_invalid(invalid_table)
    document = {
        "meta": meta(args, rounds),
        "results": results,
        "ratios": ratio_table,
        "invalid_10": invalid_table,
    }
    if args.repeat > 1:
        document.update(runs=runs, base_ratios=paired_table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nJSON:  {args.out}")
    if pyplot is not None:
        title = (
            f"bridge vs heimdall vs Oathkeeper vs Kratos whoami "
            f"(wrk -t1 -c{args.connections} -d{args.duration:g}s; servers on CPU 0, wrk on CPU 1, "
            "except unpinned)"
        )
        draw_chart(pyplot, results, args.chart, title)
        print(f"chart: {args.chart}")


if __name__ == "__main__":
    main()
