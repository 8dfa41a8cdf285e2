"""What one request costs the bridge, by path: a warm hit, a re-validation, a rejection.

Not a test: it prints figures. In one process, against a real redis-server and Kratos
(the test suite's build and config), it drives the forward-auth decision the way the
server does (``begin`` on the event loop, ``finish`` on a worker) and reports the CPU
time of this process per request (``time.process_time``: Python, the Redis and Kratos
clients, and the kernel's share of their sockets; not the server's HTTP layer, which
``bench/peers.py`` measures whole) and the Redis round trips per request (script calls,
counted where redis-py sends a command or a pipeline, on the threads that answer the
requests; "background" is the round trips of the bridge's own threads during the row, in
all: analytics reports, device-change records, the subscription's pings).

Each row has a bridge of its own. A warm row first has that bridge ask Kratos for each
session after its subscription to ended sessions is up (a bridge keeps no copy validated
before then: a revocation announced earlier may have passed it by), and the run stops if
a warm row's requests made any Redis round trip: it would not be measuring a warm hit.

The rows marked "steps on the loop" drive the coroutine pieces of a miss directly
(``RedisStore.on_loop()`` and ``KratosClient.whoami_async``: lookup, whoami, save or
forget, as the mirror's miss makes them), with no mirror, single flight or deadline
around them: what a miss on the event loop would cost at least, before it is wired.

    python bench/costs.py [--requests 2000] [--sessions 20]
        [--topology standalone|sentinel|cluster]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import string
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
import redis.asyncio.connection  # noqa: E402

from bridge.clock import now_ms  # noqa: E402
from bridge.config import load_settings  # noqa: E402
from bridge.errors import SessionInvalid  # noqa: E402
from bridge.pipeline.credentials import Credential, Fingerprints, Kind  # noqa: E402
from bridge.pipeline.forward_auth import Pending  # noqa: E402
from bridge.pipeline.tokens import generate_key  # noqa: E402
from bridge.sessions.session import MirroredSession, aal2_event  # noqa: E402
from bridge.store.base import Rejection  # noqa: E402
from bridge.web.request import HeaderView  # noqa: E402
from bridge.wiring import Bridge, build_bridge  # noqa: E402
from tests.support import kratos_flows as flows  # noqa: E402
from tests.support.harness import Kratos  # noqa: E402
from tests.support.topologies import ClusterSet, SentinelSet, Standalone  # noqa: E402

TOPOLOGIES = {"standalone": Standalone, "sentinel": SentinelSet, "cluster": ClusterSet}
FORWARDED = (
    ("x-forwarded-method", "GET"),
    ("x-forwarded-proto", "https"),
    ("x-forwarded-host", "app.example.com"),
    ("x-forwarded-uri", "/reports/2026?page=2"),
)


REQUEST_THREADS = "bench-request"
"""Name prefix of the threads the bench answers requests on besides the main thread (the
gRPC check's workers); Redis round trips made on any other thread are the bridge's
background work (analytics reports, device-change records, the subscription's pings)."""


class RoundTrips:
    """Round trips this process made to Redis: each send of one command, or of one
    pipeline, is one (counted where redis-py writes to the socket), on the threads that
    answer requests (``on_requests``) or in the background (``background``)."""

    on_requests = 0
    background = 0

    @classmethod
    def install(cls) -> None:
        original = redis.connection.AbstractConnection.send_packed_command

        def counted(self, command, check_health=True):
            cls._count()
            return original(self, command, check_health)

        redis.connection.AbstractConnection.send_packed_command = counted
        on_loop = redis.asyncio.connection.AbstractConnection.send_packed_command

        async def counted_on_loop(self, command, check_health=True):
            cls._count()
            return await on_loop(self, command, check_health)

        redis.asyncio.connection.AbstractConnection.send_packed_command = counted_on_loop

    @classmethod
    def mark(cls) -> tuple[int, int]:
        return cls.on_requests, cls.background

    @classmethod
    def since(cls, mark: tuple[int, int]) -> tuple[int, int]:
        return cls.on_requests - mark[0], cls.background - mark[1]

    @classmethod
    def _count(cls) -> None:
        thread = threading.current_thread()
        if thread is threading.main_thread() or thread.name.startswith(REQUEST_THREADS):
            cls.on_requests += 1
        else:
            cls.background += 1


def validated_here(bridge: Bridge, tokens: list[str], within: float = 10.0) -> None:
    """Have ``bridge`` ask Kratos for each session until it keeps every copy in memory.
    Its subscription to ended sessions starts when it is built, and every copy validated
    before the subscription is up is dropped and never kept (the product's rule), so a
    copy asked for too early is asked for again; the copies are kept once they are
    still there a moment after all were asked for."""
    credentials = [Credential(Kind.TOKEN, (token,)) for token in tokens]
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        cold = [c for c in credentials if bridge.mirror.from_memory(c) is None]
        if not cold:
            time.sleep(0.2)  # a subscription that came up just now would have dropped them
            if all(bridge.mirror.from_memory(c) is not None for c in credentials):
                return
            continue
        for credential in cold:
            bridge.mirror.resolve(credential, refresh=True)
    raise SystemExit(f"bench: the bridge kept no copy of its sessions within {within:.0f} s")


def report(
    name: str, status: int, cpu_us: float, trips: tuple[int, int], requests: int, warm: bool
) -> None:
    on_requests, background = trips
    print(f"{name:<52}{status:>7}{cpu_us:>12.1f}{on_requests / requests:>16.2f}{background:>12}")
    if warm and on_requests:
        raise SystemExit(
            f"bench: {name!r} is not warm: {on_requests} Redis round trips in {requests} requests"
        )


def measure(name, bridge, views, requests, *, warm=False, path="/auth"):
    forward_auth = bridge.forward_auth
    dialect = forward_auth.dialect_for(path)

    def one(i: int):
        step = forward_auth.begin(dialect, views[i % len(views)], "GET", path, "")
        return forward_auth.finish(step) if isinstance(step, Pending) else step

    warm_up = 200
    for i in range(warm_up):
        one(i)  # connections open, copies and scripts loaded
    # Forged tokens are not reused: each counted one is new to the bridge.
    offset = 0 if warm else warm_up
    trips = RoundTrips.mark()
    started = time.process_time()
    for i in range(offset, offset + requests):
        reply = one(i)
    cpu_us = (time.process_time() - started) / requests * 1e6
    report(name, reply.status, cpu_us, RoundTrips.since(trips), requests, warm)


def measure_steps_on_loop(name, bridge, tokens, requests):
    """A miss's steps as coroutines on one event loop, as ``SessionMirror._fetch`` and
    ``_ask_kratos`` make them with ``BRIDGE_REVALIDATE_AFTER=0`` (no lock): lookup, whoami,
    then save (accepted) or forget (refused). Not the request path: no mirror, single
    flight, deadline or answer around them."""
    fingerprints = Fingerprints(bridge.settings.secret)
    credentials = [Credential(Kind.TOKEN, (token,)) for token in tokens]
    kratos = bridge.kratos

    async def run(first: int, count: int) -> int:
        store = bridge.store.on_loop()
        status = 0
        for i in range(first, first + count):
            credential = credentials[i % len(credentials)]
            fingerprint = fingerprints.of(credential)
            found = await store.lookup(fingerprint, now_ms(), 0, 0, with_app=False)
            asked_at = now_ms()
            try:
                answer = await kratos.whoami_async(credential)
            except SessionInvalid:
                rejection = Rejection(now_ms(), 5000)
                await store.forget(fingerprint, found.session, rejection, None)
                status = 401
                continue
            session = MirroredSession.from_kratos(answer, asked_at)
            seen_at = now_ms()
            await store.save(fingerprint, session, aal2_event(session, seen_at), seen_at, None)
            status = 200
        await store.aclose()
        return status

    warm_up = 200
    asyncio.run(run(0, warm_up))
    trips = RoundTrips.mark()
    started = time.process_time()
    status = asyncio.run(run(warm_up, requests))
    cpu_us = (time.process_time() - started) / requests * 1e6
    report(name, status, cpu_us, RoundTrips.since(trips), requests, False)


class _Envoy:
    """The gRPC context of a check: only its peer is read."""

    def peer(self) -> str:
        return "ipv4:127.0.0.1:40000"


def check_request(token: str) -> bytes:
    """Envoy's CheckRequest for the request FORWARDED describes, with ``token``."""
    from envoy.service.auth.v3.attribute_context_pb2 import AttributeContext
    from envoy.service.auth.v3.external_auth_pb2 import CheckRequest

    original = dict(FORWARDED)
    http = AttributeContext.HttpRequest(
        method=original["x-forwarded-method"],
        path=original["x-forwarded-uri"],
        host=original["x-forwarded-host"],
        scheme=original["x-forwarded-proto"],
        headers={"x-session-token": token, "x-forwarded-proto": original["x-forwarded-proto"]},
    )
    context = AttributeContext(request=AttributeContext.Request(http=http))
    return CheckRequest(attributes=context).SerializeToString()


def measure_grpc(name, bridge, tokens, requests, *, warm=False):
    """As ``measure``, for Envoy's gRPC check as ``bridge.web.envoy_grpc`` answers it: the
    ``CheckRequest`` parsed, the decision (``begin`` on the loop, ``finish`` on a worker),
    the ``CheckResponse`` serialized; not grpcio's transport."""
    from envoy.service.auth.v3.external_auth_pb2 import CheckResponse

    from bridge.web.envoy_grpc import Checks

    pool = ThreadPoolExecutor(4, thread_name_prefix=REQUEST_THREADS)
    checks = Checks(bridge.forward_auth, pool, bridge.settings.request_budget)
    data = [check_request(token) for token in tokens]
    envoy = _Envoy()

    async def run(first: int, count: int) -> bytes:
        answer = b""
        for i in range(first, first + count):
            answer = await checks.check(data[i % len(data)], envoy)
        return answer

    warm_up = 200
    asyncio.run(run(0, warm_up))
    offset = 0 if warm else warm_up
    trips = RoundTrips.mark()
    started = time.process_time()
    answer = CheckResponse.FromString(asyncio.run(run(offset, requests)))
    cpu_us = (time.process_time() - started) / requests * 1e6
    pool.shutdown()
    status = answer.denied_response.status.code if answer.status.code else 200
    report(name, status, cpu_us, RoundTrips.since(trips), requests, warm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--topology", choices=sorted(TOPOLOGIES), default="standalone")
    args = parser.parse_args()
    RoundTrips.install()

    work = Path(tempfile.mkdtemp())
    topology = TOPOLOGIES[args.topology](work / args.topology)
    kratos = Kratos(work, lifespan="24h")
    try:
        users = [flows.register(kratos) for _ in range(args.sessions)]
        tokens = [user.token for user in users]
        valid = [HeaderView([("x-session-token", token)]) for token in tokens]
        letters = string.ascii_letters + string.digits
        forged_tokens = [
            "ory_st_" + "".join(secrets.choice(letters) for _ in range(32))
            for _ in range(args.requests + 200)
        ]
        forged = [HeaderView([("x-session-token", token)]) for token in forged_tokens]

        @contextlib.contextmanager
        def bridge(revalidate_after: str, **env: str):
            """A bridge of the row's own, closed after it; with a window to keep copies
            in (a warm row's), one that has validated every session itself."""
            built = build_bridge(
                load_settings(
                    {
                        "BRIDGE_KRATOS_PUBLIC_URL": kratos.public_url,
                        "BRIDGE_KRATOS_ADMIN_URL": kratos.admin_url,
                        "BRIDGE_REDIS_URL": topology.url,
                        "BRIDGE_SECRET": "bench-" + "s" * 40,
                        "BRIDGE_REVALIDATE_AFTER": revalidate_after,
                        **env,
                    }
                )
            )
            try:
                if float(revalidate_after) > 0:
                    validated_here(built, tokens)
                yield built
            finally:
                built.close()

        # Traefik's request: the original request in X-Forwarded-* (bench/peers.py's too).
        forwarded = [HeaderView([("x-session-token", token), *FORWARDED]) for token in tokens]
        generate_key(work / "jwt")
        rules = {"BRIDGE_RULES_FILE": str(ROOT / "bench" / "peers" / "rules-20.yml")}
        jwt = {"BRIDGE_JWT_HEADER": "X-Bridge-Jwt", "BRIDGE_JWT_KEYS_DIR": str(work / "jwt")}

        print(
            f"{'path':<52}{'status':>7}{'CPU us/req':>12}{'Redis trips/req':>16}{'background':>12}"
        )
        off = {"BRIDGE_ANALYTICS": "false", "BRIDGE_METRICS": "false"}
        for name, env in (
            ("warm hit (process copy)", {}),
            ("warm hit, analytics and metrics off", off),
        ):
            with bridge("3600", **env) as warm:
                measure(name, warm, valid, args.requests * 10, warm=True)
        # Device-change check: the user agent Kratos recorded, or another one (a change,
        # recorded once, then compared on every request).
        recorded_ua = flows.session_of(kratos, token=tokens[0]).json()["devices"][0]["user_agent"]
        same_device = [
            HeaderView([("x-session-token", token), ("user-agent", recorded_ua), *FORWARDED])
            for token in tokens
        ]
        new_device = [
            HeaderView([("x-session-token", token), ("user-agent", "Other/1.0"), *FORWARDED])
            for token in tokens
        ]
        for name, env, views in (
            (
                "warm hit, /forward-auth, device check off",
                {"BRIDGE_ON_DEVICE_CHANGE": "off"},
                same_device,
            ),
            ("warm hit, /forward-auth, same device", {}, same_device),
            ("warm hit, /forward-auth, changed device", {}, new_device),
            ("warm hit, /forward-auth", {}, forwarded),
            ("warm hit, /forward-auth, analytics and metrics off", off, forwarded),
            ("warm hit, /forward-auth, 20 rules", rules, forwarded),
            ("warm hit, /forward-auth, JWT", jwt, forwarded),
            ("warm hit, /forward-auth, 20 rules + JWT", {**rules, **jwt}, forwarded),
        ):
            with bridge("3600", **env) as warm:
                measure(name, warm, views, args.requests * 10, warm=True, path="/forward-auth")
        with bridge("0") as cold:
            measure("re-validation (Kratos asked)", cold, valid, args.requests)
        with bridge("0") as cold:
            measure("rejection (forged token)", cold, forged, args.requests)
        with bridge("0") as cold:
            on_loop = hasattr(cold.store, "on_loop")
        if on_loop:
            loop_steps = "steps on the loop: "
            with bridge("0") as cold:
                measure_steps_on_loop(loop_steps + "re-validation", cold, tokens, args.requests)
            with bridge("0") as cold:
                measure_steps_on_loop(loop_steps + "rejection", cold, forged_tokens, args.requests)
        # Envoy's gRPC ext_authz: the same decisions, read from and written as protobuf.
        grpc = "warm hit, gRPC Check"
        with bridge("3600") as warm:
            measure_grpc(grpc, warm, tokens, args.requests * 10, warm=True)
        with bridge("3600", **rules, **jwt) as warm:
            measure_grpc(grpc + ", 20 rules + JWT", warm, tokens, args.requests * 10, warm=True)
        with bridge("0") as cold:
            measure_grpc("re-validation, gRPC Check", cold, tokens, args.requests)
        with bridge("0") as cold:
            measure_grpc("rejection (forged token), gRPC Check", cold, forged_tokens, args.requests)
    finally:
        kratos.stop()
        topology.stop()


if __name__ == "__main__":
    main()
