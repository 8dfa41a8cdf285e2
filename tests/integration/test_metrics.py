"""``bridge.observe.metrics``: what ``/metrics`` counts, and how the server's worker
processes add up (real ``Metrics``, replies, Kratos, Redis and processes)."""

from __future__ import annotations

import multiprocessing
import os
import secrets
import threading
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bridge.clock import now_ms
from bridge.errors import KratosUnavailable, RejectedRecently, SessionInvalid, StoreUnavailable
from bridge.kratos.whoami import KratosClient
from bridge.observe.decision_log import Trace
from bridge.observe.metrics import MULTIPROC_DIR_ENV, Metrics, prepare_multiprocess_dir
from bridge.pipeline.credentials import extract
from bridge.pipeline.redirects import BrowserRedirects
from bridge.sessions.session import MirroredSession, aal2_event
from bridge.web.request import HeaderView
from bridge.web.responses import Refusal, Reply, allow, refusal
from bridge.wiring import build_bridge, build_store
from tests.conftest import SECRET, bridge_settings
from tests.support import kratos_flows as flows
from tests.support.harness import BridgeServer, free_port, wait_until

ALLOW = allow((("X-User-Id", "u"),), ())
MISSING = Refusal(401, "session_missing", "no session").reply()
FORBIDDEN = Refusal(403, "forbidden", "rules[0] denies this request").reply()


def samples(body: bytes) -> dict[tuple[str, frozenset], float]:
    """Every sample of an exposition: ``(name, labels) -> value``."""
    found = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found: dict, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


def named(found: dict, name: str) -> dict[frozenset, float]:
    return {labels: v for (n, labels), v in found.items() if n == name}


def trace(latency_ns: int = 5_000, rule: str | None = "default", tier: str | None = None):
    return Trace(started_ns=1_000, finished_ns=1_000 + latency_ns, rule=rule, tier=tier)


@pytest.fixture
def metrics():
    metrics = Metrics()
    yield metrics
    metrics.close()


def test_decisions_are_counted_by_dialect_rule_outcome_and_tier(metrics):
    watch = metrics.decision_watcher()
    headers = HeaderView([])
    for _ in range(3):
        watch("nginx", "GET", headers, ALLOW, trace(tier="process"))
    watch("nginx", "GET", headers, ALLOW, trace(tier="redis"))
    watch("forward-auth", "POST", headers, ALLOW, trace(rule="rules[1] (admin)", tier="kratos"))
    watch("forward-auth", "GET", headers, MISSING, trace())
    watch("forward-auth", "GET", headers, MISSING, trace())
    watch("envoy", "GET", headers, FORBIDDEN, trace(rule="rules[0]"))
    watch("nginx", "GET", headers, Reply(500, (), b"not json"), trace(rule=None))

    decisions = named(samples(metrics.exposition()[0]), "bridge_decisions_total")

    def labels(dialect, rule, outcome, tier):
        return frozenset(dict(dialect=dialect, rule=rule, outcome=outcome, tier=tier).items())

    assert decisions == {
        labels("nginx", "default", "allow", "process"): 3,
        labels("nginx", "default", "allow", "redis"): 1,
        labels("forward-auth", "rules[1] (admin)", "allow", "kratos"): 1,
        labels("forward-auth", "default", "session_missing", "none"): 2,
        labels("envoy", "rules[0]", "forbidden", "none"): 1,
        labels("nginx", "none", "refused", "none"): 1,
    }


def test_decision_latency_is_a_histogram_by_tier(metrics):
    watch = metrics.decision_watcher()
    latencies_ns = [4_000, 10_000, 10_001, 3_000_000, 10_000_000_000]
    for latency in latencies_ns:
        watch("nginx", "GET", HeaderView([]), ALLOW, trace(latency, tier="redis"))
    watch("nginx", "GET", HeaderView([]), ALLOW, trace(2_000, tier="process"))

    found = samples(metrics.exposition()[0])
    name = "bridge_decision_duration_seconds"
    redis_buckets = {
        dict(labels)["le"]: count
        for labels, count in named(found, name + "_bucket").items()
        if ("tier", "redis") in labels
    }
    assert redis_buckets["1e-05"] == 2  # 10 µs is in the 10 µs bucket (le: at most)
    assert redis_buckets["2.5e-05"] == 3
    assert redis_buckets["0.0025"] == 3
    assert redis_buckets["0.005"] == 4
    assert redis_buckets["5.0"] == 4
    assert redis_buckets["+Inf"] == 5
    assert value(found, name + "_count", tier="redis") == 5
    assert value(found, name + "_sum", tier="redis") == pytest.approx(sum(latencies_ns) / 1e9)
    assert value(found, name + "_count", tier="process") == 1


def test_a_refusal_from_the_rejection_memory_is_a_negative_cache_hit(kratos, metrics):
    """The mirror's own words, from a real rejection: Kratos refuses a forged token once,
    then the mirror refuses it from memory."""
    bridge = build_bridge(bridge_settings(kratos, None, "neg:"))
    watch = metrics.decision_watcher()
    headers = HeaderView([("x-session-token", "ory_st_" + secrets.token_hex(16))])
    credential = extract(headers, bridge.settings.session_cookie)
    try:
        for ask in (bridge.mirror.resolve, bridge.mirror.from_memory):
            with pytest.raises(SessionInvalid) as refused:
                ask(credential)
            reply = refusal(refused.value, bridge.redirects, None).reply()
            watch("nginx", "GET", headers, reply, trace())
    finally:
        bridge.close()

    found = samples(metrics.exposition()[0])
    assert value(found, "bridge_negative_cache_hits_total") == 1
    assert sum(named(found, "bridge_decisions_total").values()) == 2


def test_a_negative_cache_hit_is_known_by_its_error_class_not_its_words(metrics):
    """Rewording the refusal hides no hit, and a refusal that only shares its words is
    not one: the watcher counts refusals of a ``RejectedRecently``."""
    redirects = BrowserRedirects("https://login.example.com/login", ())
    reworded = RejectedRecently()
    reworded.args = ("Kratos turned this credential down a moment ago",)
    same_words = SessionInvalid("Kratos rejected this credential recently")
    watch = metrics.decision_watcher()
    for error in (reworded, same_words):
        watch("nginx", "GET", HeaderView([]), refusal(error, redirects, None).reply(), trace())

    found = samples(metrics.exposition()[0])
    assert value(found, "bridge_negative_cache_hits_total") == 1
    refused = dict(dialect="nginx", rule="default", outcome="session_invalid", tier="none")
    assert value(found, "bridge_decisions_total", **refused) == 2


def test_refusals_are_counted_from_the_reply_s_facts_not_its_body(metrics):
    """A watcher never parses the answer it is shown: the code and the error's class
    travel with the reply, whatever its body."""
    watch = metrics.decision_watcher()
    not_json = Reply(401, (), b"<p>refused</p>", "session_invalid", RejectedRecently)
    watch("nginx", "GET", HeaderView([]), not_json, trace())

    found = samples(metrics.exposition()[0])
    assert value(found, "bridge_negative_cache_hits_total") == 1
    refused = dict(dialect="nginx", rule="default", outcome="session_invalid", tier="none")
    assert value(found, "bridge_decisions_total", **refused) == 1


def test_kratos_calls_by_status_and_latency(kratos, metrics):
    user = flows.register(kratos)
    client = KratosClient(kratos.public_url, "ory_kratos_session", 5, observe=metrics.kratos_call)
    nobody = KratosClient(
        f"http://127.0.0.1:{free_port()}", "ory_kratos_session", 5, observe=metrics.kratos_call
    )
    try:
        client.whoami(extract(HeaderView([("x-session-token", user.token)]), "c"))
        with pytest.raises(SessionInvalid):
            client.whoami(
                extract(HeaderView([("x-session-token", "ory_st_" + secrets.token_hex(16))]), "c")
            )
        with pytest.raises(KratosUnavailable):
            nobody.whoami(extract(HeaderView([("x-session-token", user.token)]), "c"))
    finally:
        client.close()
        nobody.close()

    found = samples(metrics.exposition()[0])
    name = "bridge_kratos_request_duration_seconds"
    assert named(found, name + "_count") == {
        frozenset({("status", "200")}): 1,
        frozenset({("status", "401")}): 1,
        frozenset({("status", "error")}): 1,
    }
    assert value(found, name + "_sum", status="200") > 0


def test_failed_redis_operations_by_operation(kratos, metrics):
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    store = build_store(bridge_settings(kratos, dead_redis, "dead:"))
    store.error_observer = metrics.redis_error
    try:
        for _ in range(2):
            with pytest.raises(StoreUnavailable):
                store.load("4f8e9b1a-2c3d-4e5f-8a9b-0c1d2e3f4a5b")
        with pytest.raises(StoreUnavailable):
            store.find_credential("f" * 64)
    finally:
        store.close()

    found = samples(metrics.exposition()[0])
    assert named(found, "bridge_redis_errors_total") == {
        frozenset({("operation", "load")}): 2,
        frozenset({("operation", "find_credential")}): 1,
    }


def test_aal2_events_by_method(kratos, metrics):
    """As the mirror tells of them (a real session upgraded with TOTP), and directly."""
    user = flows.register(kratos)
    flows.enable_totp(kratos, user)
    token = flows.login_api(kratos, user)
    flows.upgrade_to_aal2(kratos, user, token)
    client = KratosClient(kratos.public_url, "ory_kratos_session", 5)
    try:
        answer = client.whoami(extract(HeaderView([("x-session-token", token)]), "c"))
    finally:
        client.close()
    session = MirroredSession.from_kratos(answer, now_ms())
    metrics.session_events().aal2_recorded(session, aal2_event(session, now_ms()))
    metrics.aal2_event("webauthn")

    found = samples(metrics.exposition()[0])
    assert named(found, "bridge_aal2_events_total") == {
        frozenset({("method", "totp")}): 1,
        frozenset({("method", "webauthn")}): 1,
    }


def test_active_sessions_are_read_at_scrape_time_and_left_out_without_a_hook(metrics):
    counts = iter([7, 9])
    assert (
        value(samples(metrics.exposition(lambda: next(counts))[0]), "bridge_active_sessions") == 7
    )
    assert (
        value(samples(metrics.exposition(lambda: next(counts))[0]), "bridge_active_sessions") == 9
    )
    assert "bridge_active_sessions" not in metrics.exposition(None)[0].decode()

    def store_down() -> int:
        raise StoreUnavailable("Redis: ConnectionError")

    body, content_type = metrics.exposition(store_down)
    assert "bridge_active_sessions" not in body.decode()
    assert value(samples(body), "bridge_negative_cache_hits_total") == 0
    assert content_type.startswith("text/plain; version=")


def test_every_thread_is_counted_exactly_also_after_it_ends():
    """Each thread counts into its own table while the flusher reads them all, as fast
    as it can; a thread's table outlives the thread, and is not counted twice."""
    metrics = Metrics(flush_interval=0.0001)
    watch = metrics.decision_watcher()

    def decide(times: int) -> None:
        for _ in range(times):
            watch("nginx", "GET", HeaderView([]), ALLOW, trace(tier="process"))

    def run_threads(count: int, times: int) -> None:
        threads = [threading.Thread(target=decide, args=(times,)) for _ in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def allowed() -> float:
        found = samples(metrics.exposition()[0])
        return value(
            found, "bridge_decisions_total",
            dialect="nginx", rule="default", outcome="allow", tier="process",
        )  # fmt: skip

    try:
        run_threads(8, 20_000)
        assert allowed() == 160_000
        assert allowed() == 160_000
        decide(5)
        run_threads(3, 1_000)
        assert allowed() == 163_005
    finally:
        metrics.close()


def _worker(directory: str, decisions: int, ending: str) -> None:
    """A worker process: ``clean`` closes, ``exit`` just returns (the exit finalizer
    flushes), ``killed`` flushes, decides twice more and dies at once."""
    metrics = Metrics(directory, flush_interval=3600)
    watch = metrics.decision_watcher()
    for _ in range(decisions):
        watch("nginx", "GET", HeaderView([]), ALLOW, trace(20_000, tier="process"))
    metrics.kratos_call(200, 0.004)
    metrics.aal2_event("totp")
    if ending == "clean":
        metrics.close()
    elif ending == "killed":
        metrics.flush()
        watch("nginx", "GET", HeaderView([]), ALLOW, trace(20_000, tier="process"))
        watch("nginx", "GET", HeaderView([]), ALLOW, trace(20_000, tier="process"))
        os._exit(0)


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_worker_processes_add_up_and_dead_ones_still_count(tmp_path, start_method):
    context = multiprocessing.get_context(start_method)
    directory = str(tmp_path)
    for decisions, ending in ((2, "clean"), (4, "exit"), (3, "killed")):
        worker = context.Process(target=_worker, args=(directory, decisions, ending))
        worker.start()
        worker.join()
        assert worker.exitcode == 0
    scraper = Metrics(directory)
    try:
        scraper.decision_watcher()("nginx", "GET", HeaderView([]), ALLOW, trace(tier="process"))
        found = samples(scraper.exposition()[0])
    finally:
        scraper.close()

    allowed = dict(dialect="nginx", rule="default", outcome="allow", tier="process")
    assert value(found, "bridge_decisions_total", **allowed) == 2 + 4 + 3 + 1
    latency = "bridge_decision_duration_seconds_bucket"
    assert value(found, latency, tier="process", le="1e-05") == 1
    assert value(found, latency, tier="process", le="2.5e-05") == 10
    assert value(found, "bridge_kratos_request_duration_seconds_count", status="200") == 3
    assert value(found, "bridge_kratos_request_duration_seconds_sum", status="200") == (
        pytest.approx(0.012)
    )
    assert value(found, "bridge_aal2_events_total", method="totp") == 3
    assert len(list(tmp_path.glob("*.db"))) == 2 * 4  # each Metrics' own two files, kept
    assert Path(directory).is_dir()  # the shared directory is not ours to remove


def test_without_a_multiprocess_directory_a_private_one_is_used_and_removed(monkeypatch):
    monkeypatch.delenv(MULTIPROC_DIR_ENV, raising=False)
    metrics = Metrics()
    metrics.aal2_event("totp")
    assert b'bridge_aal2_events_total{method="totp"} 1.0' in metrics.exposition()[0]
    assert Path(metrics.directory).is_dir()
    metrics.close()
    metrics.close()
    assert not Path(metrics.directory).exists()


def test_prepare_multiprocess_dir_makes_one_or_empties_the_named_one(monkeypatch, tmp_path):
    monkeypatch.delenv(MULTIPROC_DIR_ENV, raising=False)
    made = prepare_multiprocess_dir()
    assert os.environ[MULTIPROC_DIR_ENV] == made
    assert Path(made).is_dir() and not any(Path(made).iterdir())

    named_dir = tmp_path / "prometheus"
    named_dir.mkdir()
    (named_dir / "counter_1234.db").write_bytes(b"old run")
    (named_dir / "README").write_text("not ours")
    monkeypatch.setenv(MULTIPROC_DIR_ENV, str(named_dir))
    assert prepare_multiprocess_dir() == str(named_dir)
    assert sorted(p.name for p in named_dir.iterdir()) == ["README"]
    metrics = Metrics()
    try:
        assert metrics.directory == str(named_dir)
    finally:
        metrics.close()
    assert named_dir.is_dir()


def test_metrics_of_a_real_bridge_with_two_workers(kratos, redis_server, workdir, prefix, tmp_path):
    admin_port = free_port()
    multiproc_dir = tmp_path / "prometheus"
    server = BridgeServer(
        {
            "BRIDGE_KRATOS_PUBLIC_URL": kratos.public_url,
            "BRIDGE_KRATOS_ADMIN_URL": kratos.admin_url,
            "BRIDGE_REDIS_URL": redis_server.url,
            "BRIDGE_SECRET": SECRET,
            "BRIDGE_KEY_PREFIX": prefix,
            "BRIDGE_WORKERS": "2",
            "BRIDGE_ADMIN_PORT": str(admin_port),
            MULTIPROC_DIR_ENV: str(multiproc_dir),
        },
        workdir,
    )
    admin = f"http://127.0.0.1:{admin_port}"
    try:
        wait_until(lambda: httpx.get(admin + "/health/alive").status_code == 200, 30, "admin")
        user = flows.register(kratos)
        for _ in range(5):
            answer = httpx.get(server.url + "/auth", headers={"X-Session-Token": user.token})
            assert answer.status_code == 200
        forged = {"X-Session-Token": "ory_st_" + secrets.token_hex(16)}
        for _ in range(2):
            assert httpx.get(server.url + "/auth", headers=forged).status_code == 401

        def scrape() -> dict:
            response = httpx.get(admin + "/metrics")
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/plain")
            return samples(response.content)

        def by_outcome(found: dict, outcome: str) -> float:
            return sum(
                v
                for labels, v in named(found, "bridge_decisions_total").items()
                if ("outcome", outcome) in labels and ("dialect", "nginx") in labels
            )

        def all_counted() -> bool:
            found = scrape()
            return (
                by_outcome(found, "allow") == 5
                and by_outcome(found, "session_invalid") == 2
                and (value(found, "bridge_active_sessions") or 0) >= 1
            )

        # The other worker's counts arrive with its next flush, and the session is
        # registered with the analytics' next report (each within a second).
        wait_until(all_counted, 10, "both workers' decisions")
        found = scrape()
        assert by_outcome(found, "allow") == 5
        assert value(found, "bridge_negative_cache_hits_total") == 1
        kratos_tier = sum(
            v
            for labels, v in named(found, "bridge_decisions_total").items()
            if ("tier", "kratos") in labels
        )
        assert kratos_tier >= 1
        kratos_calls = "bridge_kratos_request_duration_seconds_count"
        assert value(found, kratos_calls, status="401") == 1
        assert value(found, kratos_calls, status="200") >= 1
        assert any(multiproc_dir.glob("counter_*.db"))
    finally:
        server.stop()
    assert "Traceback" not in server.log()
