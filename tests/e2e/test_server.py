"""``kratos-bridge serve`` as real processes: embedded mode, and several processes on one Redis."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis

from tests.conftest import SECRET
from tests.support import kratos_flows as flows
from tests.support.harness import BridgeServer, free_port


def _env(kratos, **extra):
    return {
        "BRIDGE_KRATOS_PUBLIC_URL": kratos.public_url,
        "BRIDGE_KRATOS_ADMIN_URL": kratos.admin_url,
        **extra,
    }


def test_embedded_mode_serves_and_warns(kratos, workdir):
    server = BridgeServer(_env(kratos), workdir)
    try:
        user = flows.register(kratos)
        response = httpx.get(server.url + "/auth", headers={"X-Session-Token": user.token})
        assert response.status_code == 200
        assert response.headers["X-User-Id"] == user.identity_id
        assert httpx.get(server.url + "/health/ready").json() == {"status": "ok"}
        assert httpx.get(server.admin_url + "/health/ready").json() == {
            "status": "ok",
            "redis": {"kind": "embedded"},
            "workers": {"count": 1, "reason": "embedded store: one process"},
        }
    finally:
        server.stop()
    assert server.process.returncode == 0
    log = server.log()
    assert "embedded in-process store" in log
    assert "server processes: 1 (embedded store: one process)" in log
    assert "Traceback" not in log
    assert user.token not in log


def _on_redis(kratos, redis_server, prefix, **extra):
    """Settings of two server processes on the shared Redis."""
    env = {"BRIDGE_REDIS_URL": redis_server.url, "BRIDGE_SECRET": SECRET}
    return _env(kratos, **env, BRIDGE_KEY_PREFIX=prefix, BRIDGE_WORKERS="2", **extra)


@pytest.fixture
def two_bridges(kratos, redis_server, workdir, prefix):
    env = _on_redis(
        kratos, redis_server, prefix, BRIDGE_REVALIDATE_AFTER="1", BRIDGE_LOG_LEVEL="debug"
    )
    servers = [BridgeServer(env, workdir), BridgeServer(env, workdir)]
    yield servers
    for server in servers:
        server.stop()


def test_aal2_upgrade_seen_by_many_processes_is_one_event(
    two_bridges, kratos, redis_server, prefix
):
    user = flows.register(kratos)
    flows.enable_totp(kratos, user)
    token = flows.login_api(kratos, user)
    headers = {"X-Session-Token": token}
    urls = [server.url + "/auth" for server in two_bridges]
    assert httpx.get(urls[0], headers=headers).headers["X-User-Aal"] == "aal1"

    flows.upgrade_to_aal2(kratos, user, token)
    time.sleep(1.1)
    before = kratos.whoami_calls()
    started = time.monotonic()
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda i: httpx.get(urls[i % 2], headers=headers), range(20)))
    took = time.monotonic() - started
    assert {a.status_code for a in answers} == {200}
    assert {a.headers["X-User-Aal"] for a in answers} == {"aal2"}
    # One call for the stale session, all processes together. A loaded machine can stretch
    # the 20 requests past the 1 s window (or past the 0.75 s after which refresh-ahead asks
    # again): each window that went by may cost one more call, never one per request.
    assert 1 <= kratos.whoami_calls() - before <= 1 + int(took / 0.75)

    stream = redis_server.client.xrange(f"{prefix}events:aal2")
    assert len(stream) == 1
    assert stream[0][1][b"methods"] == b"totp"
    for server in two_bridges:
        assert token not in server.log()


def test_no_raw_credentials_in_redis(two_bridges, kratos, redis_server, prefix):
    user = flows.register(kratos)
    cookie = flows.browser_login(kratos, user)
    for credential in ({"X-Session-Token": user.token}, {"Cookie": f"ory_kratos_session={cookie}"}):
        assert httpx.get(two_bridges[0].url + "/whoami", headers=credential).status_code == 200
    client: redis.Redis = redis_server.client
    stored = []
    for key in client.scan_iter(match=f"{prefix}*"):
        kind = client.type(key)
        if kind == b"string":
            stored.append(client.get(key))
        elif kind == b"hash":
            stored += [part for item in client.hgetall(key).items() for part in item]
        elif kind == b"zset":
            stored += client.zrange(key, 0, -1)
        elif kind == b"stream":
            stored += [str(entry).encode() for entry in client.xrange(key)]
        stored.append(key)
    dump = b"\n".join(stored)
    assert b"session" in dump  # the mirror is there to be searched
    assert user.token.encode() not in dump
    assert cookie.encode() not in dump
    assert cookie.rstrip("=").encode()[:40] not in dump


def _check(env):
    return subprocess.run(
        [sys.executable, "-m", "bridge", "check"],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_reports_what_it_reached(kratos, redis_server):
    env = {**_env(kratos), "BRIDGE_REDIS_URL": redis_server.url, "BRIDGE_SECRET": SECRET}
    result = _check(env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "redis:           ok" in result.stdout
    topology = f"topology:        standalone 127.0.0.1:{redis_server.port} (master, 0 replicas)"
    assert topology in result.stdout
    assert "kratos:          ok" in result.stdout
    assert "kratos version:  v1.3.1" in result.stdout
    assert SECRET not in result.stdout + result.stderr


def test_check_reports_a_cluster_it_cannot_reach(kratos):
    """A cluster client asks its seed nodes as it is built: a failure there is reported
    like any other Redis failure, never as a traceback."""
    port = free_port()
    env = {
        **_env(kratos),
        "BRIDGE_REDIS_URL": f"redis+cluster://:cluster-pw@127.0.0.1:{port}",
        "BRIDGE_SECRET": SECRET,
    }
    result = _check(env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"store:           redis redis+cluster://127.0.0.1:{port}\n" in result.stdout
    assert "redis:           FAILED (Redis: ConnectionError)" in result.stdout
    assert "kratos:          ok" in result.stdout
    assert "Traceback" not in result.stderr
    assert "cluster-pw" not in result.stdout + result.stderr


def test_check_fails_when_kratos_is_down(redis_server):
    port = free_port()
    env = {
        "BRIDGE_KRATOS_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "BRIDGE_KRATOS_ADMIN_URL": f"http://127.0.0.1:{port}",
        "BRIDGE_KRATOS_TIMEOUT": "0.5",
        "BRIDGE_REDIS_URL": redis_server.url,
        "BRIDGE_SECRET": SECRET,
    }
    result = _check(env)
    assert result.returncode == 1
    assert "kratos:          FAILED (unreachable" in result.stdout
    assert "Traceback" not in result.stderr


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def test_workers_end_when_the_server_process_is_killed(kratos, redis_server, workdir, prefix):
    server = BridgeServer(
        _env(
            kratos,
            BRIDGE_REDIS_URL=redis_server.url,
            BRIDGE_SECRET=SECRET,
            BRIDGE_KEY_PREFIX=prefix,
            BRIDGE_WORKERS="2",
        ),
        workdir,
    )
    try:
        found = subprocess.run(
            ["pgrep", "-P", str(server.process.pid)], capture_output=True, text=True
        ).stdout.split()
        workers = [int(pid) for pid in found]
        assert len(workers) == 2
        ready = httpx.get(server.admin_url + "/health/ready").json()
        assert ready["workers"] == {"count": 2, "reason": "BRIDGE_WORKERS=2"}
        time.sleep(1)  # both workers have loaded the app (and asked for the signal)
        server.process.kill()
        server.process.wait()
        deadline = time.monotonic() + 10
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, workers)), "a worker outlived the server process"
    finally:
        for pid in workers:
            if _alive(pid):
                subprocess.run(["kill", "-9", str(pid)], check=False)
        server.stop()


def _second_serve(env: dict[str, str], port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", "serve", "--port", str(port)],
        env={k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")} | env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _one_config_line(done: subprocess.CompletedProcess[str], key: str, port: int) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"kratos-bridge: configuration error: {key}: cannot listen on 127.0.0.1:{port} "
        "(Address already in use)"
    ]


def test_a_second_bridge_on_the_same_ports_exits_2_naming_the_key(kratos, workdir):
    """Two bridges with the same settings: the second stops with one line naming the port
    it cannot have, as for any other configuration error, not a traceback."""
    env = _env(kratos, BRIDGE_PORT=str(free_port()), BRIDGE_ADMIN_PORT=str(free_port()))
    first = BridgeServer(env, workdir)
    try:
        second = _second_serve(env, first.port)
    finally:
        first.stop()
    _one_config_line(second, "BRIDGE_ADMIN_PORT", first.admin_port)


def test_a_second_bridge_on_the_same_main_port_exits_2_naming_the_key(kratos, workdir):
    """Only the main port taken (another admin port, or none): the same, not Granian's
    panic and its Rust backtrace."""
    first = BridgeServer(_env(kratos, BRIDGE_ADMIN_PORT="0"), workdir)
    try:
        second = _second_serve(_env(kratos, BRIDGE_ADMIN_PORT="0"), first.port)
    finally:
        first.stop()
    _one_config_line(second, "BRIDGE_PORT", first.port)


def _grpc_check(port: int, token: str):
    """One Envoy gRPC check on a connection of its own (so the kernel may hand it to any
    server process)."""
    import grpc
    from envoy.service.auth.v3.attribute_context_pb2 import AttributeContext
    from envoy.service.auth.v3.external_auth_pb2 import CheckRequest
    from envoy.service.auth.v3.external_auth_pb2_grpc import AuthorizationStub

    http = AttributeContext.HttpRequest(
        method="GET",
        path="/reports?year=2026",
        host="app.test",
        scheme="https",
        headers={"x-session-token": token, "x-forwarded-proto": "https"},
    )
    request = CheckRequest(attributes=AttributeContext(request=AttributeContext.Request(http=http)))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return AuthorizationStub(channel).Check(request, timeout=10)


def test_every_process_serves_envoy_grpc_checks(kratos, redis_server, workdir, prefix):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    grpc_port = free_port()
    env = _on_redis(kratos, redis_server, prefix, BRIDGE_GRPC_PORT=str(grpc_port))
    server = BridgeServer(env, workdir)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        user = flows.register(kratos)
        for _ in range(10):
            check = _grpc_check(grpc_port, user.token)
            assert check.status.code == 0
            upstream = {h.header.key: h.header.value for h in check.ok_response.headers}
            assert upstream["x-user-id"] == user.identity_id
        refused = _grpc_check(grpc_port, "ory_st_" + "f" * 32)
        assert refused.denied_response.status.code == 401
        # Another bridge on the same gRPC port stops naming the key, as for the HTTP port.
        second = _second_serve(
            _env(kratos, BRIDGE_ADMIN_PORT="0", BRIDGE_GRPC_PORT=str(grpc_port)), free_port()
        )
        _one_config_line(second, "BRIDGE_GRPC_PORT", grpc_port)
    finally:
        server.stop()
    assert server.process.returncode == 0
    log = server.log()
    assert "Traceback" not in log
    assert user.token not in log
