"""
Tests for L{openai_proxy.cpus}: C{WORKERS=auto} counts the CPUs a container
is given (its cgroup quota), not every CPU of its host.
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.trial.unittest import TestCase

from openai_proxy.cpus import available_cpus, cgroup_quota


def _affinity() -> int:
    # PyPy has no sched_getaffinity: there every CPU counts.
    get = getattr(os, "sched_getaffinity", None)
    return len(get(0)) if get else (os.cpu_count() or 1)


class CgroupTests(TestCase):
    def setUp(self) -> None:
        self.root = Path(self.mktemp())
        self.root.mkdir()

    def write(self, name: str, text: str) -> None:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def test_no_cgroup_files_means_no_quota(self) -> None:
        self.assertIsNone(cgroup_quota(self.root))
        self.assertEqual(available_cpus(self.root), _affinity())

    def test_v2_quota(self) -> None:
        self.write("cpu.max", "150000 100000\n")
        self.assertEqual(cgroup_quota(self.root), 1.5)

    def test_v2_unlimited(self) -> None:
        self.write("cpu.max", "max 100000\n")
        self.assertIsNone(cgroup_quota(self.root))

    def test_v1_quota_and_unlimited(self) -> None:
        self.write("cpu/cpu.cfs_quota_us", "50000\n")
        self.write("cpu/cpu.cfs_period_us", "100000\n")
        self.assertEqual(cgroup_quota(self.root), 0.5)
        self.write("cpu/cpu.cfs_quota_us", "-1\n")
        self.assertIsNone(cgroup_quota(self.root))

    def test_unreadable_values_mean_no_quota(self) -> None:
        self.write("cpu.max", "garbage\n")
        self.assertIsNone(cgroup_quota(self.root))

    def test_quota_caps_the_affinity_rounded_up_and_never_below_one(self) -> None:
        affinity = _affinity()
        self.write("cpu.max", "50000 100000\n")
        self.assertEqual(available_cpus(self.root), 1)
        self.write("cpu.max", f"{affinity * 100000 + 1} 100000\n")
        self.assertEqual(available_cpus(self.root), affinity)
        if affinity > 1:
            self.write("cpu.max", "150000 100000\n")
            self.assertEqual(available_cpus(self.root), 2)
