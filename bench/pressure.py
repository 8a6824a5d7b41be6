"""Pressure on a running server: its capacity, then a multiple of it, or a long moderate load.

- ``capacity``: a closed loop (N clients, each sends as soon as it has an answer) gives the unloaded
  maximum of accepted texts per second.
- ``offered_load``: an open loop sends requests on a fixed schedule, whatever the answers do, from a
  bounded pool of keep-alive connections (a request due while every connection is busy is counted as
  ``not_sent``, so the client itself stays bounded). At 10x capacity most requests must be refused.
- ``RssSampler``: the server's resident memory over time, from /proc.

Used by tests/integration/test_overload.py (30 s at 10x) and by ``python -m bench.pressure soak``
(10 minutes at moderate load, docs/measurements.md). Timings here are reported, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bench import rawhttp
from bench.procstat import process_cpu_s, rss_bytes

# (status, headers, body) -> None when the answer is right, else what is wrong with it
Check = Callable[[int, dict, bytes, int], str | None]


@dataclass
class Answer:
    sent_at: float  # seconds since the phase began
    latency_s: float
    status: str  # HTTP status, or the client error's name
    retry_after: str | None = None
    problem: str | None = None  # a 200 whose body was wrong
    index: int = -1  # which of the prepared requests


@dataclass
class Phase:
    seconds: float
    answers: list[Answer] = field(default_factory=list)
    not_sent: int = 0

    def count(self, status: str) -> int:
        return sum(a.status == status for a in self.answers)

    def accepted_per_s(self, texts_per_request: int = 1) -> float:
        return self.count("200") * texts_per_request / self.seconds

    def latency_quantile(self, status: str, q: float) -> float | None:
        values = sorted(a.latency_s for a in self.answers if a.status == status)
        if not values:
            return None
        return values[min(len(values) - 1, int(q * len(values)))]


class RssSampler(threading.Thread):
    """Samples a process's resident memory every ``interval_s`` until stopped."""

    def __init__(self, pid: int, interval_s: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.interval_s = pid, interval_s
        self.samples: list[tuple[float, int]] = []  # (monotonic s, bytes)
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            rss = rss_bytes(self.pid)
            if rss is not None:
                self.samples.append((time.monotonic(), rss))
            self._stop_event.wait(self.interval_s)

    def stop(self) -> list[tuple[float, int]]:
        self._stop_event.set()
        self.join()
        return self.samples


async def _exchange(conn: rawhttp.Connection, raw: bytes, index: int, check: Check | None, began: float,
                    timeout_s: float) -> Answer:
    sent = time.perf_counter()
    try:
        status, headers, body = await asyncio.wait_for(conn.exchange(raw), timeout_s)
        code, retry_after = str(status), headers.get("retry-after")
        problem = check(status, headers, body, index) if (check and status == 200) else None
    except asyncio.TimeoutError:
        conn.close()
        code, retry_after, problem = "client_timeout", None, None
    except rawhttp.HTTPError as exc:
        code, retry_after, problem = type(exc).__name__, None, None
    return Answer(sent - began, time.perf_counter() - sent, code, retry_after, problem, index)


async def capacity(host: str, port: int, requests: list[bytes], concurrency: int, seconds: float,
                   warmup_s: float = 2.0, check: Check | None = None, timeout_s: float = 60.0) -> Phase:
    """Closed loop: ``concurrency`` clients each send the next request as soon as they have an answer."""
    conns = [rawhttp.Connection(host, port) for _ in range(concurrency)]
    counter = iter(range(10**9))
    phase = Phase(seconds)
    began = time.perf_counter()
    end = began + warmup_s + seconds

    async def client(conn: rawhttp.Connection) -> None:
        while time.perf_counter() < end:
            i = next(counter) % len(requests)
            answer = await _exchange(conn, requests[i], i, check, began + warmup_s, timeout_s)
            if answer.sent_at >= 0 and answer.sent_at + answer.latency_s <= seconds:
                phase.answers.append(answer)  # finished inside the measured window

    try:
        await asyncio.gather(*(client(c) for c in conns))
    finally:
        for c in conns:
            c.close()
    return phase


async def offered_load(host: str, port: int, requests: list[bytes], rate_per_s: float, seconds: float,
                       max_outstanding: int, check: Check | None = None, timeout_s: float = 60.0) -> Phase:
    """Open loop: request k is due at k / rate, sent on a free connection or counted as not sent."""
    free = [rawhttp.Connection(host, port) for _ in range(max_outstanding)]
    everyone = list(free)
    phase = Phase(seconds)
    tasks: set[asyncio.Task] = set()
    began = time.perf_counter()
    sent = 0

    async def one(conn: rawhttp.Connection, i: int) -> None:
        try:
            phase.answers.append(await _exchange(conn, requests[i], i, check, began, timeout_s))
        finally:
            free.append(conn)

    try:
        while (now := time.perf_counter() - began) < seconds:
            due = int(now * rate_per_s)
            while sent < due:
                i = sent % len(requests)
                sent += 1
                if not free:
                    phase.not_sent += 1
                    continue
                task = asyncio.create_task(one(free.pop(), i))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.sleep(0.001)
        if tasks:
            await asyncio.wait(set(tasks), timeout=timeout_s + 5)
    finally:
        for c in everyone:
            c.close()
    return phase


def run_client(coro):
    """Run a load generator on uvloop when it is installed (it comes with uvicorn[standard]): the
    generator shares the machine with the server, and every cycle it spends sending and parsing
    is taken from the server it measures."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def rss_trend(samples: list[tuple[float, int]]) -> dict:
    """Start, peak, end and least-squares slope (MB per minute) of an RSS series."""
    if len(samples) < 2:
        return {}
    t0 = samples[0][0]
    xs = [(t - t0) / 60 for t, _ in samples]
    ys = [r / 2**20 for _, r in samples]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    return {"start_mb": round(ys[0], 1), "peak_mb": round(max(ys), 1), "end_mb": round(ys[-1], 1),
            "slope_mb_per_min": round(slope, 3), "samples": len(ys)}


# ------------------------------------------------------------------ command line


def _texts(n: int) -> list[str]:
    from build_models.corpora import load_split

    texts = [t for t in load_split("reuters-r8", "test").texts if 80 <= len(t) <= 400]
    return texts[:n]


def _request_bytes(host: str, port: int, texts: list[str], model: str) -> list[bytes]:
    conn = rawhttp.Connection(host, port)
    return [conn.request_bytes("POST", "/v1/embeddings", json.dumps({"input": t, "model": model}).encode())
            for t in texts]


def _start(store: Path, model: str, server_dir: Path):
    import os

    from bench.servers import ServerProcess, free_port

    port = free_port()
    env = {**os.environ, "BERTSERVE_MODEL_STORE": str(store.resolve()), "BERTSERVE_PORT": str(port),
           "BERTSERVE_DEFAULT_MODEL": model, "BERTSERVE_ACCESS_LOG": "false"}
    server = ServerProcess("bertserve", [sys.executable, "-m", "service"], env, port, server_dir,
                           health_path="/v2/health/ready")
    server.start()
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pressure", description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["overload", "soak"])
    parser.add_argument("--store", type=Path, default=Path("model_store"))
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--seconds", type=float, help="overload: 30; soak: 600")
    parser.add_argument("--factor", type=float, help="offered load / capacity (overload 10, soak 0.5)")
    parser.add_argument("--out", type=Path, default=Path("bench/reports"))
    parser.add_argument("--server-dir", type=Path, default=Path.cwd(),
                        help="checkout the server runs from (python -m service there), e.g. the code before a change")
    parser.add_argument("--name", help="report file name (default: the mode)")
    args = parser.parse_args(argv)
    seconds = args.seconds or (30.0 if args.mode == "overload" else 600.0)
    factor = args.factor or (10.0 if args.mode == "overload" else 0.5)
    server = _start(args.store, args.model, args.server_dir)
    try:
        host, port = "127.0.0.1", server.port
        requests = _request_bytes(host, port, _texts(256), args.model)
        unloaded = run_client(capacity(host, port, requests, concurrency=32, seconds=10))
        cap = unloaded.accepted_per_s()
        print(f"capacity: {cap:.1f} texts/s (closed loop, 32 clients)", file=sys.stderr)
        sampler = RssSampler(server.pid, interval_s=1.0)
        sampler.start()
        loop_began = process_cpu_s(server.pid, main_thread_only=True)  # the event loop's thread
        loaded = run_client(offered_load(host, port, requests, factor * cap, seconds, max_outstanding=512))
        loop_cpu = (process_cpu_s(server.pid, main_thread_only=True) or 0.0) - (loop_began or 0.0)
        samples = sampler.stop()
        trend = rss_trend(samples)
        # Memory over time for the report: one point every ~30 s.
        step = max(1, len(samples) // max(1, int(seconds // 30)))
        timeline = [[round(t - samples[0][0]), round(r / 2**20, 1)] for t, r in samples[::step]] if samples else []
        statuses: dict[str, int] = {}
        for a in loaded.answers:
            statuses[a.status] = statuses.get(a.status, 0) + 1
        report = {
            "mode": args.mode, "model": args.model, "server_dir": str(args.server_dir), "seconds": seconds,
            "factor": factor,
            "capacity_texts_per_s": round(cap, 1), "offered_per_s": round(factor * cap, 1),
            "accepted_per_s": round(loaded.accepted_per_s(), 1),
            "accepted_share_of_capacity": round(loaded.accepted_per_s() / cap, 3) if cap else None,
            "statuses": statuses, "not_sent": loaded.not_sent,
            "p50_ms_200": _ms(loaded.latency_quantile("200", 0.5)), "p99_ms_200": _ms(loaded.latency_quantile("200", 0.99)),
            "p99_ms_429": _ms(loaded.latency_quantile("429", 0.99)),
            "event_loop_cpu_s": round(loop_cpu, 2),
            "event_loop_cpu_us_per_answer": round(1e6 * loop_cpu / max(1, len(loaded.answers)), 1),
            "rss": trend, "rss_timeline_s_mb": timeline, "server_alive": server.proc.poll() is None,
        }
    finally:
        server.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.name or args.mode}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


if __name__ == "__main__":
    sys.exit(main())
