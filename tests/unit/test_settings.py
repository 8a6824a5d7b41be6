"""Settings that depend on the machine: cores under a container's CPU limit."""

from __future__ import annotations

import os

from service.settings import available_cores


def test_cgroup_quota_caps_the_cores(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")
    assert available_cores(cpu_max) == affinity  # no limit
    cpu_max.write_text("50000 100000\n")
    assert available_cores(cpu_max) == 1  # half a core still gets one thread
    cpu_max.write_text("150000 100000\n")
    assert available_cores(cpu_max) == min(affinity, 2)
    assert available_cores(tmp_path / "missing") == affinity  # cgroup v1 or no cgroup: affinity only
