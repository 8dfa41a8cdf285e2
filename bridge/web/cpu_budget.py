"""How many server processes ``serve`` starts: one per CPU the bridge may use, and why.

"May use" is the smaller of two budgets: the CPUs in the affinity mask (a cpuset,
``taskset``) and the CPU quota of the bridge's cgroup or of any parent up to the mount
root (a container's CPU limit, which the affinity mask does not show: a 1-CPU container
on a 16-core node sees 16 CPUs). Processes beyond the quota share its time and cost more
CPU per request each (README, "Why Granian, and why ASGI"). A cgroup file that cannot be
read or makes no sense is left out and named in the reason; it never stops the server.

Every file is read under ``root``, so a test can lay out a fake ``/proc`` and
``/sys/fs/cgroup``.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from bridge.config import Settings

_COUNT = re.compile(r"[1-9][0-9]{0,17}")  # microseconds; 0, a sign or a fraction is garbled


@dataclass(frozen=True, slots=True)
class WorkerCount:
    count: int
    reason: str  # e.g. "BRIDGE_WORKERS=4", "CPU quota 0.5 (…), rounded up"

    def as_json(self) -> dict[str, object]:
        return {"count": self.count, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class CpuQuota:
    cpus: float  # quota / period: 1.5 = one and a half CPUs' time
    source: str  # the file and what it said, e.g. "cgroup v2 /sys/fs/cgroup/cpu.max 50000 100000"


def worker_count(
    settings: Settings, root: Path = Path("/"), affinity: int | None = None
) -> WorkerCount:
    """The embedded store's single process, ``BRIDGE_WORKERS`` when set, else the CPU
    budget (``affinity``: the CPUs in the mask; by default this process's)."""
    if settings.redis_url is None:
        return WorkerCount(1, "embedded store: one process")
    if settings.workers:
        return WorkerCount(settings.workers, f"BRIDGE_WORKERS={settings.workers}")
    if affinity is None:
        affinity = len(os.sched_getaffinity(0))
    return cpu_budget(affinity, root)


def cpu_budget(affinity: int, root: Path = Path("/")) -> WorkerCount:
    """The CPU quota rounded up, capped by ``affinity``; ``affinity`` without a quota."""
    quota, ignored = cpu_quota(root)
    in_mask = f"{affinity} CPU{'' if affinity == 1 else 's'} in the affinity mask"
    if quota is None:
        count, reason = affinity, f"{in_mask}, no CPU quota"
    else:
        count = math.ceil(quota.cpus)
        reason = f"CPU quota {quota.cpus:g} ({quota.source})"
        if count > affinity:
            count, reason = affinity, f"{reason}, capped by {in_mask}"
        elif count != quota.cpus:
            reason += ", rounded up"
    if ignored:
        reason += "; ignored " + "; ".join(ignored)
    return WorkerCount(max(1, count), reason)


def cpu_quota(root: Path = Path("/")) -> tuple[CpuQuota | None, list[str]]:
    """The smallest CPU quota on this process's cgroups (v2 and v1) and their parents,
    ``None`` when there is none; and the files left out, with why."""
    ignored: list[str] = []
    memberships = _memberships(_read(root, "/proc/self/cgroup", ignored) or "")
    quotas: list[CpuQuota] = []
    for version, mountpoint, mount_root in _mounts(_read(root, "/proc/self/mountinfo", ignored)):
        path = memberships.get(version)
        if path is None:
            continue
        read = _read_v2 if version == "v2" else _read_v1
        for directory in _up_to_mount(mountpoint, mount_root, path):
            quota = read(root, directory, ignored)
            if quota is not None:
                quotas.append(quota)
    return min(quotas, key=lambda quota: quota.cpus, default=None), ignored


def _memberships(text: str) -> dict[str, str]:
    """``/proc/self/cgroup`` -> the cgroup path per version: "v2" from the ``0::/path``
    line, "v1" from the line whose controllers include ``cpu``."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            found.setdefault("v2", path)
        elif "cpu" in controllers.split(","):
            found.setdefault("v1", path)
    return found


def _mounts(text: str | None) -> list[tuple[str, str, str]]:
    """``/proc/self/mountinfo`` -> (version, mount point, the cgroup it shows as its root)
    for the cgroup2 mount and the cgroup v1 mount with the ``cpu`` controller."""
    mounts = []
    for line in (text or "").splitlines():
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        after = fields.index("-", 6)
        kind, options = fields[after + 1 : after + 2], fields[after + 3 : after + 4]
        mount_root, mountpoint = fields[3:5]
        if kind == ["cgroup2"]:
            mounts.append(("v2", mountpoint, mount_root))
        elif kind == ["cgroup"] and options and "cpu" in options[0].split(","):
            mounts.append(("v1", mountpoint, mount_root))
    return mounts


def _up_to_mount(mountpoint: str, mount_root: str, path: str) -> list[PurePosixPath]:
    """The cgroup's directory under the mount, then each parent up to the mount point.
    A mount shows the hierarchy from ``mount_root`` down (a container's own cgroup, say);
    a cgroup outside what it shows is read at the mount point."""
    inside = PurePosixPath(path)
    if mount_root != "/":
        try:
            inside = PurePosixPath("/") / inside.relative_to(mount_root)
        except ValueError:
            inside = PurePosixPath("/")
    parts = [part for part in inside.parts[1:] if part not in ("", ".", "..")]
    base = PurePosixPath(mountpoint)
    return [base.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def _read(root: Path, path: str | PurePosixPath, ignored: list[str]) -> str | None:
    """The file's text; ``None`` when there is none (no limit there, or not Linux) or it
    cannot be read (then named in ``ignored``)."""
    try:
        return (root / str(path).lstrip("/")).read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        why = error.strerror if isinstance(error, OSError) else "not text"
        ignored.append(f"{path} (unreadable: {why})")
        return None


def _read_v2(root: Path, directory: PurePosixPath, ignored: list[str]) -> CpuQuota | None:
    """``cpu.max``: "max 100000" is no quota, "150000 100000" 1.5 CPUs."""
    path = directory / "cpu.max"
    text = _read(root, path, ignored)
    words = [] if text is None else text.split()
    if text is None or words[:1] == ["max"]:
        return None
    quota, period = words if len(words) == 2 else ("", "")
    said = f"cgroup v2 {path} {text.strip()[:40]}".rstrip()
    return _quota(quota, period, said, ignored)


def _read_v1(root: Path, directory: PurePosixPath, ignored: list[str]) -> CpuQuota | None:
    """``cpu.cfs_quota_us`` over ``cpu.cfs_period_us``; a quota of -1 is none."""
    quota_path = directory / "cpu.cfs_quota_us"
    quota = _read(root, quota_path, ignored)
    if quota is None or quota.strip() == "-1":
        return None
    period = _read(root, directory / "cpu.cfs_period_us", ignored)
    if period is None:
        return None
    quota, period = quota.strip()[:20], period.strip()[:20]
    said = f"cgroup v1 {quota_path} {quota}, cpu.cfs_period_us {period}"
    return _quota(quota, period, said, ignored)


def _quota(quota: str, period: str, said: str, ignored: list[str]) -> CpuQuota | None:
    """``said`` (the file and its words) names the quota, or why it was left out."""
    if not (_COUNT.fullmatch(quota) and _COUNT.fullmatch(period)):
        ignored.append(f"{said} (garbled)")
        return None
    return CpuQuota(int(quota) / int(period), said)
