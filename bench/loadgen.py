"""Closed-loop load: N workers, each sends its next request as soon as the previous answer arrives."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass

from urllib.parse import urlsplit

from bench import rawhttp
from bench.procstat import machine_busy_s, process_cpu_s, self_cpu_s

try:
    import orjson

    _dumps, _loads = orjson.dumps, orjson.loads
except ImportError:  # pragma: no cover
    _dumps = lambda o: json.dumps(o).encode()  # noqa: E731
    _loads = json.loads


@dataclass
class Record:
    done: float  # perf_counter at completion
    latency: float  # seconds
    status: str  # "200", "429", "timeout", "ConnectError", "bad_body", ...
    texts: int

    @property
    def ok(self) -> bool:
        return self.status == "200"


def openai_payloads(requests: list[list[str]], model: str) -> list[tuple[bytes, int]]:
    """Pre-serialized bodies (a single text is sent as a string, as clients do), with their text count."""
    out = []
    for texts in requests:
        value = texts[0] if len(texts) == 1 else texts
        out.append((_dumps({"input": value, "model": model}), len(texts)))
    return out


def _valid(content: bytes, n: int) -> bool:
    try:
        body = _loads(content)
        data = body["data"]
        return len(data) == n and all(len(d["embedding"]) > 0 for d in data)
    except Exception:
        return False


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), int(-(-q * len(sorted_values) // 100))))
    return sorted_values[rank - 1]


async def _run_cell(base_url: str, path: str, payloads: list[tuple[bytes, int]], concurrency: int,
                    duration: float, warmup: float, timeout: float, server_pid: int | None,
                    max_window: float) -> dict:
    url = urlsplit(base_url)
    records: list[Record] = []
    completed = [0] * concurrency  # answers per worker, to know when every worker is past its first request
    order = itertools.count()
    stop = asyncio.Event()
    samples: dict[str, tuple] = {}
    connections = [rawhttp.Connection(url.hostname, url.port) for _ in range(concurrency)]
    prebuilt = [(connections[0].request_bytes("POST", path, body), n) for body, n in payloads]

    try:
        async def worker(w: int) -> None:
            conn = connections[w]
            while not stop.is_set():
                raw, n = prebuilt[next(order) % len(prebuilt)]
                began = time.perf_counter()
                try:
                    code, content = await asyncio.wait_for(conn.send(raw), timeout)
                    status = str(code)
                    if status == "200" and not _valid(content, n):
                        status = "bad_body"
                except asyncio.TimeoutError:
                    conn.close()
                    status = "timeout"
                except rawhttp.HTTPError as exc:
                    status = type(exc).__name__
                done = time.perf_counter()
                records.append(Record(done, done - began, status, n))
                completed[w] += 1
                if status != "200":
                    await asyncio.sleep(0.05)  # refused or broken: don't spin on errors

        def sample(tag: str) -> None:
            samples[tag] = (time.perf_counter(), process_cpu_s(server_pid) if server_pid else None,
                            self_cpu_s(), machine_busy_s(),
                            process_cpu_s(server_pid, main_thread_only=True) if server_pid else None)

        start = time.perf_counter()
        tasks = [asyncio.create_task(worker(w)) for w in range(concurrency)]
        # Warm-up: at least `warmup` seconds and until every worker has had an answer (the first wave of a
        # slow cell all arrives together and is not steady state), at most warmup + timeout.
        while True:
            now = time.perf_counter()
            if now - start >= warmup and min(completed) > 0 or now - start >= warmup + timeout:
                break
            await asyncio.sleep(0.02)
        sample("start")
        t0 = samples["start"][0]
        # The window holds at least three of the slowest warm-up answers, so that slow cells are measured
        # over several rounds rather than one wave; capped at max_window.
        slowest = max((r.latency for r in records), default=0.0)
        window = min(max(duration, 3 * slowest), max(duration, max_window))
        await asyncio.sleep(max(0.0, t0 + window - time.perf_counter()))
        sample("end")
        t1 = samples["end"][0]
        stop.set()
        # Let in-flight requests finish so that their work does not leak into the next cell.
        _, pending = await asyncio.wait(tasks, timeout=timeout + 5)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    finally:
        for conn in connections:
            conn.close()

    return _summarize(records, samples, t0, t1, concurrency, t0 - start, not pending)


def _summarize(records: list[Record], samples: dict, t0: float, t1: float, concurrency: int,
               warmup: float, drained: bool) -> dict:
    window = [r for r in records if t0 <= r.done <= t1]
    ok = [r for r in window if r.ok]
    errors: dict[str, int] = {}
    for r in window:
        if not r.ok:
            errors[r.status] = errors.get(r.status, 0) + 1
    lat = sorted(r.latency * 1000 for r in ok)
    duration = t1 - t0
    (ts, scpu0, ccpu0, busy0, main0), (te, scpu1, ccpu1, busy1, main1) = samples["start"], samples["end"]
    span = te - ts
    server_cores = (scpu1 - scpu0) / span if scpu0 is not None and scpu1 is not None else None
    # The main thread runs the server's event loop (HTTP, JSON, pydantic): near 1.0 means it is saturated.
    main_cores = (main1 - main0) / span if main0 is not None and main1 is not None else None
    client_cores = (ccpu1 - ccpu0) / span
    machine_cores = (busy1 - busy0) / span if busy0 is not None and busy1 is not None else None
    other = None
    if machine_cores is not None:
        other = max(0.0, machine_cores - (server_cores or 0.0) - client_cores)
    return {
        "ok": True,
        "concurrency": concurrency, "duration_s": duration, "warmup_s": warmup,
        "requests": len(ok), "texts": sum(r.texts for r in ok),
        "requests_per_s": len(ok) / duration, "texts_per_s": sum(r.texts for r in ok) / duration,
        "latency_ms": {"p50": percentile(lat, 50), "p90": percentile(lat, 90), "p99": percentile(lat, 99),
                       "mean": sum(lat) / len(lat) if lat else None, "max": lat[-1] if lat else None},
        "errors": sum(errors.values()), "errors_by_status": errors,
        "server_cpu_cores": server_cores, "server_main_thread_cores": main_cores, "client_cpu_cores": client_cores,
        "machine_busy_cores": machine_cores, "other_cpu_cores": other,
        "requests_sent_total": len(records), "drained": drained,
    }


def _event_loop_runner():
    """uvloop when installed (uvicorn[standard] brings it): a lighter client leaves more CPU to the server."""
    try:
        import uvloop

        return uvloop.run
    except ImportError:  # pragma: no cover
        return asyncio.run


def run_cell(base_url: str, path: str, payloads: list[tuple[bytes, int]], concurrency: int, duration: float,
             warmup: float, timeout: float, server_pid: int | None, max_window: float | None = None) -> dict:
    """One (server, workload, concurrency) cell; a failure is returned as {'ok': False, 'error': ...}.

    Measures for `duration` seconds, or longer (up to max_window, default 4 x duration) when answers are slow.
    """
    max_window = max_window if max_window is not None else 4 * duration
    try:
        return _event_loop_runner()(_run_cell(base_url, path, payloads, concurrency, duration, warmup, timeout,
                                              server_pid, max_window))
    except Exception as exc:  # a failed cell is reported, not a crash
        return {"ok": False, "concurrency": concurrency, "error": f"{type(exc).__name__}: {exc}"}
