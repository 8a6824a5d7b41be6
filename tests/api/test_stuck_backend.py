"""A backend that hangs: queued requests still time out at their deadline, the watchdog reports the
model not ready on every readiness route and counts it, and all recovers when the batch ends. Also
what a client that hangs up half-way through its body is counted as."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from service.app import create_app
from service.backends.fake import FakeBackend
from service.settings import ServiceSettings
from tests.helpers import LiveServer, make_registry

READINESS = ("/health", "/v2/health/ready", "/v2/models/minilm/ready", "/v2/models/minilm/versions/1/ready")


def metric(text: str, line_start: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return None


def wait_until(condition, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


@pytest.fixture
def hung(tmp_path):
    """A live server whose only backend instance blocks every batch until ``hold`` is set."""
    hold = threading.Event()
    backend = FakeBackend(dim=8, hold=hold)
    settings = ServiceSettings(model_store=tmp_path, max_batch_size=1, stall_timeout_s=0.3, shutdown_grace_s=1,
                               access_log=False)
    registry = make_registry(tmp_path, settings, {"minilm": backend})
    with LiveServer(create_app(settings, registry=registry)) as live:
        try:
            yield live, backend, hold
        finally:
            hold.set()


def test_queued_request_times_out_at_its_deadline_while_the_worker_hangs(hung):
    live, backend, hold = hung
    first: list[httpx.Response] = []
    blocker = threading.Thread(target=lambda: first.append(
        httpx.post(f"{live.url}/v1/embeddings", json={"input": "blocker"}, timeout=30)))
    blocker.start()
    assert backend.entered.wait(10)
    sent = time.monotonic()
    late = httpx.post(f"{live.url}/v1/embeddings", json={"input": "patient"},
                      headers={"x-request-timeout": "0.5"}, timeout=20)
    waited = time.monotonic() - sent
    # Answered while the only worker is still inside its batch: the deadline fired on its own.
    assert not hold.is_set() and blocker.is_alive()
    assert late.status_code == 503 and late.json()["error"]["type"] == "timeout", late.text
    assert waited >= 0.5
    hold.set()
    blocker.join(10)
    assert first[0].status_code == 200
    # The timed-out text never reached the backend.
    assert len(backend.seen_ids) == 1


def test_watchdog_reports_a_hung_model_not_ready_counts_it_and_recovers(hung):
    live, backend, hold = hung
    for path in READINESS:
        assert httpx.get(live.url + path).status_code == 200, path
    blocker = threading.Thread(target=lambda: httpx.post(f"{live.url}/v1/embeddings", json={"input": "stuck"},
                                                         timeout=30))
    blocker.start()
    assert backend.entered.wait(10)
    wait_until(lambda: httpx.get(f"{live.url}/health").status_code == 503, "the watchdog notices")
    for path in READINESS:
        answer = httpx.get(live.url + path)
        assert answer.status_code == 503 and answer.json()["error"]["type"] == "not_ready", (path, answer.text)
        assert "stuck" in answer.json()["error"]["message"]
    assert httpx.get(f"{live.url}/v2/health/live").status_code == 200  # alive: a restart is not the cure
    metrics = httpx.get(f"{live.url}/metrics").text
    assert metric(metrics, 'bertserve_stalled_batches_total{model="minilm"}') == 1
    assert metric(metrics, 'bertserve_model_ready{model="minilm",version="1"}') == 0

    hold.set()
    blocker.join(10)
    for path in READINESS:
        assert httpx.get(live.url + path).status_code == 200, path
    metrics = httpx.get(f"{live.url}/metrics").text
    assert metric(metrics, 'bertserve_model_ready{model="minilm",version="1"}') == 1
    assert metric(metrics, 'bertserve_stalled_batches_total{model="minilm"}') == 1


@pytest.mark.parametrize("path", ["/v1/embeddings", "/v2/models/minilm/infer", "/v2/repository/index"])
def test_a_client_that_hangs_up_mid_body_is_counted_as_cancelled_never_as_5xx(tmp_path, path):
    settings = ServiceSettings(model_store=tmp_path, access_log=False, admin_key="admin")
    registry = make_registry(tmp_path, settings, {"minilm": FakeBackend(dim=8)})
    with LiveServer(create_app(settings, registry=registry)) as live:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", live.port)) as raw:
                raw.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            f"Authorization: Bearer admin\r\nContent-Length: 400\r\n\r\n".encode()
                            + b'{"input": ["half a bo')
            time.sleep(0.05)

        def counted() -> str:
            return httpx.get(f"{live.url}/metrics").text

        wait_until(lambda: 'code="499"' in counted(), "the hang-ups are counted")
        text = counted()
        served = [line for line in text.splitlines() if line.startswith("bertserve_requests_total")
                  and 'code="5' in line and not line.endswith(" 0.0")]
        assert served == []
        assert sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("bertserve_requests_total") and 'code="499"' in line) == 3
        assert sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("bertserve_rejections_total") and 'reason="cancelled"' in line) == 3
