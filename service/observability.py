"""Per-request observation: Prometheus request metrics, the request id and timing headers, and one JSON access-log line.

``record`` is the one place a finished request is counted and logged; gRPC calls reach it from
service/api/grpc_service.py.

A pure ASGI middleware, outermost, so that it also sees the answers RequestGuard gives on its own (413
for an oversized body). Its first call makes the request's context (service/context.py); at the end it
reads what the inner layers wrote there: the model the request resolved to, the error it was answered
with, and its timings.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import logging.handlers
import queue
import time

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from service import context, routes
from service.context import REQUEST_ID_HEADER_BYTES
from service.metrics import ServiceMetrics

access_log = logging.getLogger("bertserve.access")

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that went away before its answer


# Timing headers in milliseconds, named as text-embeddings-inference names them; the fields of Timing.
_TIMING_HEADERS = (("tokenization_s", b"x-tokenization-time"), ("queue_s", b"x-queue-time"),
                   ("infer_s", b"x-inference-time"))
# Every header this layer puts on an answer: what CORS lets browser code read (service/cors.py).
RESPONSE_HEADERS = (REQUEST_ID_HEADER_BYTES.decode(), "x-total-time", *(name.decode() for _, name in _TIMING_HEADERS))


def route_template(scope: Scope) -> str:
    """The matched route's path template (``/v2/models/{model}/infer``), never the raw path."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class RequestObserver:
    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, refusals: "RefusalLog"):
        self.app, self.metrics, self.refusals = app, metrics, refusals

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        ctx = context.of(scope)
        status = 500  # if the app raises before answering, the server answers 500
        answered = disconnected = gone_first = False

        async def watched_receive() -> dict:
            nonlocal disconnected
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected = True
            return message

        async def timed_send(message: dict) -> None:
            nonlocal status, answered, gone_first
            if message["type"] == "http.response.start":
                status, answered, gone_first = message["status"], True, disconnected
                headers = message.get("headers", [])
                timing = ctx.timing
                extra = [(name, f"{seconds * 1000:.2f}".encode()) for key, name in _TIMING_HEADERS
                         if (seconds := getattr(timing, key)) is not None]
                extra.append((b"x-total-time", f"{(time.perf_counter() - started) * 1000:.2f}".encode()))
                if not any(k.lower() == REQUEST_ID_HEADER_BYTES for k, _ in headers):
                    # latin-1, as it was decoded: the client's id goes back byte for byte.
                    extra.append((REQUEST_ID_HEADER_BYTES, ctx.request_id.encode("latin-1")))
                message["headers"] = [*headers, *extra]
            await send(message)

        try:
            await self.app(scope, watched_receive, timed_send)
        except ClientDisconnect:
            disconnected = True  # hung up while sending its body: no answer to give, no error of ours
        finally:
            if disconnected and (gone_first or not answered):
                # Counted as nginx counts it (499), never as a server error: nobody is left to answer.
                status = CLIENT_CLOSED_REQUEST
                ctx.error_type = "client_disconnected"
            route = route_template(scope)
            record(self.metrics, self.refusals, ctx, "http", scope.get("method"), route, status,
                   time.perf_counter() - started, probe=route in routes.PROBES)


def record(metrics: ServiceMetrics, refusals: "RefusalLog", ctx: context.RequestContext, protocol: str,
           method: str | None, route: str, status: int, seconds: float, probe: bool, **fields) -> None:
    """A finished request in the request metrics and the access log, whichever protocol carried it
    (the gRPC service calls this too): ``status`` is its HTTP status, or the HTTP status of the same
    outcome; ``fields`` go on its log line. Probes stay out of the log; overload refusals are summed
    by ``refusals``."""
    model = ctx.model
    try:
        metrics.observe_request(model, route, status, seconds, ctx.error_type, protocol)
    except Exception:  # noqa: BLE001 - metrics must never break serving
        access_log.exception("recording request metrics failed")
    if not probe and access_log.isEnabledFor(logging.INFO):
        if ctx.error_type == "overloaded":
            refusals.note(model, route)
        else:
            access_log.info("request", extra={"fields": {
                "request_id": ctx.request_id, "protocol": protocol, "method": method, "route": route,
                "model": model, "status": status, "duration_ms": round(seconds * 1000, 2),
                "error_type": ctx.error_type, **fields,
            }})


class RefusalLog:
    """Overload refusals (429) in the access log as one line per model and route per second, with
    their count, instead of a line each: under ten times its capacity a server refuses hundreds of
    requests a second, and writing each line cost a large share of what a refusal costs, taken from the
    model (docs/measurements.md). Every refusal is still counted in ``bertserve_rejections_total``."""

    def __init__(self, interval_s: float = 1.0, clock=time.monotonic):
        self.interval_s, self.clock = interval_s, clock
        self.pending: dict[tuple, int] = {}
        self.window_start = clock()

    def note(self, model: str | None, route: str) -> None:
        key = (model, route)
        self.pending[key] = self.pending.get(key, 0) + 1
        self.flush_due()

    def flush_due(self) -> None:
        """Write the window if it is over: after each refusal, and on a timer (``run``), so that the last
        refusals of a burst are logged even when no request follows them."""
        now = self.clock()
        if self.pending and now - self.window_start >= self.interval_s:
            self.flush(now)

    async def run(self) -> None:
        """Flush due windows until cancelled; then flush what is left (shutdown)."""
        try:
            while True:
                await asyncio.sleep(self.interval_s)
                self.flush_due()
        finally:
            if self.pending:
                self.flush(self.clock())

    def flush(self, now: float) -> None:
        seconds = round(now - self.window_start, 3)
        for (model, route), count in self.pending.items():
            access_log.info("requests refused: overloaded", extra={"fields": {
                "route": route, "model": model, "status": 429, "error_type": "overloaded",
                "refused": count, "window_s": seconds}})
        self.pending.clear()
        self.window_start = now


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the record's ``fields`` if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
                 "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _Enqueue(logging.handlers.QueueHandler):
    """Hands each record to the log writer thread: its message is merged with its arguments here, as
    they are at the call; the time, fields and traceback are formatted and the line written there."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record = copy.copy(record)
        record.msg, record.args = record.getMessage(), None
        return record


def configure_logging(level: str, fmt: str, stream=None) -> logging.handlers.QueueListener:
    """Root logging for the server process: JSON lines (default) or plain text, on ``stream`` (stderr).

    Lines are formatted and written by a writer thread that takes records from a queue, never on the
    event loop: a log sink that blocks (a full pipe to a slow log shipper) must not stall serving, and
    a line's formatting and write were a share of the event loop's work after each answer
    (docs/measurements.md). Returns the writer; ``stop()`` it on the way out, which writes
    what is still queued."""
    # Records never show the process, thread or multiprocessing names: don't look them up per record
    # (a system call and lookups on every access-log line).
    logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False
    handler = logging.StreamHandler(stream)
    if fmt == "json":
        formatter = JsonLogFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    records: queue.SimpleQueue = queue.SimpleQueue()
    writer = logging.handlers.QueueListener(records, handler)
    root = logging.getLogger()
    root.handlers[:] = [_Enqueue(records)]
    root.setLevel(level.upper())
    writer.start()
    # uvicorn's own loggers go through ours, so every line has one format; its access log is replaced
    # by bertserve.access, which knows the route template, model and request id.
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    return writer
