"""CPU time of a process and of the whole machine, from /proc (Linux)."""

from __future__ import annotations

import os

_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int, main_thread_only: bool = False) -> float | None:
    """utime + stime of one process (all its threads, or only its main thread), in seconds; None when gone."""
    path = f"/proc/{pid}/task/{pid}/stat" if main_thread_only else f"/proc/{pid}/stat"
    try:
        with open(path) as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK  # fields 14 and 15 of stat(5)


def machine_busy_s() -> float | None:
    """CPU seconds all cores spent not idle (user+nice+system+irq+softirq+steal) since boot."""
    try:
        with open("/proc/stat") as fh:
            parts = fh.readline().split()
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in parts[1:9])
    return (user + nice + system + irq + softirq + steal) / _TICK


def self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def isa() -> dict[str, bool]:
    """The vector extensions every CPU speed figure depends on: AVX2, AVX-512, VNNI (AVX-512 or AVX)."""
    flags = cpu_flags()
    return {"avx2": "avx2" in flags, "avx512": "avx512f" in flags, "vnni": bool({"avx512_vnni", "avx_vnni"} & flags)}


def isa_text(found: dict) -> str:
    """``isa()`` (or a report's copy of it) as "AVX2 yes, AVX-512 no, VNNI no"; keys it lacks are left out."""
    names = (("avx2", "AVX2"), ("avx512", "AVX-512"), ("vnni", "VNNI"))
    return ", ".join(f"{name} {'yes' if found[key] else 'no'}" for key, name in names if key in found)


def mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def rss_bytes(pid: int) -> int | None:
    """Resident memory of a process (VmRSS), in bytes; None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
