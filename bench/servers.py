"""Start a server under test as a subprocess on a free loopback port, wait until healthy, stop it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server subprocess whose output goes to a log file; use as a context manager."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], port: int, cwd: Path,
                 health_path: str = "/health", startup_timeout: float = 300.0):
        self.name, self.argv, self.env, self.port, self.cwd = name, argv, env, port, cwd
        self.health_path, self.startup_timeout = health_path, startup_timeout
        self.proc: subprocess.Popen | None = None
        self.log_path = Path(tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".log")[1])
        self.startup_s: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def start(self) -> None:
        log = open(self.log_path, "ab")  # a restart appends
        began = time.perf_counter()
        self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = began + self.startup_timeout
        last = "no answer yet"
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            while time.perf_counter() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with code {self.proc.returncode} during start-up:\n"
                                       f"{self.log_tail()}")
                try:
                    r = client.get(self.base_url + self.health_path)
                    if r.status_code == 200:
                        self.startup_s = time.perf_counter() - began
                        return
                    last = f"HTTP {r.status_code}: {r.text[:200]}"
                except httpx.HTTPError as exc:
                    last = type(exc).__name__
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.name} not healthy after {self.startup_timeout:.0f} s ({last}):\n{self.log_tail()}")

    def stop(self, grace: float = 20.0) -> int | None:
        """SIGTERM, wait, then SIGKILL; only this process (its own pid)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=10)

    def __enter__(self) -> "ServerProcess":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# What the bench itself sets for the server it starts; --env may not override them.
BENCH_OWNED_ENV = ("BERTSERVE_PORT", "BERTSERVE_HOST", "BERTSERVE_MODEL_STORE")


def parse_env(items: list[str], error) -> dict[str, str]:
    """``--env KEY=VAL`` options as a dict; ``error(message)`` (argparse's ``parser.error``) for a
    malformed one or one of the variables the bench sets itself."""
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            error(f"--env takes KEY=VAL, got {item!r}")
        if key in BENCH_OWNED_ENV:
            error(f"--env {key} is set by the bench; use --port / --store")
        env[key] = value
    return env


def bertserve_argv() -> list[str]:
    """The ``bertserve`` console script of this environment, or ``python -m service`` without it."""
    script = Path(sys.executable).parent / "bertserve"
    return [str(script)] if script.exists() else [sys.executable, "-m", "service"]


def child_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.update(extra)
    return env
