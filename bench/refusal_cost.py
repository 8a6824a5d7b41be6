"""CPU per overload refusal through the server's whole ASGI stack, in process (no sockets, no uvicorn).

    .venv/bin/python -m bench.refusal_cost --store model_store --model minilm

Under ten times its capacity a 2-core server spends much of its CPU answering 429s, and every
microsecond of that is taken from the model (docs/measurements.md, "Overload and soak"). This loads the
store as the server does, marks the model's queue as full, and sends ``--requests`` embedding requests
through the app (middlewares, door, error answer, metrics, access log to /dev/null): process CPU time
per request. It measures the part of a refusal that is this project's code; uvicorn's HTTP parsing and
the socket I/O come on top. Then the event loop's own CPU (its thread's, inference excluded) per refusal
and per accepted request, the model idle. Run it from another checkout's code with
``PYTHONPATH=DIR .venv/bin/python bench/refusal_cost.py`` to compare. Never asserts a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path


async def _refused(app, body: bytes) -> int:
    sent: list[dict] = []
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)  # the client never disconnects
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/embeddings", "raw_path": b"/v1/embeddings", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"bench"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}
    await app(scope, receive, send)
    return sent[0]["status"]


async def measure(store: Path, model: str, requests: int) -> dict:
    from service.app import create_app
    from service.observability import configure_logging
    from service.settings import ServiceSettings

    configure_logging("info", "json", open("/dev/null", "w"))  # the access log, written but not shown
    app = create_app(ServiceSettings(model_store=store, default_model=model))
    async with app.router.lifespan_context(app):
        admission = app.state.registry.get(model).batcher.admission
        admission.saturated = lambda items: True  # every request finds the queue full
        body = b'{"input": "The central bank left its rates unchanged on Tuesday.", "model": "' + model.encode() + b'"}'
        status = await _refused(app, body)
        if status != 429:
            raise SystemExit(f"expected 429 from a full queue, got {status}")
        for _ in range(200):  # warm-up: caches, metric children, allocator
            await _refused(app, body)
        began_cpu, began_loop, began = time.process_time(), time.thread_time(), time.perf_counter()
        for _ in range(requests):
            await _refused(app, body)
        cpu, loop_cpu = time.process_time() - began_cpu, time.thread_time() - began_loop
        wall = time.perf_counter() - began
        # Accepted requests, one at a time through the same stack: the event loop's CPU per request
        # (HTTP layer, door, route, tokenizing a short text inline, answer); inference runs on the
        # worker threads, which thread_time() of the loop's thread does not count.
        del admission.saturated  # the rule again
        for _ in range(50):
            await _answered(app, body)
        began_loop = time.thread_time()
        accepted = max(1, requests // 5)
        for _ in range(accepted):
            await _answered(app, body)
        loop_cpu_accepted = time.thread_time() - began_loop
    return {"requests": requests, "cpu_us_per_refusal": round(1e6 * cpu / requests, 1),
            "wall_us_per_refusal": round(1e6 * wall / requests, 1),
            "loop_cpu_us_per_refusal": round(1e6 * loop_cpu / requests, 1),
            "accepted_requests": accepted, "loop_cpu_us_per_accepted": round(1e6 * loop_cpu_accepted / accepted, 1)}


async def _answered(app, body: bytes) -> None:
    status = await _refused(app, body)
    if status != 200:
        raise SystemExit(f"expected 200 from an idle model, got {status}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.refusal_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("model_store"))
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args(argv)
    print(asyncio.run(measure(args.store, args.model, args.requests)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
