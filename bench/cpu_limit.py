"""A container's CPU limit, reproduced for a benchmark's servers.

A program in a container started with a CPU limit (``docker run --cpus 1``, a Kubernetes
``limits.cpu``) sees every CPU of the node in its affinity mask and gets its limit from a
CFS quota on its cgroup. Whatever sizes itself from the affinity mask (the bridge's
default worker count, Go's GOMAXPROCS) sizes itself for the node, then shares one CPU's
worth of time. ``CpuQuota`` starts programs that way; ``pin_tree`` then pins a started
program to one CPU, so that a load generator can keep another CPU to itself.
``cpu_affinity`` starts programs already pinned instead (a cpuset, ``taskset``): they see
only the CPUs they are pinned to.

Needs root and a writable cgroup ``cpu`` controller: cgroup v1 (``cpu.cfs_quota_us`` and
``cpu.cfs_period_us``) or cgroup v2 (``cpu.max``). ``CpuQuota.find()`` answers None
without them.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.measure import process_tree

PERIOD_US = 100_000
V1_CPU = Path("/sys/fs/cgroup/cpu")
V2_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class CpuQuota:
    """Where cgroups with a CPU quota are made: under the root of cgroup v1's cpu
    hierarchy, or of the cgroup v2 tree (whose root may hold processes, so its
    children need nothing but ``+cpu`` in its ``cgroup.subtree_control``)."""

    root: Path
    version: int

    @staticmethod
    def find() -> CpuQuota | None:
        if (V1_CPU / "cpu.cfs_quota_us").exists():
            found = CpuQuota(V1_CPU, 1)
        elif "cpu" in _read(V2_ROOT / "cgroup.controllers").split():
            found = CpuQuota(V2_ROOT, 2)
        else:
            return None
        try:
            if found.version == 2:
                (V2_ROOT / "cgroup.subtree_control").write_text("+cpu")
            found.remove(found.make("probe", cpus=1))
        except OSError:
            return None
        return found

    def describe(self) -> str:
        if self.version == 1:
            return f"cgroup v1, cpu.cfs_quota_us = cpu.cfs_period_us = {PERIOD_US}"
        return f"cgroup v2, cpu.max = {PERIOD_US} {PERIOD_US}"

    def make(self, name: str, cpus: int) -> Path:
        """The cgroup NAME of this run, allowed CPUS CPUs' worth of time per period."""
        group = self.root / f"ksb-bench-{os.getpid()}-{name}"
        group.mkdir(exist_ok=True)
        if self.version == 1:
            (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(cpus * PERIOD_US))
        else:
            (group / "cpu.max").write_text(f"{cpus * PERIOD_US} {PERIOD_US}")
        return group

    @contextlib.contextmanager
    def inside(self, group: Path) -> Iterator[None]:
        """Processes started inside begin in GROUP: this process moves into it (every
        thread: cgroup.procs) and back out, so that it works for any way of starting one."""
        home = self._home()
        (group / "cgroup.procs").write_text(str(os.getpid()))
        try:
            yield
        finally:
            (home / "cgroup.procs").write_text(str(os.getpid()))

    def remove(self, group: Path, timeout: float = 5) -> None:
        """Remove GROUP once its processes have gone (a stopped server's last processes
        may take a moment to be reaped)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                group.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _home(self) -> Path:
        """This process's own cgroup in the hierarchy (the root when its path does not
        exist there, as in a container whose cgroup is mounted as the root)."""
        for line in _read(Path("/proc/self/cgroup")).splitlines():
            _, controllers, path = line.split(":", 2)
            mine = "cpu" in controllers.split(",") if self.version == 1 else controllers == ""
            if mine and (self.root / path.lstrip("/")).is_dir():
                return self.root / path.lstrip("/")
        return self.root


@contextlib.contextmanager
def cpu_affinity(cpus: set[int]) -> Iterator[None]:
    """Processes started inside begin pinned to CPUS (as under ``taskset``): they inherit
    this thread's CPU set."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def pin_tree(pid: int, cpus: set[int]) -> None:
    """Pin every thread of every process of PID's tree to CPUS (``taskset -a -p``, for
    each process). Twice: a thread started while the first pass ran may have been created
    by one not yet pinned; new ones afterwards inherit their creator's CPUs."""
    for _ in range(2):
        for member in process_tree(pid):
            for task in Path(f"/proc/{member}/task").glob("*"):
                with contextlib.suppress(ProcessLookupError, FileNotFoundError):
                    os.sched_setaffinity(int(task.name), cpus)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
