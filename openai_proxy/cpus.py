"""
How many CPUs this process is given: what C{WORKERS=auto} starts one
process for.

A container sees every CPU of its host in its affinity mask; what it is
given is its cgroup's CPU quota (C{docker run --cpus}, a Kubernetes CPU
limit).  So the count is the affinity mask's size, lowered to the quota
rounded up, when the cgroup sets one (v2 C{cpu.max}, or v1
C{cpu.cfs_quota_us}/C{cpu.cfs_period_us}).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

#: Where the cgroup file systems are mounted (a container sees its own).
CGROUP = Path("/sys/fs/cgroup")


def cgroup_quota(root: Path = CGROUP) -> float | None:
    """
    The CPU quota of this process's cgroup, in CPUs (e.g. C{1.5}), or
    L{None} when there is none or it cannot be read.
    """
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota == "max":
            return None
        return int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for folder in (root / "cpu", root / "cpu,cpuacct", root):
        try:
            quota_us = int((folder / "cpu.cfs_quota_us").read_text())
            period_us = int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    return None


def available_cpus(root: Path = CGROUP) -> int:
    """The number of CPUs this process may use: at least 1."""
    # PyPy has no sched_getaffinity: every CPU then counts.
    affinity = getattr(os, "sched_getaffinity", None)
    count = len(affinity(0)) if affinity else (os.cpu_count() or 1)
    quota = cgroup_quota(root)
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)
