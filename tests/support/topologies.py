"""Real Redis topologies for the tests: one server, a master and its replica watched by
three Sentinels, and a six-node Cluster, each made of plain ``redis-server`` processes on
free ports under a work directory, over TLS when given ``TlsFiles``.

A topology can lose its master (``SIGKILL``, as in a crash) and get it back; each method
returns only once Redis itself agrees on the new shape, so the next step of a test starts
from a settled state. Every process started here is killed when the interpreter exits,
whatever the tests did."""

from __future__ import annotations

import atexit
import itertools
import shutil
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar
from urllib.parse import quote

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.sentinel import Sentinel

from tests.support.harness import free_port, stop_process, wait_until

HOST = "127.0.0.1"
SETUP_TIMEOUT_S = 20
# A restarted server reloads its append-only file and takes a full sync (disk work), and
# each Sentinel must then see it in sync, from a replica INFO it asks for every 10 s:
# about 1 s on an idle machine, but past 20 s once in a full run with the disk busy.
SENTINEL_SETTLE_TIMEOUT_S = 45
CLUSTER_SLOTS = 16384
# How long a server may stay silent before its Sentinels or its cluster judge it failed
# and promote its replica (``failure_after_ms``). A set that nobody fails over waits long:
# a 2.5 s stall of a busy machine's Redis promoted the replica of a cluster given 1 s, and
# a write its old master took in the meantime was lost. A test that kills or pauses a
# master asks for fast detection, and builds a set of its own.
STEADY_FAILURE_AFTER_MS = 60_000
FAST_FAILURE_AFTER_MS = 1000

Address = tuple[str, int]

_started: list[subprocess.Popen] = []
_ports_handed_out: set[int] = set()
_ports_lock = threading.Lock()  # topologies may start in several threads at once


@atexit.register
def _kill_what_is_left() -> None:
    for process in _started:
        if process.poll() is None:
            process.kill()
            process.wait()


def _fresh_port() -> int:
    """A free port not handed out before by this process: the kernel may offer a port
    again once its probe socket is closed, before the server meant for it binds it."""
    with _ports_lock:
        while (port := free_port()) in _ports_handed_out:
            pass
        _ports_handed_out.add(port)
        return port


def _text(address: Address) -> str:
    return f"{address[0]}:{address[1]}"


def _new_folder(workdir: Path, kind: str) -> Path:
    for n in itertools.count(1):
        folder = workdir / f"{kind}-{n}"
        try:
            folder.mkdir(parents=True)
        except FileExistsError:
            continue
        return folder
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway CA, a server certificate for 127.0.0.1 and localhost (which servers
    also show as clients: to their master, to each other) and a client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def server_args(self) -> list[str]:
        # A client may show a certificate but need not: the URLs name only the CA.
        return [
            "--tls-cert-file", str(self.server_cert),
            "--tls-key-file", str(self.server_key),
            "--tls-ca-cert-file", str(self.ca),
            "--tls-auth-clients", "optional",
        ]  # fmt: skip

    def client_kwargs(self, with_client_cert: bool = False) -> dict[str, Any]:
        """redis-py's keyword arguments for a TLS connection to these servers."""
        kwargs: dict[str, Any] = {"ssl": True, "ssl_ca_certs": str(self.ca)}
        if with_client_cert:
            kwargs.update(ssl_certfile=str(self.client_cert), ssl_keyfile=str(self.client_key))
        return kwargs

    def url_query(self) -> str:
        return "?ssl_ca_certs=" + quote(str(self.ca), safe="/")


_SERVER_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
"""
_CLIENT_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
"""


def tls_files(workdir: Path) -> TlsFiles:
    """The certificates under ``workdir/tls``, made with ``openssl`` the first time."""
    folder = workdir / "tls"
    files = TlsFiles(
        ca=folder / "ca.pem",
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
        client_cert=folder / "client.pem",
        client_key=folder / "client.key",
    )
    if files.client_key.exists():
        return files
    folder.mkdir(parents=True, exist_ok=True)
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    openssl(
        "req", "-x509", *new_key, "-days", "2", "-subj", "/CN=kratos-session-bridge test CA",
        "-addext", "keyUsage = critical, keyCertSign, cRLSign",
        "-keyout", "ca.key", "-out", "ca.pem",
    )  # fmt: skip
    for name, subject, extensions in (
        ("server", "/CN=127.0.0.1", _SERVER_EXTENSIONS),
        ("client", "/CN=kratos-session-bridge test client", _CLIENT_EXTENSIONS),
    ):
        (folder / f"{name}.ext").write_text(extensions)
        openssl("req", "-new", *new_key, "-subj", subject,
                "-keyout", f"{name}.key", "-out", f"{name}.csr")  # fmt: skip
        openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem",
        )  # fmt: skip
    return files


class RedisProcess:
    """One ``redis-server`` in its own directory, on one port; killed, it can be started
    again with the same port, directory and arguments, so with its data. ``password`` is
    the one its clients here log in with, if it asks for one."""

    def __init__(
        self,
        folder: Path,
        port: int,
        args: list[str],
        tls: TlsFiles | None,
        password: str | None = None,
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed; run the README test command")
        self.command = [binary, *args, "--logfile", str(folder / "redis.log")]
        self.folder = folder
        self.port = port
        self.tls = tls
        self.password = password
        self.process: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def address(self) -> Address:
        return (HOST, self.port)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, extra_args: Sequence[str] = ()) -> None:
        """Start it and wait until it answers ``PING``."""
        self.process = subprocess.Popen(
            [*self.command, *extra_args],
            cwd=self.folder,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _started.append(self.process)
        deadline = time.monotonic() + SETUP_TIMEOUT_S
        with self.client() as client:
            while True:
                if self.process.poll() is not None:
                    log = (self.folder / "redis.log").read_text(errors="replace")
                    raise RuntimeError(f"redis-server on port {self.port} exited:\n{log[-2000:]}")
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    if time.monotonic() > deadline:
                        raise
                time.sleep(0.02)

    def client(self) -> redis.Redis:
        tls = self.tls.client_kwargs() if self.tls else {}
        return redis.Redis(
            HOST,
            self.port,
            password=self.password,
            socket_timeout=2,
            decode_responses=True,
            **tls,
        )

    def info(self, section: str) -> dict[str, Any]:
        with self.client() as client:
            return client.info(section)

    def kill(self) -> None:
        """``SIGKILL``: no goodbye to replicas, Sentinels or the cluster."""
        if self.process is not None:
            stop_process(self.process, signal.SIGKILL)

    def pause(self) -> None:
        """``SIGSTOP``: connections stay open but nothing answers, as on a hung host."""
        if self.running:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.running:
            self.process.send_signal(signal.SIGCONT)


def _fails_over_fast(topology: SentinelSet | ClusterSet) -> None:
    """A killed master is replaced only after ``failure_after_ms``: a steady set would
    keep a test waiting for a minute, then fail it on a timeout that names no cause."""
    if topology.failure_after_ms > FAST_FAILURE_AFTER_MS:
        raise RuntimeError(
            f"this {topology.kind} set was built steady (failure_after_ms="
            f"{topology.failure_after_ms}): build it with FAST_FAILURE_AFTER_MS to fail it over"
        )


def _stop_all(nodes: Sequence[RedisProcess]) -> None:
    """``SIGTERM`` to all at once, then wait for each (killing any that lingers)."""
    for node in nodes:
        if node.running:
            node.process.terminate()
    for node in nodes:
        if node.process is not None:
            stop_process(node.process)


def _server_args(
    folder: Path, port: int, appendonly: bool, tls: TlsFiles | None, extra: Sequence[str] = ()
) -> list[str]:
    """A data node: no snapshots, the append-only file if asked for."""
    listen = ["--port", "0", "--tls-port", str(port)] if tls else ["--port", str(port)]
    return [
        *listen,
        *([*tls.server_args(), "--tls-replication", "yes"] if tls else []),
        "--bind", HOST,
        "--dir", str(folder),
        "--save", "",
        "--appendonly", "yes" if appendonly else "no",
        # A replica's first sync starts at once, not after the default 5 s wait for
        # more replicas to share one diskless transfer.
        "--repl-diskless-sync-delay", "0",
        # Stopping does not wait up to 10 s for lagging replicas: the data is thrown away.
        "--shutdown-on-sigterm", "now",
        *extra,
    ]  # fmt: skip


class Standalone:
    """One server."""

    kind = "standalone"

    def __init__(
        self, workdir: Path, *, appendonly: bool = False, tls: TlsFiles | None = None
    ) -> None:
        self.tls = tls
        folder, port = _new_folder(workdir, "standalone"), _fresh_port()
        self.node = RedisProcess(folder, port, _server_args(folder, port, appendonly, tls), tls)
        self.node.start()

    @property
    def url(self) -> str:
        if self.tls:
            return f"rediss://{HOST}:{self.node.port}/0{self.tls.url_query()}"
        return f"redis://{HOST}:{self.node.port}/0"

    def client(self) -> redis.Redis:
        return self.node.client()

    def stop(self) -> None:
        _stop_all([self.node])


class SentinelSet:
    """A master, one replica and three Sentinels watching them, quorum two; the servers
    ask for ``password`` and the Sentinels for ``sentinel_password``, if given.

    The Sentinels start only once the replica is in sync: they learn of replicas from
    the master's ``INFO``, which they ask for on connecting and then only every 10 s."""

    kind = "sentinel"
    FAILOVER_TIMEOUT_MS = 4000

    def __init__(
        self,
        workdir: Path,
        *,
        appendonly: bool = False,
        tls: TlsFiles | None = None,
        service: str = "bridge",
        password: str | None = None,
        sentinel_password: str | None = None,
        failure_after_ms: int = STEADY_FAILURE_AFTER_MS,
    ) -> None:
        self.tls = tls
        self.service = service
        self.failure_after_ms = failure_after_ms
        self.password = password
        self.sentinel_password = sentinel_password
        self.folder = _new_folder(workdir, "sentinel")
        self.servers: dict[Address, RedisProcess] = {}
        self.sentinels: list[RedisProcess] = []
        try:
            master = self._server("server-1", appendonly)
            master.start()
            replica = self._server("server-2", appendonly)
            replica.start(_replicaof(master.address))
            wait_until(lambda: _in_sync(replica), SETUP_TIMEOUT_S, "the replica's first sync")
            self.sentinels = [self._sentinel(f"sentinel-{n}", master.address) for n in (1, 2, 3)]
            for sentinel in self.sentinels:
                sentinel.start()
            wait_until(self._settled, SETUP_TIMEOUT_S, "the Sentinels to know it all")
        except BaseException:
            self.stop()
            raise

    def _server(self, name: str, appendonly: bool) -> RedisProcess:
        folder, port = self.folder / name, _fresh_port()
        auth = ["--requirepass", self.password, "--masterauth", self.password]
        args = _server_args(folder, port, appendonly, self.tls, auth if self.password else [])
        server = RedisProcess(folder, port, args, self.tls, self.password)
        self.servers[(HOST, port)] = server
        return server

    def _sentinel(self, name: str, master: Address) -> RedisProcess:
        folder, port = self.folder / name, _fresh_port()
        folder.mkdir(parents=True)
        s = self.service
        lines = [
            f"bind {HOST}",
            f"dir {folder}",
            f"sentinel monitor {s} {master[0]} {master[1]} 2",
            f"sentinel down-after-milliseconds {s} {self.failure_after_ms}",
            f"sentinel failover-timeout {s} {self.FAILOVER_TIMEOUT_MS}",
            f"sentinel parallel-syncs {s} 1",
        ]
        if self.password:
            lines.append(f"sentinel auth-pass {s} {self.password}")
        if self.sentinel_password:
            # Sentinels log in to each other with their own requirepass.
            lines.append(f"requirepass {self.sentinel_password}")
        if self.tls:
            # tls-replication: TLS towards the servers and the other Sentinels too, to
            # which a Sentinel then announces its tls-port.
            args = iter([*self.tls.server_args(), "--tls-replication", "yes"])
            lines += ["port 0", f"tls-port {port}"]
            lines += [f"{option.removeprefix('--')} {value}" for option, value in zip(args, args)]
        else:
            lines.append(f"port {port}")
        config = folder / "sentinel.conf"  # a Sentinel rewrites its file: one each
        config.write_text("\n".join(lines) + "\n")
        args = [str(config), "--sentinel"]
        return RedisProcess(folder, port, args, self.tls, self.sentinel_password)

    def _settled(self) -> bool:
        """Each running Sentinel names the same master, sees every other running server
        as its replica in sync, and knows the other Sentinels: any of them could lead
        the next failover."""
        master = self.master_address()
        replicas = {a for a, server in self.servers.items() if server.running and a != master}
        for sentinel in self.sentinels:
            if not sentinel.running:
                continue
            with sentinel.client() as client:
                state = client.sentinel_master(self.service)
                seen = client.sentinel_slaves(self.service)
                others = client.sentinel_sentinels(self.service)
            if (state["ip"], int(state["port"])) != master:
                return False
            healthy = {
                (r["ip"], int(r["port"]))
                for r in seen
                if (r["master-host"], int(r["master-port"])) == master
                and r["master-link-status"] == "ok"
                and not (r["is_sdown"] or r["is_disconnected"])
            }
            if not replicas <= healthy:
                return False
            if sum(not o["is_sdown"] for o in others) < len(self.sentinels) - 1:
                return False
        return True

    @property
    def url(self) -> str:
        hosts = ",".join(_text(s.address) for s in self.sentinels)
        if self.password:
            hosts = f":{quote(self.password, safe='')}@{hosts}"
        if self.tls:
            return f"rediss+sentinel://{hosts}/{self.service}/0{self.tls.url_query()}"
        return f"redis+sentinel://{hosts}/{self.service}/0"

    def sentinel_client(self) -> Sentinel:
        """redis-py's Sentinel client, over TLS to Sentinels and servers alike."""
        tls = self.tls.client_kwargs() if self.tls else {}
        return Sentinel(
            [s.address for s in self.sentinels],
            sentinel_kwargs={"socket_timeout": 1, "password": self.sentinel_password, **tls},
            socket_timeout=2,
            password=self.password,
            **tls,
        )

    def client(self) -> redis.Redis:
        """The master's client, found (and found again after a failover) by Sentinel."""
        return self.sentinel_client().master_for(self.service, decode_responses=True)

    def master_address(self) -> Address:
        """The master as the first running Sentinel names it."""
        sentinel = next(s for s in self.sentinels if s.running)
        with sentinel.client() as client:
            host, port = client.sentinel_get_master_addr_by_name(self.service)
        return (host, int(port))

    def replica_addresses(self) -> list[Address]:
        master = self.master_address()
        return [a for a, server in self.servers.items() if server.running and a != master]

    def kill_master(self) -> Address:
        _fails_over_fast(self)
        master = self.master_address()
        self.servers[master].kill()
        return master

    def wait_for_new_master(self, old: Address, timeout: float = 15.0) -> Address:
        """Until every running Sentinel names one master other than ``old``, and that
        server says it is the master; returns it."""
        found: list[Address] = []

        def promoted() -> bool:
            named = set()
            for sentinel in self.sentinels:
                if sentinel.running:
                    with sentinel.client() as client:
                        host, port = client.sentinel_get_master_addr_by_name(self.service)
                    named.add((host, int(port)))
            if len(named) != 1 or old in named:
                return False
            found[:] = named
            return self.servers[found[0]].info("replication")["role"] == "master"

        wait_until(promoted, timeout, f"a master other than {_text(old)}")
        return found[0]

    def restart(self, address: Address) -> None:
        """Start a killed server again in its directory. A server that is no longer the
        master comes back as a replica of the one that is, as it would had the Sentinels
        rewritten its config file; returns once it is in sync and the Sentinels see it."""
        server = self.servers[address]
        master = self.master_address()
        server.start(_replicaof(master) if master != address else [])
        if master != address:
            wait_until(lambda: _in_sync(server), SETUP_TIMEOUT_S, "the restarted replica's sync")
        wait_until(
            self._settled, SENTINEL_SETTLE_TIMEOUT_S, "the Sentinels to see the restarted server"
        )

    def stop(self) -> None:
        _stop_all([*self.sentinels, *self.servers.values()])


def _replicaof(master: Address) -> list[str]:
    return ["--replicaof", master[0], str(master[1])]


def _in_sync(replica: RedisProcess) -> bool:
    return replica.info("replication").get("master_link_status") == "up"


@dataclass(frozen=True)
class NodeView:
    """One line of ``CLUSTER NODES``: how a node sees another node, or itself."""

    node_id: str
    address: Address
    flags: frozenset[str]
    master_id: str | None
    slots: tuple[tuple[int, int], ...]

    @property
    def serves_slots(self) -> bool:
        return "master" in self.flags and bool(self.slots)

    @property
    def failing(self) -> bool:
        return bool({"fail", "fail?", "handshake", "noaddr"} & self.flags)


def _cluster_nodes(text: str) -> list[NodeView]:
    views = []
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        host, _, port = fields[1].partition("@")[0].rpartition(":")
        slots = []
        for item in fields[8:]:
            if not item.startswith("["):  # "[slot->-node]": a slot on the move
                first, _, last = item.partition("-")
                slots.append((int(first), int(last or first)))
        views.append(
            NodeView(
                node_id=fields[0],
                address=(host or HOST, int(port)),
                flags=frozenset(fields[2].split(",")),
                master_id=None if fields[3] == "-" else fields[3],
                slots=tuple(slots),
            )
        )
    return views


class ClusterSet:
    """Six nodes: three masters sharing the 16384 slots, a replica of each.

    Each node's cluster bus gets a free port of its own (``cluster-port``) instead of
    the default port + 10000, which may be taken, or above 65535 for a port from the
    ephemeral range."""

    kind = "cluster"
    NODES = 6

    def __init__(
        self,
        workdir: Path,
        *,
        appendonly: bool = False,
        tls: TlsFiles | None = None,
        failure_after_ms: int = STEADY_FAILURE_AFTER_MS,
    ) -> None:
        self.tls = tls
        self.failure_after_ms = failure_after_ms
        self.folder = _new_folder(workdir, "cluster")
        self.nodes: dict[Address, RedisProcess] = {}
        try:
            for n in range(1, self.NODES + 1):
                node = self._node(f"node-{n}", appendonly)
                self.nodes[node.address] = node
                node.start()
            self._create()
            wait_until(self._fully_formed, SETUP_TIMEOUT_S, "the cluster to form")
        except BaseException:
            self.stop()
            raise

    def _node(self, name: str, appendonly: bool) -> RedisProcess:
        folder, port = self.folder / name, _fresh_port()
        cluster = [
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",  # in the node's own --dir
            "--cluster-port", str(_fresh_port()),
            "--cluster-node-timeout", str(self.failure_after_ms),
            # A replica takes over however long ago it last heard from its master: a
            # test may kill a master that sat idle.
            "--cluster-replica-validity-factor", "0",
            *(["--tls-cluster", "yes"] if self.tls else []),
        ]  # fmt: skip
        args = _server_args(folder, port, appendonly, self.tls, cluster)
        return RedisProcess(folder, port, args, self.tls)

    def _create(self) -> None:
        command = [
            "redis-cli",
            *(["--tls", "--cacert", str(self.tls.ca)] if self.tls else []),
            "--cluster", "create", *(_text(a) for a in self.nodes),
            "--cluster-replicas", "1",
            "--cluster-yes",
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=SETUP_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{done.stdout}{done.stderr}")

    @property
    def url(self) -> str:
        hosts = ",".join(_text(a) for a in self.nodes)
        if self.tls:
            return f"rediss+cluster://{hosts}{self.tls.url_query()}"
        return f"redis+cluster://{hosts}"

    def client(self) -> RedisCluster:
        tls = self.tls.client_kwargs() if self.tls else {}
        return RedisCluster(
            startup_nodes=[ClusterNode(*a) for a in self.nodes],
            socket_timeout=2,
            decode_responses=True,
            **tls,
        )

    def view(self, address: Address | None = None) -> list[NodeView]:
        """The cluster as the node at ``address`` (or the first running one) sees it."""
        address = address or next(a for a, node in self.nodes.items() if node.running)
        with self.nodes[address].client() as client:
            return _cluster_nodes(client.execute_command("CLUSTER", "NODES"))

    def masters(self) -> list[Address]:
        return [v.address for v in self.view() if v.serves_slots]

    def master_for_key(self, key: str | bytes) -> Address:
        slot = key_slot(key.encode() if isinstance(key, str) else key)
        for view in self.view():
            if view.serves_slots and any(first <= slot <= last for first, last in view.slots):
                return view.address
        raise LookupError(f"no master serves slot {slot}")

    def replica_of(self, master: Address) -> Address:
        views = self.view()
        [master_id] = [v.node_id for v in views if v.address == master]
        for view in views:
            if view.master_id == master_id and not view.failing:
                return view.address
        raise LookupError(f"{_text(master)} has no replica")

    def failover(self, replica: Address, timeout: float = 15.0) -> None:
        """``CLUSTER FAILOVER`` on ``replica``: its master hands over without losing a
        write. Returns once ``replica`` is the master and the whole cluster agrees."""
        _fails_over_fast(self)  # a steady set retries a lost election only minutes later
        with self.nodes[replica].client() as client:
            client.execute_command("CLUSTER", "FAILOVER")
        wait_until(
            lambda: self.nodes[replica].info("replication")["role"] == "master",
            timeout,
            f"{_text(replica)} to take over",
        )
        self.wait_ok(timeout)

    def kill_master_for_key(self, key: str | bytes) -> Address:
        _fails_over_fast(self)
        master = self.master_for_key(key)
        self.nodes[master].kill()
        return master

    def wait_ok(self, timeout: float = 15.0) -> None:
        """Until the cluster is whole again without the nodes that are down: right after
        a kill, that is once a replica has taken over."""
        wait_until(self._settled, timeout, "the cluster to settle")

    def _settled(self) -> bool:
        """Every running node says ``cluster_state:ok`` and sees the same shape: all
        slots on running masters, every other running node a replica in sync."""
        running = {a for a, node in self.nodes.items() if node.running}
        shapes = set()
        for address in running:
            with self.nodes[address].client() as client:
                if "cluster_state:ok" not in client.execute_command("CLUSTER", "INFO").split():
                    return False
            views = [v for v in self.view(address) if v.address in running]
            if len(views) != len(running) or any(v.failing for v in views):
                return False
            ids = {v.node_id: v.address for v in views}
            shapes.add(frozenset((v.address, ids.get(v.master_id), v.slots) for v in views))
        if len(shapes) != 1:
            return False
        [shape] = shapes
        if sum(last - first + 1 for *_, slots in shape for first, last in slots) != CLUSTER_SLOTS:
            return False
        masters = {address for address, master, slots in shape if master is None and slots}
        replicas = [(address, master) for address, master, _ in shape if address not in masters]
        return all(
            master in masters and _in_sync(self.nodes[address]) for address, master in replicas
        )

    def _fully_formed(self) -> bool:
        if not self._settled():
            return False
        views = self.view()
        masters = {v.node_id for v in views if v.serves_slots}
        return (
            len(views) == self.NODES
            and len(masters) == self.NODES // 2
            and masters == {v.master_id for v in views if v.master_id}
        )

    def restart(self, address: Address, timeout: float = 15.0) -> None:
        """Start a killed node again with its directory and ``nodes.conf``: a master
        whose slots moved meanwhile comes back as a replica of the node that took them.
        Returns once the cluster is whole."""
        self.nodes[address].start()
        self.wait_ok(timeout)

    def stop(self) -> None:
        _stop_all(list(self.nodes.values()))


class _Topology(Protocol):
    def stop(self) -> None: ...


T = TypeVar("T", bound=_Topology)


class StartedAhead(Generic[T]):
    """``count`` topologies from ``make``, started at once in background threads and
    handed out one per ``take()`` to tests that each need one of their own (to kill or
    pause it): their seconds of setup overlap instead of adding up."""

    def __init__(self, make: Callable[[], T], count: int) -> None:
        self._make = make
        self._executor = ThreadPoolExecutor(max_workers=max(count, 1))
        self._starting: deque[Future[T]] = deque(self._executor.submit(make) for _ in range(count))

    @contextmanager
    def take(self) -> Iterator[T]:
        """One started ahead (or a new one, once all are taken), stopped after use."""
        topology = self._starting.popleft().result() if self._starting else self._make()
        try:
            yield topology
        finally:
            topology.stop()

    def close(self) -> None:
        """Stop those never taken; one that failed to start has stopped itself."""
        while self._starting:
            future = self._starting.popleft()
            if future.exception() is None:
                future.result().stop()
        self._executor.shutdown()
