"""Two figures of the hardening work, measured, never asserted.

    .venv/bin/python -m bench.hardening tokenize --store model_store --model minilm
    .venv/bin/python -m bench.hardening deadline
    .venv/bin/python -m bench.hardening indexing --store model_store --model minilm --server-dir DIR

``tokenize``: a bertserve subprocess on the store; three maximal ``POST /tokenize`` requests at once (256
texts of about 16,000 characters of Reuters news each, just under the 4 MiB body limit) while a client
polls ``GET /health`` every 10 ms on its own connection; the health latencies (p50, p99, max) while the
three run, and what the three got. ``--server-dir DIR`` runs the server from another checkout (the code
before a change, say), with this checkout's load generator.

``deadline``: the real app in process over a fake backend whose only worker hangs inside its batch;
requests queued behind it with ``X-Request-Timeout`` of 0.2 to 2 s; how late each 503 came after its
deadline.

``indexing``: closed-loop clients (``--clients 8,16,32``), each sending 16 tweets and news texts and the
next request only after its answer, ``--seconds`` per cell: what each got (none may be a 429).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

TEXTS_PER_REQUEST = 256
CHARS_PER_TEXT = 16_000


def _quantiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000
    return {"n": len(ms), "p50_ms": round(float(np.quantile(ms, 0.5)), 2),
            "p99_ms": round(float(np.quantile(ms, 0.99)), 2), "max_ms": round(float(ms.max()), 2)}


def _maximal_bodies(n: int) -> list[bytes]:
    from build_models.corpora import load_split

    news = " ".join(load_split("reuters-r8", "train").texts)
    bodies = []
    for b in range(n):
        texts = [news[(b * 97 + i * CHARS_PER_TEXT) % (len(news) - CHARS_PER_TEXT):][:CHARS_PER_TEXT]
                 for i in range(TEXTS_PER_REQUEST)]
        bodies.append(json.dumps({"inputs": texts}).encode())
    return bodies


def tokenize(store: Path, model: str, server_dir: Path, requests: int = 3) -> dict:
    from bench.servers import ServerProcess, free_port

    port = free_port()
    env = {**os.environ, "BERTSERVE_MODEL_STORE": str(store.resolve()), "BERTSERVE_PORT": str(port),
           "BERTSERVE_DEFAULT_MODEL": model, "BERTSERVE_ACCESS_LOG": "false"}
    server = ServerProcess("bertserve", [sys.executable, "-m", "service"], env, port, server_dir,
                           health_path="/v2/health/ready")
    bodies = _maximal_bodies(requests)
    server.start()
    try:
        url = server.base_url
        results: list[tuple[int, float, int]] = []

        def send(body: bytes) -> None:
            began = time.perf_counter()
            r = httpx.post(f"{url}/tokenize", content=body, headers={"content-type": "application/json"},
                           timeout=300)
            results.append((r.status_code, time.perf_counter() - began, len(r.content)))

        health: list[float] = []
        with httpx.Client(base_url=url, timeout=30) as probe:
            probe.get("/health")
            threads = [threading.Thread(target=send, args=(body,)) for body in bodies]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                began = time.perf_counter()
                probe.get("/health")
                health.append(time.perf_counter() - began)
                time.sleep(0.01)
            for t in threads:
                t.join()
    finally:
        server.stop()
    return {"what": "GET /health while three maximal POST /tokenize run", "server_dir": str(server_dir),
            "body_bytes": len(bodies[0]), "health": _quantiles(health),
            "tokenize": [{"status": s, "seconds": round(d, 2), "answer_bytes": n} for s, d, n in results]}


def indexing(store: Path, model: str, server_dir: Path, clients: list[int], seconds: float) -> dict:
    """Closed-loop clients, each sending 16 texts (tweets and news up to 256 tokens, bench/workloads.py)
    and the next only after its answer: a batch-indexing job, which must never be refused."""
    from bench.pressure import capacity, run_client
    from bench.rawhttp import Connection
    from bench.servers import ServerProcess, free_port
    from bench.workloads import build_workloads

    port = free_port()
    env = {**os.environ, "BERTSERVE_MODEL_STORE": str(store.resolve()), "BERTSERVE_PORT": str(port),
           "BERTSERVE_DEFAULT_MODEL": model, "BERTSERVE_ACCESS_LOG": "false"}
    server = ServerProcess("bertserve", [sys.executable, "-m", "service"], env, port, server_dir,
                           health_path="/v2/health/ready")
    workload = build_workloads(store, model)["mixed16"]
    conn = Connection("127.0.0.1", port)
    requests = [conn.request_bytes("POST", "/v1/embeddings", json.dumps({"input": texts, "model": model}).encode())
                for texts in workload.requests]
    server.start()
    cells = []
    try:
        for n in clients:
            phase = run_client(capacity("127.0.0.1", port, requests, concurrency=n, seconds=seconds))
            statuses = {s: phase.count(s) for s in sorted({a.status for a in phase.answers})}
            cells.append({"clients": n, "statuses": statuses, "texts_per_s": round(16 * phase.accepted_per_s(), 1),
                          "p99_ms_200": round(1000 * (phase.latency_quantile("200", 0.99) or 0), 1)})
    finally:
        server.stop()
    return {"what": "closed-loop clients of 16 mixed texts on /v1/embeddings", "server_dir": str(server_dir),
            "workload": workload.summary(), "seconds_per_cell": seconds, "cells": cells}


def deadline() -> dict:
    import tempfile

    from service.app import create_app
    from service.backends.fake import FakeBackend
    from service.settings import ServiceSettings
    from tests.helpers import LiveServer, make_registry

    hold = threading.Event()
    backend = FakeBackend(dim=8, hold=hold)
    tmp = Path(tempfile.mkdtemp(prefix="bertserve-deadline-"))
    settings = ServiceSettings(model_store=tmp, max_batch_size=1, access_log=False, shutdown_grace_s=1)
    lateness: list[float] = []
    statuses: list[int] = []
    with LiveServer(create_app(settings, registry=make_registry(tmp, settings, {"minilm": backend}))) as live:
        blocker = threading.Thread(target=lambda: httpx.post(f"{live.url}/v1/embeddings", json={"input": "hang"},
                                                             timeout=120))
        blocker.start()
        backend.entered.wait(10)

        timeouts = [0.2, 0.5, 1.0, 2.0] * 10
        # One keep-alive connection per client, opened first: the figure is the server's, not connects.
        clients = [httpx.Client(base_url=live.url, timeout=60) for _ in timeouts]
        for client in clients:
            client.get("/v2/health/live")

        def queued(i: int, timeout_s: float) -> None:
            sent = time.perf_counter()
            r = clients[i].post("/v1/embeddings", json={"input": f"queued text {i}"},
                                headers={"x-request-timeout": str(timeout_s)})
            statuses.append(r.status_code)
            lateness.append(time.perf_counter() - sent - timeout_s)

        threads = [threading.Thread(target=queued, args=(i, t)) for i, t in enumerate(timeouts)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for client in clients:
            client.close()
        still_hung = not hold.is_set()
        hold.set()
        blocker.join(30)
    return {"what": "503 lateness past X-Request-Timeout, queued behind a worker hung inside its batch",
            "statuses": {str(s): statuses.count(s) for s in set(statuses)}, "worker_still_hung": still_hung,
            "lateness": _quantiles(lateness)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hardening", description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["tokenize", "deadline", "indexing"])
    parser.add_argument("--clients", default="8,16,32", help="indexing: closed-loop clients per cell")
    parser.add_argument("--seconds", type=float, default=30.0, help="indexing: measured seconds per cell")
    parser.add_argument("--store", type=Path, default=Path("model_store"))
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--server-dir", type=Path, default=Path.cwd(), help="checkout the server runs from")
    args = parser.parse_args(argv)
    if args.mode == "tokenize":
        report = tokenize(args.store, args.model, args.server_dir)
    elif args.mode == "indexing":
        report = indexing(args.store, args.model, args.server_dir, [int(c) for c in args.clients.split(",")],
                          args.seconds)
    else:
        report = deadline()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
