"""``redis_target``: one client per topology, each following its failovers, every failure a
``redis.RedisError``. Sentinel and Cluster run as real processes (a few seconds each)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from bridge.store.connect import RedisTarget, redis_target
from tests.harness import RedisServer, free_port, stop_process, wait_until

SENTINEL_PASSWORD = "sentinel-secret"
DATA_PASSWORD = "data-secret"


def _redis(directory: Path, port: int, *args: str) -> subprocess.Popen:
    directory.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [
            shutil.which("redis-server") or "redis-server",
            *("--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory)),
            *("--save", "", "--appendonly", "no", "--repl-diskless-sync-delay", "0", *args),
        ],
        stdout=subprocess.DEVNULL,
    )


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    while True:
        port = free_port()
        if port <= 55535 and _is_free(port + 10000):
            return port


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _follows(target: RedisTarget, key: str, within: float) -> float:
    """Seconds until a write through ``target`` works again (failing the test after
    ``within``); no single attempt may wait longer than 2 s."""
    started = time.monotonic()
    while True:
        attempt = time.monotonic()
        try:
            target.client.set(key, "after")
            return time.monotonic() - started
        except redis.RedisError:
            assert time.monotonic() - attempt < 2
            assert time.monotonic() - started < within, "the client did not follow"
            time.sleep(0.1)


def test_standalone(redis_server):
    target = redis_target(redis_server.url, 0.5)
    try:
        target.client.set("connect:standalone", "1")
        assert target.topology() == {
            "kind": "standalone",
            "address": f"127.0.0.1:{redis_server.port}",
            "role": "master",
            "replicas": 0,
        }
    finally:
        target.close()


def test_standalone_down_is_a_redis_error(workdir):
    server = RedisServer(workdir)
    target = redis_target(server.url, 0.2)
    server.stop()
    started = time.monotonic()
    with pytest.raises(redis.RedisError):
        target.topology()
    assert time.monotonic() - started < 5


class SentinelSetup:
    """A master and a replica with a password, watched by three Sentinels with another."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.master_port, self.replica_port = free_port(), free_port()
        self.sentinel_ports = [free_port() for _ in range(3)]
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        self.url = f"redis+sentinel://:{DATA_PASSWORD}@{hosts}/mymaster/0"
        self.servers: dict[int, subprocess.Popen] = {}
        self.sentinels: list[subprocess.Popen] = []

    def start(self) -> None:
        auth = ("--requirepass", DATA_PASSWORD, "--masterauth", DATA_PASSWORD)
        self.servers[self.master_port] = _redis(self.directory / "m", self.master_port, *auth)
        self.servers[self.replica_port] = _redis(
            self.directory / "r",
            self.replica_port,
            *(*auth, "--replicaof", "127.0.0.1", str(self.master_port)),
        )
        # Sentinels learn of replicas from the master's INFO, every 10 s: have it first.
        replica = redis.Redis(port=self.replica_port, password=DATA_PASSWORD)
        wait_until(lambda: replica.info("replication")["master_link_status"] == "up", 10, "sync")
        for port in self.sentinel_ports:
            config = self.directory / f"sentinel-{port}.conf"
            config.write_text(
                f"port {port}\nbind 127.0.0.1\nrequirepass {SENTINEL_PASSWORD}\n"
                f"sentinel monitor mymaster 127.0.0.1 {self.master_port} 2\n"
                f"sentinel auth-pass mymaster {DATA_PASSWORD}\n"
                "sentinel down-after-milliseconds mymaster 1000\n"
                "sentinel failover-timeout mymaster 3000\n"
            )
            server = shutil.which("redis-server") or "redis-server"
            self.sentinels.append(
                subprocess.Popen([server, str(config), "--sentinel"], stdout=subprocess.DEVNULL)
            )
        wait_until(self._sentinels_agree, 10, "sentinels")

    def _sentinels_agree(self) -> bool:
        for port in self.sentinel_ports:
            sentinel = redis.Redis(port=port, password=SENTINEL_PASSWORD)
            state = sentinel.sentinel_master("mymaster")
            if (state["num-slaves"], state["num-other-sentinels"]) != (1, 2):
                return False
        return True

    def stop(self) -> None:
        for process in [*self.sentinels, *self.servers.values()]:
            stop_process(process)


@pytest.fixture
def sentinel_setup(tmp_path: Path) -> Iterator[SentinelSetup]:
    setup = SentinelSetup(tmp_path)
    try:
        setup.start()
        yield setup
    finally:
        setup.stop()


def test_sentinel_follows_a_failover(sentinel_setup):
    target = redis_target(sentinel_setup.url, 0.5, SENTINEL_PASSWORD)
    try:
        save = target.client.register_script("return redis.call('SET', KEYS[1], ARGV[1])")
        save(keys=["connect:sentinel"], args=["before"])
        assert target.topology() == {
            "kind": "sentinel",
            "service": "mymaster",
            "master": f"127.0.0.1:{sentinel_setup.master_port}",
            "replicas": 1,
            "sentinels": 3,
        }
        sentinel_setup.servers[sentinel_setup.master_port].send_signal(signal.SIGKILL)
        _follows(target, "connect:sentinel", within=8)
        assert save(keys=["connect:sentinel"], args=["again"]) == b"OK"  # loaded anew
        assert target.topology()["master"] == f"127.0.0.1:{sentinel_setup.replica_port}"
    finally:
        target.close()


def test_sentinels_get_the_urls_password_unless_told_otherwise(sentinel_setup):
    target = redis_target(sentinel_setup.url, 0.5)
    try:
        with pytest.raises(redis.RedisError) as caught:
            target.client.ping()
        assert DATA_PASSWORD not in str(caught.value)
    finally:
        target.close()


class ClusterSetup:
    """Three masters with a replica each, ``cluster-node-timeout`` 1 s."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ports = [_cluster_port() for _ in range(6)]
        self.url = f"redis+cluster://127.0.0.1:{self.ports[0]},127.0.0.1:{self.ports[1]}"
        self.nodes: dict[int, subprocess.Popen] = {}

    def start(self) -> None:
        for port in self.ports:
            self.nodes[port] = _redis(
                self.directory / str(port),
                port,
                *("--cluster-enabled", "yes", "--cluster-node-timeout", "1000"),
            )
        for port in self.ports:
            wait_until(redis.Redis(port=port).ping, 10, f"redis-server {port}")
        subprocess.run(
            [
                shutil.which("redis-cli") or "redis-cli",
                *("--cluster", "create", *(f"127.0.0.1:{port}" for port in self.ports)),
                *("--cluster-replicas", "1", "--cluster-yes"),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=30,
        )
        wait_until(self.healthy, 15, "redis cluster")

    def healthy(self) -> bool:
        """Every live node sees the cluster whole, and every replica has its master's data
        (one that never had it cannot take over)."""
        for port, process in self.nodes.items():
            node = redis.Redis(port=port)
            if process.poll() is not None:
                continue
            if node.cluster("INFO")["cluster_state"] != "ok":
                return False
            replication = node.info("replication")
            if replication["role"] == "slave" and replication["master_link_status"] != "up":
                return False
        return True

    def each(self, sig: int) -> None:
        for process in self.nodes.values():
            process.send_signal(sig)

    def stop(self) -> None:
        for process in self.nodes.values():
            stop_process(process)


@pytest.fixture(scope="module")
def cluster_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterSetup]:
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli is not installed")
    setup = ClusterSetup(tmp_path_factory.mktemp("cluster"))
    try:
        setup.start()
        yield setup
    finally:
        setup.stop()


@pytest.fixture
def cluster_target(cluster_setup: ClusterSetup) -> Iterator[RedisTarget]:
    target = redis_target(cluster_setup.url, 0.2)
    yield target
    target.close()


def test_cluster_runs_scripts_and_pipelines(cluster_target):
    save = cluster_target.client.register_script("return redis.call('SET', KEYS[1], ARGV[1])")
    assert save(keys=["connect:{a}"], args=["1"]) == b"OK"
    pipe = cluster_target.client.pipeline(transaction=False)
    pipe.get("connect:{a}")
    pipe.get("connect:{b}")
    assert pipe.execute() == [b"1", None]
    whole = {"kind": "cluster", "masters": 3, "replicas": 3}
    # With a 1 s node timeout, a busy machine can make a node look failing for a moment.
    wait_until(lambda: cluster_target.topology() == whole, 5, "the whole cluster")


def _raises_redis_error(call: Callable[[], object]) -> None:
    with pytest.raises(redis.RedisError) as caught:
        call()
    assert isinstance(caught.value, redis.ConnectionError), repr(caught.value)


def test_cluster_out_of_reach_is_a_redis_error(cluster_setup, cluster_target):
    """redis-py says so with RedisClusterException, which is no RedisError."""
    client = cluster_target.client
    client.set("connect:{c}", "1")
    cluster_setup.each(signal.SIGSTOP)
    try:
        _raises_redis_error(lambda: client.get("connect:{c}"))
        _raises_redis_error(cluster_target.topology)
        pipe = client.pipeline(transaction=False)
        pipe.get("connect:{c}")
        _raises_redis_error(pipe.execute)
    finally:
        cluster_setup.each(signal.SIGCONT)
    wait_until(lambda: client.get("connect:{c}") == b"1", 5, "the cluster back")


def test_cluster_down_at_start_is_a_redis_error():
    with pytest.raises(redis.ConnectionError):
        redis_target(f"redis+cluster://127.0.0.1:{free_port()}", 0.2)


def test_cluster_follows_a_failover(cluster_setup, cluster_target):
    wait_until(cluster_setup.healthy, 10, "redis cluster")
    client = cluster_target.client
    key = "connect:{failover}"
    client.set(key, "before")
    port = client.get_node_from_key(key).port
    cluster_setup.nodes[port].send_signal(signal.SIGKILL)
    cluster_setup.nodes[port].wait()
    _follows(cluster_target, key, within=8)
    assert client.get_node_from_key(key).port != port
    after = {"kind": "cluster", "masters": 3, "replicas": 2}
    wait_until(lambda: cluster_target.topology() == after, 5, "the cluster without it")


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA and a certificate for 127.0.0.1 it signed."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    directory = tmp_path_factory.mktemp("tls")
    files = {name: directory / name for name in ("ca.crt", "ca.key", "server.crt", "server.key")}
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    for command in (
        "req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=test-ca -keyout ca.key -out ca.crt",
        "req -newkey rsa:2048 -nodes -subj /CN=redis -keyout server.key -out server.csr",
        "x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1"
        " -extfile san.cnf -out server.crt",
    ):
        subprocess.run(
            ["openssl", *command.split()], cwd=directory, check=True, capture_output=True
        )
    return files


def test_tls_reaches_sentinels_master_and_cluster_nodes(tls_files, tmp_path):
    tls = (
        *("--tls-cert-file", str(tls_files["server.crt"])),
        *("--tls-key-file", str(tls_files["server.key"])),
        *("--tls-ca-cert-file", str(tls_files["ca.crt"]), "--tls-auth-clients", "no"),
    )
    master, sentinel, node = free_port(), free_port(), _cluster_port()
    processes = [_redis(tmp_path / "master", 0, "--tls-port", str(master), *tls)]
    try:
        (tmp_path / "sentinel.conf").write_text(
            f"port 0\ntls-port {sentinel}\nbind 127.0.0.1\ntls-replication yes\n"
            f"sentinel monitor mymaster 127.0.0.1 {master} 1\n"
        )
        processes.append(
            subprocess.Popen(
                [
                    shutil.which("redis-server") or "redis-server",
                    *(str(tmp_path / "sentinel.conf"), "--sentinel", *tls),
                ],
                stdout=subprocess.DEVNULL,
            )
        )
        cluster = ("--tls-port", str(node), "--tls-cluster", "yes", "--cluster-enabled", "yes")
        processes.append(_redis(tmp_path / "node", 0, *cluster, *tls))
        ca = f"ssl_ca_certs={tls_files['ca.crt']}"
        node_client = redis.Redis(
            "127.0.0.1", node, ssl=True, ssl_ca_certs=str(tls_files["ca.crt"])
        )
        wait_until(node_client.ping, 10, "cluster node")
        node_client.execute_command("CLUSTER ADDSLOTSRANGE", 0, 16383)
        wait_until(lambda: node_client.cluster("INFO")["cluster_state"] == "ok", 10, "cluster")

        for url, kind in (
            (f"rediss+sentinel://127.0.0.1:{sentinel}/mymaster?{ca}", "sentinel"),
            (f"rediss+cluster://127.0.0.1:{node}?{ca}", "cluster"),
        ):
            target = redis_target(url, 0.5)
            try:
                wait_until(target.client.ping, 10, kind)
                assert target.topology()["kind"] == kind
            finally:
                target.close()
            with pytest.raises(redis.ConnectionError):  # the server's certificate is unknown
                redis_target(url.partition("?")[0], 0.5).client.ping()
    finally:
        for process in processes:
            stop_process(process)
