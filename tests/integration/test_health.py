"""``/health/ready``: on the public listener, which anyone may ask, the status only and at
most one check of Redis and Kratos a second per process; on the admin listener, the
full answer, with how many server processes run and why (real Redis, real Kratos)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from bridge.admin.api import create_admin_app
from bridge.web import health
from bridge.web.app import create_app
from bridge.web.cpu_budget import WorkerCount
from tests.conftest import bridge_settings
from tests.support.harness import free_port


@pytest.fixture
def listeners(kratos, redis_server, prefix):
    """``listeners(**env)``: test clients of the public and the admin app of one bridge."""
    built = []

    def make(workers: WorkerCount | None = None, **env: str):
        app = create_app(bridge_settings(kratos, redis_server.url, prefix, **env))
        bridge = app.extensions["bridge"]
        built.append(bridge)
        return app.test_client(), create_admin_app(bridge, workers=workers).test_client()

    yield make
    for bridge in built:
        bridge.close()


def test_the_public_answer_is_the_status_only(listeners, redis_server):
    public, admin = listeners()
    answer = public.get("/health/ready")
    assert (answer.status_code, answer.get_json()) == (200, {"status": "ok"})
    full = admin.get("/health/ready")
    assert full.status_code == 200
    assert full.get_json()["redis"] == {
        "kind": "standalone",
        "address": f"127.0.0.1:{redis_server.port}",
        "role": "master",
        "replicas": 0,
    }


def test_the_public_answer_says_not_why(listeners):
    nobody = f"http://127.0.0.1:{free_port()}"  # Kratos is not there
    public, admin = listeners(BRIDGE_KRATOS_PUBLIC_URL=nobody, BRIDGE_KRATOS_TIMEOUT="0.5")
    answer = public.get("/health/ready")
    assert (answer.status_code, answer.get_json()) == (503, {"status": "unavailable"})
    full = admin.get("/health/ready")
    assert full.status_code == 503
    assert full.get_json()["errors"]["kratos"].startswith("unreachable")


def test_the_admin_answer_says_how_many_processes_and_why(listeners):
    public, admin = listeners(BRIDGE_WORKERS="3")
    assert admin.get("/health/ready").get_json()["workers"] == {
        "count": 3,
        "reason": "BRIDGE_WORKERS=3",
    }
    assert "workers" not in public.get("/health/ready").get_json()

    # What serve started with, as it was handed over: not asked again of the cgroups.
    started = WorkerCount(2, "CPU quota 1.5 (cgroup v2 /sys/fs/cgroup/cpu.max 150000 100000)")
    nobody = f"http://127.0.0.1:{free_port()}"  # and when not ready, too
    _, admin = listeners(started, BRIDGE_KRATOS_PUBLIC_URL=nobody, BRIDGE_KRATOS_TIMEOUT="0.5")
    answer = admin.get("/health/ready")
    assert answer.status_code == 503
    assert answer.get_json()["workers"] == {"count": 2, "reason": started.reason}


def test_a_flood_of_public_asks_costs_one_check(listeners, kratos, monkeypatch):
    # Kept for far longer than the test takes: the count cannot depend on how fast it runs.
    monkeypatch.setattr(health, "PUBLIC_READY_FOR_S", 3600.0)
    public, admin = listeners()
    before = kratos.calls("/health/ready")
    app = public.application

    def ask(_: int) -> int:
        return app.test_client().get("/health/ready").status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(ask, range(40))) == {200}
    assert kratos.calls("/health/ready") - before == 1
    # The admin listener asks each time: an operator's answer is never a second old.
    assert admin.get("/health/ready").status_code == 200
    assert admin.get("/health/ready").status_code == 200
    assert kratos.calls("/health/ready") - before == 3
