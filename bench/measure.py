"""What the benchmarks read: wrk's and ghz's summaries, and a process tree's CPU time and
memory from /proc.

Shared by bench/auth_bench.py and bench/peers.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path


def run_wrk(
    url: str,
    script: Path,
    *,
    connections: int,
    duration: float,
    env: Mapping[str, str] | None = None,
    prefix: tuple[str, ...] = (),
) -> str:
    """Run ``wrk -t1 --latency`` with a Lua script; return its standard output.

    ``prefix`` goes before ``wrk`` on the command line (e.g. ``taskset -c 1``)."""
    result = subprocess.run(
        [
            *prefix,
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{duration:g}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        check=True,
        timeout=duration + 60,
    )
    return result.stdout


def parse_wrk(out: str) -> dict[str, float]:
    """req/s, p50/p99 (ms), requests and non-2xx/3xx answers from wrk's summary."""

    def latency_ms(label: str) -> float:
        value, unit = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50": latency_ms("50"),
        "p99": latency_ms("99"),
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),
        "errors": int(errors.group(1)) if errors else 0,
        "socket_errors": sum(map(int, socket_errors.groups())) if socket_errors else 0,
    }


def run_ghz(
    ghz: Path,
    target: str,
    *,
    protoset: Path,
    call: str,
    data: Path,
    concurrency: int,
    connections: int,
    duration: float,
    prefix: tuple[str, ...] = (),
) -> str:
    """Run ghz (a gRPC load generator) for ``duration`` seconds: ``concurrency`` calls at a
    time over ``connections`` HTTP/2 connections, each call the next message of the JSON
    array in ``data`` (round robin); return its JSON summary."""
    result = subprocess.run(
        [
            *prefix,
            str(ghz),
            "--insecure",
            f"--protoset={protoset}",
            f"--call={call}",
            f"--data-file={data}",
            f"--concurrency={concurrency}",
            f"--connections={connections}",
            f"--duration={duration:g}s",
            "--format=json",
            target,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=duration + 60,
    )
    return result.stdout


# How ghz's calls still in flight when the duration ends fail: ghz closes its own
# connections under them (seen with v0.120.0), or cancels them.
_CUT_AT_THE_END = ("use of closed network connection", "code = Canceled")


def parse_ghz(out: str) -> dict:
    """The figures ``parse_wrk`` gives, from ghz's JSON summary, and ``sent``, ``codes``
    (calls by gRPC status) and ``error_kinds`` (calls by error message). The calls cut
    when the duration ends were sent but not completed, as wrk's in flight; every other
    call that did not end OK is an error (a denial is an OK call with a denied answer:
    not one)."""
    summary = json.loads(out)
    latency = {row["percentage"]: row["latency"] for row in summary["latencyDistribution"] or []}
    codes = summary.get("statusCodeDistribution") or {}
    kinds = summary.get("errorDistribution") or {}
    cut = sum(n for kind, n in kinds.items() if any(c in kind for c in _CUT_AT_THE_END))
    failed = sum(n for code, n in codes.items() if code != "OK")
    completed = int(summary["count"]) - cut
    return {
        "rps": completed / (summary["total"] / 1e9),  # ns
        "p50": latency.get(50, 0) / 1e6,  # ns -> ms
        "p99": latency.get(99, 0) / 1e6,
        "requests": completed,
        "errors": failed - cut,
        "socket_errors": 0,
        "sent": int(summary["count"]),
        "codes": codes,
        "error_kinds": kinds,
    }


def child_pids(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            children += [int(c) for c in task.read_text().split()]
        except FileNotFoundError:
            continue
    return children


def process_tree(pid: int) -> list[int]:
    pids, frontier = [pid], [pid]
    while frontier:
        frontier = [child for parent in frontier for child in child_pids(parent)]
        pids += frontier
    return pids


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children: a figure that a busy
    neighbour on the machine disturbs far less than requests per second."""
    total = 0
    for member in process_tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    """Resident memory (VmRSS) of a process and its children, summed, in MB (10^6 bytes).
    Pages that forked workers share are counted once per process."""
    total_kb = 0
    for member in process_tree(pid):
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except FileNotFoundError:
            continue
        found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        total_kb += int(found.group(1)) if found else 0
    return total_kb * 1024 / 1e6


def allowed_cpus(pid: int) -> set[str]:
    """The CPU lists (``Cpus_allowed_list``) of every thread of a process tree."""
    lists = set()
    for member in process_tree(pid):
        for status in Path(f"/proc/{member}/task").glob("*/status"):
            try:
                found = re.search(r"^Cpus_allowed_list:\s+(\S+)", status.read_text(), re.M)
            except FileNotFoundError:
                continue
            if found:
                lists.add(found.group(1))
    return lists
