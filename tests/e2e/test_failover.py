"""Live failover under load: real Sentinel and Cluster processes, two bridge servers, a
real Kratos, and second-factor logins while the Redis master goes away.

What must hold whatever Redis does: no revoked or unknown credential is ever allowed;
after recovery every valid session is allowed again; each session upgrade gives exactly
one AAL2 event. How many requests got 503 and how long recovery took are printed (and
bounded generously: timings belong in the note, not in pass/fail).
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest

from bridge.store.redis.connection import redis_target
from tests.conftest import SECRET
from tests.support import kratos_flows as flows
from tests.support.harness import BridgeServer, wait_until
from tests.support.topologies import FAST_FAILURE_AFTER_MS, ClusterSet, SentinelSet

RECOVERY_BOUND_S = 30  # generous: Sentinel and Cluster need a few seconds to elect


@dataclass
class Credentials:
    valid: list[str]
    revoked: list[str]
    unknown: list[str]
    upgrading: list[tuple[flows.User, str]]  # TOTP users and an aal1 token of theirs


@dataclass
class Load:
    """Threads sending ``/auth`` with every kind of credential, recording each answer."""

    bridges: list[BridgeServer]
    credentials: Credentials
    answers: list[tuple[float, str, int]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def start(self, threads: int = 4) -> list[threading.Thread]:
        workers = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]
        for worker in workers:
            worker.start()
        return workers

    def _run(self, seed: int) -> None:
        c = self.credentials
        kinds = [("valid", t) for t in c.valid] + [("upgrading", t) for _, t in c.upgrading]
        kinds += [("revoked", t) for t in c.revoked] + [("unknown", t) for t in c.unknown]
        i = seed
        with httpx.Client(timeout=10) as client:
            while not self.stop.is_set():
                kind, token = kinds[i % len(kinds)]
                bridge = self.bridges[i % len(self.bridges)]
                i += 1
                try:
                    status = client.get(
                        bridge.url + "/auth", headers={"X-Session-Token": token}
                    ).status_code
                except httpx.HTTPError:
                    status = 0
                self.answers.append((time.monotonic(), kind, status))

    def statuses(self, kinds: set[str], since: float = 0.0) -> list[int]:
        return [s for t, k, s in list(self.answers) if k in kinds and t >= since]


@pytest.fixture
def credentials(kratos) -> Credentials:
    users = [flows.register(kratos, "failover") for _ in range(6)]
    valid = [u.token for u in users[:3]] + [flows.login_api(kratos, u) for u in users[:3]]
    revoked = [flows.login_api(kratos, u) for u in users[:2]]
    for token in revoked:
        flows.logout_api(kratos, token)
    upgrading = []
    for user in users[3:]:
        flows.enable_totp(kratos, user)  # its registration session is aal2 now: not used
        upgrading.append((user, flows.login_api(kratos, user)))
    unknown = [secrets.token_urlsafe(24) for _ in range(3)]
    return Credentials(valid, revoked, unknown, upgrading)


def bridges_on(url: str, kratos, workdir, prefix: str) -> list[BridgeServer]:
    env = {
        "BRIDGE_KRATOS_PUBLIC_URL": kratos.public_url,
        "BRIDGE_KRATOS_ADMIN_URL": kratos.admin_url,
        "BRIDGE_REDIS_URL": url,
        "BRIDGE_SECRET": SECRET,
        "BRIDGE_KEY_PREFIX": prefix,
        "BRIDGE_REVALIDATE_AFTER": "1",
        "BRIDGE_WORKERS": "1",
    }
    # The product's own Redis and Kratos timeouts: what a user's bridge does in a failover
    # (the load's 10 s client timeout is well past their 3 s budget).
    return [BridgeServer(env, workdir, patient=False) for _ in range(2)]


def run_failover(topology, fail, kratos, workdir, prefix, credentials) -> None:
    """Load on two bridges; ``fail()`` takes the master away; half the TOTP users
    upgrade right then, half after recovery. Then check everything the module promises."""
    bridges = bridges_on(topology.url, kratos, workdir, prefix)
    load = Load(bridges, credentials)
    threads = load.start()
    try:
        # Warm: 2 s of nothing but 200s. With the product's 0.5 s Redis timeout, a busy
        # machine's stall is a 503 before anything failed; the next 2 s must be clean.
        def warm() -> bool:
            recent = load.statuses({"valid", "upgrading"}, since=time.monotonic() - 2)
            return bool(recent) and set(recent) == {200}

        time.sleep(2)
        wait_until(warm, 30, "2 s of warm answers, all 200")

        failed_at = time.monotonic()
        fail()
        half = len(credentials.upgrading) // 2
        for user, token in credentials.upgrading[:half]:
            flows.upgrade_to_aal2(kratos, user, token)

        def recovered() -> bool:
            recent = load.statuses({"valid", "upgrading"}, since=time.monotonic() - 1.5)
            return bool(recent) and set(recent) == {200} and time.monotonic() - failed_at > 2

        wait_until(recovered, RECOVERY_BOUND_S + 5, "the bridges to recover")
        for user, token in credentials.upgrading[half:]:
            flows.upgrade_to_aal2(kratos, user, token)
        time.sleep(2)
    finally:
        load.stop.set()
        for thread in threads:
            thread.join()

    try:
        answers = [(t - failed_at, k, s) for t, k, s in load.answers]
        unavailable = [t for t, _, s in answers if s == 503]
        recovery = max(unavailable, default=0.0)
        print(
            f"\n{topology.kind}: {len(answers)} requests, {len(unavailable)} answered 503, "
            f"last 503 at {recovery:.2f} s after the master went away"
        )
        assert {s for _, _, s in answers} <= {200, 401, 503}
        assert not [a for a in answers if a[1] in ("revoked", "unknown") and a[2] == 200]
        assert recovery < RECOVERY_BOUND_S

        # After recovery: every valid session is allowed by both bridges, the upgraded
        # ones at aal2, and every upgrade is recorded exactly once.
        with httpx.Client(timeout=10) as client:
            for bridge in bridges:
                for token in credentials.valid:
                    answer = _settled_answer(client, bridge.url, token)
                    assert answer.status_code == 200, (bridge.url, answer.text)
                for _, token in credentials.upgrading:
                    answer = _settled_answer(client, bridge.url, token)
                    assert answer.headers.get("X-User-Aal") == "aal2", answer.status_code
        target = redis_target(topology.url, 2.0)
        events = target.client.xrange(prefix + "events:aal2")
        target.close()
        sessions = [fields[b"session_id"].decode() for _, fields in events]
        upgraded = {
            flows.session_of(kratos, token=token).json()["id"] for _, token in credentials.upgrading
        }
        assert sorted(sessions) == sorted(upgraded), "one event per upgraded session"
    finally:
        for bridge in bridges:
            bridge.stop()


def _settled_answer(client: httpx.Client, url: str, token: str) -> httpx.Response:
    """``/auth``'s answer for ``token``, asked again for up to 10 s while it is a 503 (a
    stall of the machine, with the product's timeouts): any other answer is final."""
    deadline = time.monotonic() + 10
    while True:
        answer = client.get(url + "/auth", headers={"X-Session-Token": token})
        if answer.status_code != 503 or time.monotonic() > deadline:
            return answer
        time.sleep(0.2)


def test_sentinel_master_killed(kratos, workdir, prefix, credentials):
    topology = SentinelSet(workdir, appendonly=True, failure_after_ms=FAST_FAILURE_AFTER_MS)
    try:

        def fail() -> None:
            old = topology.kill_master()
            topology.wait_for_new_master(old, RECOVERY_BOUND_S)

        run_failover(topology, fail, kratos, workdir, prefix, credentials)
    finally:
        topology.stop()


@pytest.mark.parametrize("how", ["cluster_failover", "master_killed"])
def test_cluster(how, kratos, workdir, prefix, credentials):
    topology = ClusterSet(workdir, appendonly=True, failure_after_ms=FAST_FAILURE_AFTER_MS)
    stream = prefix + "events:aal2"
    try:

        def fail() -> None:
            if how == "cluster_failover":
                topology.failover(topology.replica_of(topology.master_for_key(stream)))
            else:
                topology.kill_master_for_key(stream)
                topology.wait_ok(RECOVERY_BOUND_S)

        run_failover(topology, fail, kratos, workdir, prefix, credentials)
    finally:
        topology.stop()
