"""How many server processes ``serve`` starts, and why: the CPU quota of the bridge's
cgroup (v2 or v1, or a parent's) rounded up and capped by the affinity mask, else the
mask; ``BRIDGE_WORKERS`` over both; one with the embedded store. Each cgroup tree is a
fake one under ``tmp_path``: nothing here reads or changes the machine's cgroups, except
the last test, which only reads them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bridge.config import load_settings
from bridge.web.cpu_budget import WorkerCount, cpu_budget, worker_count

V2_MOUNT = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev shared:4 - cgroup2 cgroup2 rw,nsdelegate"
V1_MOUNTS = (
    "31 23 0:27 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs ro,mode=755\n"
    "32 31 0:28 / /sys/fs/cgroup/memory rw,nosuid shared:8 - cgroup cgroup rw,memory\n"
    "33 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:9 - cgroup cgroup rw,cpu,cpuacct"
)
V1_DIR = "sys/fs/cgroup/cpu,cpuacct"


def _tree(root: Path, cgroup: str, mountinfo: str, files: dict[str, str]) -> Path:
    """A fake ``/proc/self`` and cgroup files under ``root``."""
    for path, text in {
        "proc/self/cgroup": cgroup,
        "proc/self/mountinfo": mountinfo + "\n",
        **files,
    }.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return root


def _v2(root: Path, path: str, files: dict[str, str]) -> Path:
    return _tree(root, f"0::{path}\n", V2_MOUNT, files)


def _cfs(directory: str, quota: str, period: str = "100000") -> dict[str, str]:
    """A v1 cgroup's quota and period files."""
    return {
        f"{directory}/cpu.cfs_quota_us": quota + "\n",
        f"{directory}/cpu.cfs_period_us": period + "\n",
    }


def _v1(root: Path, path: str, files: dict[str, str]) -> Path:
    cgroup = f"5:memory:{path}\n4:cpu,cpuacct:{path}\n0::/\n"
    return _tree(root, cgroup, V1_MOUNTS, files)


def test_v2_quota_is_rounded_up(tmp_path):
    root = _v2(tmp_path, "/", {"sys/fs/cgroup/cpu.max": "150000 100000\n"})
    assert cpu_budget(8, root) == WorkerCount(
        2, "CPU quota 1.5 (cgroup v2 /sys/fs/cgroup/cpu.max 150000 100000), rounded up"
    )


def test_a_whole_quota_is_the_count(tmp_path):
    root = _v2(tmp_path, "/", {"sys/fs/cgroup/cpu.max": "300000 100000\n"})
    assert cpu_budget(8, root) == WorkerCount(
        3, "CPU quota 3 (cgroup v2 /sys/fs/cgroup/cpu.max 300000 100000)"
    )


def test_v2_max_is_no_quota(tmp_path):
    root = _v2(tmp_path, "/", {"sys/fs/cgroup/cpu.max": "max 100000\n"})
    assert cpu_budget(4, root) == WorkerCount(4, "4 CPUs in the affinity mask, no CPU quota")


def test_a_quota_on_a_parent_cgroup_applies(tmp_path):
    """The container's own cgroup has none; the pod's, two levels up, has half a CPU."""
    root = _v2(
        tmp_path,
        "/kubepods/pod1/container1",
        {
            "sys/fs/cgroup/kubepods/cpu.max": "max 100000\n",
            "sys/fs/cgroup/kubepods/pod1/cpu.max": "50000 100000\n",
            "sys/fs/cgroup/kubepods/pod1/container1/cpu.max": "max 100000\n",
        },
    )
    assert cpu_budget(16, root) == WorkerCount(
        1, "CPU quota 0.5 (cgroup v2 /sys/fs/cgroup/kubepods/pod1/cpu.max 50000 100000), rounded up"
    )


def test_the_smallest_quota_on_the_way_up_wins(tmp_path):
    root = _v2(
        tmp_path,
        "/a/b",
        {
            "sys/fs/cgroup/a/cpu.max": "200000 100000\n",
            "sys/fs/cgroup/a/b/cpu.max": "400000 100000\n",
        },
    )
    assert cpu_budget(16, root).count == 2


@pytest.mark.parametrize("path", ["/docker/abc", "/elsewhere"])
def test_a_mount_that_shows_the_cgroup_as_its_root(tmp_path, path):
    """No cgroup namespace: ``/proc/self/cgroup`` names the full path, and the mount shows
    that cgroup at its mount point (``docker/abc`` below it is a child's, not ours). A
    cgroup outside what the mount shows is read at the mount point."""
    mountinfo = V2_MOUNT.replace(" / /sys/fs/cgroup ", " /docker/abc /sys/fs/cgroup ")
    files = {
        "sys/fs/cgroup/cpu.max": "200000 100000\n",
        "sys/fs/cgroup/docker/abc/cpu.max": "50000 100000\n",
        "sys/fs/cgroup/elsewhere/cpu.max": "50000 100000\n",
    }
    root = _tree(tmp_path, f"0::{path}\n", mountinfo, files)
    assert cpu_budget(4, root).count == 2


def test_v1_quota_over_period(tmp_path):
    root = _v1(tmp_path, "/", _cfs(V1_DIR, "250000"))
    assert cpu_budget(8, root) == WorkerCount(
        3,
        "CPU quota 2.5 (cgroup v1 /sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us 250000, "
        "cpu.cfs_period_us 100000), rounded up",
    )


def test_v1_reads_the_cpu_controller_only(tmp_path):
    """``cpu`` and ``cpuacct`` mounted apart (as on the development machine), the process
    in a cgroup of each: the decoy quotas under ``cpuacct`` are not the ``cpu``
    controller's."""
    mountinfo = (
        "33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct\n"
        "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu"
    )
    root = _tree(
        tmp_path,
        "2:cpuacct:/acct\n1:cpu:/job\n0::/\n",
        mountinfo,
        {
            **_cfs("sys/fs/cgroup/cpuacct/acct", "50000"),
            **_cfs("sys/fs/cgroup/cpuacct/job", "50000"),
            **_cfs("sys/fs/cgroup/cpu/job", "200000"),
        },
    )
    assert cpu_budget(4, root).count == 2


def test_v1_minus_one_is_no_quota(tmp_path):
    root = _v1(tmp_path, "/", _cfs(V1_DIR, "-1"))
    assert cpu_budget(2, root) == WorkerCount(2, "2 CPUs in the affinity mask, no CPU quota")


def test_a_quota_bigger_than_the_mask_is_capped(tmp_path):
    root = _v2(tmp_path, "/", {"sys/fs/cgroup/cpu.max": "400000 100000\n"})
    assert cpu_budget(2, root) == WorkerCount(
        2,
        "CPU quota 4 (cgroup v2 /sys/fs/cgroup/cpu.max 400000 100000), capped by 2 CPUs in "
        "the affinity mask",
    )


def test_a_third_of_a_cpu_is_one_process(tmp_path):
    root = _v2(tmp_path, "/", {"sys/fs/cgroup/cpu.max": "30000 100000\n"})
    assert cpu_budget(1, root).count == 1


@pytest.mark.parametrize("garbled", ["banana 100000", "50000", "0 100000", "-5 100000", ""])
def test_a_garbled_file_is_left_out_and_named(tmp_path, garbled):
    root = _v2(tmp_path, "/", {"sys/fs/cgroup/cpu.max": garbled + "\n"})
    said = f"cgroup v2 /sys/fs/cgroup/cpu.max {garbled}".rstrip()
    assert cpu_budget(3, root) == WorkerCount(
        3, f"3 CPUs in the affinity mask, no CPU quota; ignored {said} (garbled)"
    )


def test_a_garbled_file_leaves_the_other_quotas(tmp_path):
    root = _v2(
        tmp_path,
        "/a",
        {"sys/fs/cgroup/cpu.max": "100000 100000\n", "sys/fs/cgroup/a/cpu.max": "x y\n"},
    )
    worker = cpu_budget(3, root)
    assert worker.count == 1
    assert worker.reason.endswith("; ignored cgroup v2 /sys/fs/cgroup/a/cpu.max x y (garbled)")


def test_an_unreadable_file_is_left_out_and_named(tmp_path):
    root = _v2(tmp_path, "/", {})
    (root / "sys/fs/cgroup/cpu.max").mkdir(parents=True)  # reading it fails, even as root
    assert cpu_budget(2, root) == WorkerCount(
        2,
        "2 CPUs in the affinity mask, no CPU quota; ignored /sys/fs/cgroup/cpu.max "
        "(unreadable: Is a directory)",
    )


def test_without_cgroup_files_the_mask_decides(tmp_path):
    """Not Linux, or no ``/proc``: no quota, and nothing to complain about."""
    assert cpu_budget(6, tmp_path) == WorkerCount(6, "6 CPUs in the affinity mask, no CPU quota")


def _settings(**env: str):
    return load_settings({"BRIDGE_SECRET": "s" * 40, **env})


def test_bridge_workers_wins_over_the_quota(tmp_path):
    root = _v2(tmp_path, "/", {"sys/fs/cgroup/cpu.max": "50000 100000\n"})
    with_redis = _settings(BRIDGE_REDIS_URL="redis://127.0.0.1:6379/0")
    assert worker_count(with_redis, root, affinity=8).count == 1
    settings = with_redis.with_overrides(workers=4)
    assert worker_count(settings, root, affinity=8) == WorkerCount(4, "BRIDGE_WORKERS=4")


def test_the_embedded_store_is_one_process(tmp_path):
    root = _v2(tmp_path, "/", {"sys/fs/cgroup/cpu.max": "800000 100000\n"})
    settings = _settings(BRIDGE_WORKERS="4")
    assert worker_count(settings, root, affinity=8) == WorkerCount(1, "embedded store: one process")


def test_this_machine_answers_within_its_mask():
    """The real files, read only: whatever they say, a count the mask allows and a reason."""
    settings = _settings(BRIDGE_REDIS_URL="redis://127.0.0.1:6379/0")
    worker = worker_count(settings)
    assert 1 <= worker.count <= len(os.sched_getaffinity(0))
    assert "affinity mask" in worker.reason or "CPU quota" in worker.reason
