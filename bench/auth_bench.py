"""Benchmark: warm /auth through the bridge beside the same load sent straight to Kratos.

Not a test: it prints figures. It starts redis-server, Kratos (the test suite's
build and config), the bridge as a real server, registers SESSIONS users, and
drives both endpoints with wrk (one connection pool, tokens rotated per request).

    python bench/auth_bench.py [--sessions 100] [--duration 10] [--connections 64]
                               [--workers 2] [--threads 4] [--server granian|waitress]

Kratos calls are counted by Kratos itself (its Prometheus request counter). CPU us
per request is the server side's user+system CPU (bridge and Kratos together for the
bridge row, Kratos alone for the direct row), read from /proc.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.measure import cpu_seconds, parse_wrk, run_wrk  # noqa: E402
from tests.support import kratos_flows as flows  # noqa: E402
from tests.support.harness import (  # noqa: E402
    BridgeServer,
    Kratos,
    RedisServer,
    free_port,
    stop_process,
    wait_until,
)

WRK_SCRIPT = """
local tokens = {}
for line in io.lines(os.getenv("BENCH_TOKENS")) do tokens[#tokens + 1] = line end
local i = 0
request = function()
  i = i + 1
  return wrk.format("GET", nil, {["X-Session-Token"] = tokens[(i % #tokens) + 1]})
end
"""


def wrk(url: str, tokens_file: Path, script: Path, args: argparse.Namespace) -> dict[str, float]:
    out = run_wrk(
        url,
        script,
        connections=args.connections,
        duration=args.duration,
        env={"BENCH_TOKENS": str(tokens_file)},
    )
    return parse_wrk(out)


def start_waitress(env: dict[str, str], threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    code = (
        "from waitress import serve; from bridge.web.app import create_app; "
        "from bridge.config import load_settings; "
        f"serve(create_app(load_settings()), host='127.0.0.1', port={port}, threads={threads})"
    )
    process = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **env})
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(url + "/health/alive").status_code == 200, 30, "waitress")
    return process, url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--revalidate-after", type=float, default=5.0)
    parser.add_argument("--server", choices=["granian", "waitress"], default="granian")
    parser.add_argument("--skip-direct", action="store_true")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk")

    work = Path(tempfile.mkdtemp(prefix="bridge-bench-"))
    redis_server = RedisServer(work)
    kratos = Kratos(work, lifespan="24h")
    bridge_process = None
    try:
        users = [flows.register(kratos) for _ in range(args.sessions)]  # SQLite: one writer
        tokens_file = work / "tokens.txt"
        tokens_file.write_text("\n".join(u.token for u in users) + "\n")
        script = work / "rotate.lua"
        script.write_text(WRK_SCRIPT)

        env = {
            "BRIDGE_KRATOS_PUBLIC_URL": kratos.public_url,
            "BRIDGE_KRATOS_ADMIN_URL": kratos.admin_url,
            "BRIDGE_REDIS_URL": redis_server.url,
            "BRIDGE_SECRET": os.urandom(24).hex(),
            "BRIDGE_REVALIDATE_AFTER": str(args.revalidate_after),
            "BRIDGE_WORKERS": str(args.workers),
            "BRIDGE_THREADS": str(args.threads),
            "BRIDGE_LOG_LEVEL": "warning",
        }
        if args.server == "granian":
            bridge = BridgeServer(env, work, patient=False)
            bridge_process, bridge_url = bridge.process, bridge.url
        else:
            bridge_process, bridge_url = start_waitress(env, args.threads)

        for user in users:  # warm the mirror: one Kratos call per session
            assert (
                httpx.get(bridge_url + "/auth", headers={"X-Session-Token": user.token}).status_code
                == 200
            )
        before = kratos.whoami_calls()
        started = time.monotonic()
        cpu_before = cpu_seconds(bridge_process.pid) + cpu_seconds(kratos.process.pid)
        through_bridge = wrk(bridge_url + "/auth", tokens_file, script, args)
        through_bridge["cpu"] = (
            cpu_seconds(bridge_process.pid) + cpu_seconds(kratos.process.pid) - cpu_before
        )
        elapsed = time.monotonic() - started
        kratos_calls = kratos.whoami_calls() - before
        stop_process(bridge_process)
        bridge_process = None

        direct = None
        if not args.skip_direct:
            cpu_before = cpu_seconds(kratos.process.pid)
            direct = wrk(kratos.public_url + "/sessions/whoami", tokens_file, script, args)
            direct["cpu"] = cpu_seconds(kratos.process.pid) - cpu_before

        print(
            f"\n{args.sessions} warm sessions, {args.connections} connections, "
            f"{args.duration}s each, wrk -t1; bridge: {args.server}, "
            f"workers={args.workers if args.server == 'granian' else 1}, "
            f"threads={args.threads}, revalidate_after={args.revalidate_after:g}s; "
            f"{os.cpu_count()} CPUs"
        )
        print(
            f"{'target':<28}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'non-2xx':>9}"
            f"{'kratos calls/1000':>19}{'server CPU us/req':>19}"
        )
        rows = [
            (
                "bridge /auth (warm)",
                through_bridge,
                1000 * kratos_calls / max(1, through_bridge["requests"]),
            )
        ]
        if direct:
            rows.append(("kratos /sessions/whoami", direct, 1000.0))
        for name, figures, per_1000 in rows:
            cpu_per_request = 1e6 * figures["cpu"] / max(1, figures["requests"])
            print(
                f"{name:<28}{figures['rps']:>10.0f}{figures['p50']:>9.2f}{figures['p99']:>9.2f}"
                f"{figures['errors']:>9}{per_1000:>19.2f}{cpu_per_request:>19.0f}"
            )
        if direct:
            print(f"speed-up: {through_bridge['rps'] / direct['rps']:.1f}x")
        if args.revalidate_after:
            # Each session was validated once before the run, so in `elapsed` seconds it can
            # need at most ceil(elapsed / revalidate_after) more calls if the bound holds.
            bound = math.ceil(elapsed / args.revalidate_after)
            print(
                f"kratos calls per session during the run: {kratos_calls / args.sessions:.2f} "
                f"(bound {bound}: one per {args.revalidate_after:g}s window over "
                f"{elapsed:.1f}s; {kratos_calls} calls, {args.sessions} sessions)"
            )
    finally:
        if bridge_process is not None:
            stop_process(bridge_process)
        kratos.stop()
        redis_server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
