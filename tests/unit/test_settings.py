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


def test_padding_limit_follows_the_device_unless_set():
    from service.settings import ServiceSettings

    # CPU: a batch's fixed cost is about one token's, so only texts of one length go together.
    assert ServiceSettings().padding_ratio == 1.0
    assert ServiceSettings(device="cuda").padding_ratio is None  # a GPU batches whatever is queued
    assert ServiceSettings(max_padding_ratio=1.5).padding_ratio == 1.5
    assert ServiceSettings(max_padding_ratio=0, device="cpu").padding_ratio is None  # 0 = no limit
