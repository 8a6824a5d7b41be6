"""Where the time of one lone request goes: a stage budget in microseconds.

    python -m bench.stages --model minilm --requests 400 --out bench/reports/stages.md

The real app (``create_app`` with the environment's settings, the store's model, the access log written
to a file as a deployment writes it) runs under uvicorn in this process, on the event loop and HTTP
parser ``bertserve`` uses. Probes stamp the clock at each stage boundary; they are wrappers this module
puts around the app's own objects (its ASGI layers, the model entry, the tokenizer, the batcher, the
sessions), so the service carries no timing code for it. A client in a second process sends one short
text at a time (election tweets, as bench.run's ``short`` workload) over one keep-alive connection and
stamps when it sends and when the last byte of the answer arrives. Both sides read CLOCK_MONOTONIC
(``time.perf_counter`` on Linux), one clock for every process of the machine, so the stages telescope:
they add up to the latency the client saw.

Next to it, the floor: the same texts through the same tokenizer, padding and solo session in this
process, no server (what the build's latency probe measures). What the server adds is the difference.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import json
import logging
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # `python bench/stages.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import procstat  # noqa: E402
from bench.run import code_version  # noqa: E402
from bench.servers import HOST, free_port  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------- probes

class Marks:
    """The clock stamps of the request in flight: one request at a time (the client waits for each
    answer), so the worker thread's stamps belong to the request the event loop last started."""

    def __init__(self):
        self.requests: dict[str, list[tuple[str, float]]] = {}
        self.current: list[tuple[str, float]] | None = None
        self.in_flight = 0
        self.overlapped: set[str] = set()

    def start(self, request_id: str) -> None:
        self.current = self.requests.setdefault(request_id, [])

    def mark(self, label: str) -> None:
        if self.current is not None:
            self.current.append((label, time.perf_counter()))


def _layer_name(layer) -> str:
    kind = type(layer)
    return f"{kind.__name__} ({'bertserve' if kind.__module__.startswith('service') else kind.__module__.split('.')[0]})"


class _Enter:
    """Stands between two ASGI layers: stamps when the inner one is entered and when it returns."""

    def __init__(self, inner, name: str, marks: Marks):
        self.inner, self.name, self.marks = inner, name, marks

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        self.marks.mark(f"enter {self.name}")
        try:
            await self.inner(scope, receive, send)
        finally:
            self.marks.mark(f"leave {self.name}")


class _Outer:
    """What uvicorn calls: starts the request's record (by its X-Request-Id) and stamps the answer's
    way out through uvicorn's own send."""

    def __init__(self, app, marks: Marks):
        self.app, self.marks = app, marks

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = next((v.decode() for k, v in scope["headers"] if k == b"x-request-id"), None)
        marks = self.marks
        if request_id is not None:
            marks.in_flight += 1
            if marks.in_flight > 1:
                marks.overlapped.add(request_id)
            marks.start(request_id)
        marks.mark("asgi")

        async def stamped_send(message):
            kind = message["type"]
            marks.mark(f"send {kind}")
            await send(message)
            marks.mark(f"sent {kind}")

        try:
            await self.app(scope, receive, stamped_send)
        finally:
            marks.mark("done")
            if request_id is not None:
                marks.in_flight -= 1


def _wrap_method(owner, name: str, before: str | None, after: str | None, marks: Marks) -> Callable[[], None]:
    """Replace ``owner.name`` by a wrapper that stamps ``before`` and ``after`` it; returns the undo."""
    original = getattr(owner, name)
    if asyncio.iscoroutinefunction(original):
        async def wrapped(*args, **kwargs):
            if before:
                marks.mark(before)
            try:
                return await original(*args, **kwargs)
            finally:
                if after:
                    marks.mark(after)
    else:
        def wrapped(*args, **kwargs):
            if before:
                marks.mark(before)
            try:
                return original(*args, **kwargs)
            finally:
                if after:
                    marks.mark(after)
    wrapped.__wrapped__ = original
    setattr(owner, name, wrapped)
    return lambda: setattr(owner, name, original)


@contextlib.contextmanager
def probes(app, marks: Marks):
    """Probes on the app's ASGI layers and on the classes a request passes through, for the duration
    of the block; yields the app for uvicorn and the names of the layers in the order a request meets
    them. The classes are restored on the way out."""
    from service.batching.admission import Admission
    from service.batching.batcher import Batcher
    from service.model_entry import ModelEntry
    from service.tokenization import TextTokenizer

    from starlette.routing import Router

    layer = app.middleware_stack = app.build_middleware_stack()
    layers = [_layer_name(layer)]
    while not isinstance(layer, Router):
        inner = layer.app
        layers.append(_layer_name(inner))
        layer.app = _Enter(inner, layers[-1], marks)
        layer = inner
    undo = [_wrap_method(ModelEntry, "infer", "handler", "handler resumed", marks),
            _wrap_method(TextTokenizer, "encode", "tokenize", "tokenized", marks),
            _wrap_method(Batcher, "submit", "submit", None, marks),
            _wrap_method(Admission, "enqueue", None, "queued", marks),
            _wrap_method(Batcher, "_run", "worker awake", None, marks),
            _wrap_method(Batcher, "_post", "post", None, marks),
            _wrap_method(Batcher, "_deliver", "delivered", None, marks)]
    try:
        yield _Outer(app, marks), layers
    finally:
        for restore in undo:
            restore()


def probe_sessions(registry, marks: Marks) -> None:
    """Stamps around every session run of every loaded entry, naming the kind of session ("batch" or
    "solo") that ran it."""
    for entry in registry.entries.values():
        for kind, backends in (("batch", entry.backends), ("solo", entry.solo_backends)):
            for backend in backends:
                def run(batch, _infer=backend.infer, _kind=kind):
                    marks.mark(f"run {_kind}")
                    try:
                        return _infer(batch)
                    finally:
                        marks.mark("ran")

                backend.infer = run


# ---------------------------------------------------------------------------------------------- stages

# (stage, from stamp, to stamp): the request's path in order; each stamp's first occurrence.
def stage_plan(layers: list[str]) -> list[tuple[str, str, str]]:
    """``layers``: the app's ASGI layers from the outermost to the router; each stage of a layer is its
    own time before it calls the next one."""
    plan = [("receive + parse HTTP (client send -> app called)", "client send", "asgi")]
    starts = ["asgi"] + [f"enter {name}" for name in layers[1:]]
    for k in range(len(layers) - 1):
        plan.append((f"layer {layers[k]}", starts[k], starts[k + 1]))
    plan += [
        (f"layer {layers[-1]}: routing, body, validation, handler checks", starts[-1], "handler"),
        ("input checks, admission", "handler", "tokenize"),
        ("tokenization", "tokenize", "tokenized"),
        ("token cap, submit", "tokenized", "submit"),
        ("queue hand-off", "submit", "queued"),
        ("worker wake-up", "queued", "worker awake"),
        ("padding into arrays", "worker awake", "run"),
        ("inference (session.run)", "run", "ran"),
        ("results out of the worker", "ran", "post"),
        ("hand-back to the event loop", "post", "delivered"),
        ("handler resumes", "delivered", "handler resumed"),
        ("answer: rows, JSON, headers", "handler resumed", "send http.response.start"),
        ("send (uvicorn writes)", "send http.response.start", "sent http.response.body"),
        ("loopback + client reads", "sent http.response.body", "client received"),
    ]
    return plan


AFTER = [("after the answer: middleware unwinding, metrics, access log", "sent http.response.body", "done")]


def _first(stamps: list[tuple[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for label, t in stamps:
        key = "run" if label.startswith("run ") else label
        out.setdefault(key, t)
    return out


def budget(marks: Marks, client: dict[str, tuple[float, float]], layers: list[str], skip: int) -> dict:
    """Per stage: median, p90 and mean in microseconds over the requests after the first ``skip``."""
    plan = stage_plan(layers)
    rows: dict[str, list[float]] = {name: [] for name, _, _ in plan + AFTER}
    totals, sessions = [], {}
    for request_id in sorted(client, key=int)[skip:]:
        if request_id in marks.overlapped or request_id not in marks.requests:
            continue
        stamps = marks.requests[request_id]
        first = _first(stamps)
        first["client send"], first["client received"] = client[request_id]
        if not all(a in first and b in first for _, a, b in plan + AFTER):
            continue
        for name, a, b in plan + AFTER:
            rows[name].append((first[b] - first[a]) * 1e6)
        totals.append((first["client received"] - first["client send"]) * 1e6)
        kind = next(label[4:] for label, _ in stamps if label.startswith("run "))
        sessions[kind] = sessions.get(kind, 0) + 1

    def summary(values: list[float]) -> dict:
        values = sorted(values)
        return {"p50_us": statistics.median(values), "p90_us": values[int(0.9 * (len(values) - 1))],
                "mean_us": statistics.fmean(values)}

    if not totals:
        raise RuntimeError("no request had every stamp; is the model an embedding model that loaded?")
    return {"requests": len(totals), "sessions": sessions,
            "stages": [{"stage": name, **summary(rows[name])} for name, _, _ in plan],
            "after": [{"stage": name, **summary(rows[name])} for name, _, _ in AFTER],
            "total": summary(totals)}


# ---------------------------------------------------------------------------------------------- client

def client_main(port: int, bodies_path: str, count: int) -> None:
    """Second process: ``count`` requests one at a time; prints {request id: [sent, received]}."""
    bodies = json.loads(Path(bodies_path).read_text())
    sock = socket.create_connection((HOST, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = {}
    buffer = b""
    for n in range(count):
        body = bodies[n % len(bodies)].encode()
        request = (f"POST /v1/embeddings HTTP/1.1\r\nhost: {HOST}\r\ncontent-type: application/json\r\n"
                   f"x-request-id: {n}\r\ncontent-length: {len(body)}\r\n\r\n").encode() + body
        sent = time.perf_counter()
        sock.sendall(request)
        while b"\r\n\r\n" not in buffer:
            buffer += sock.recv(65536)
        head, _, buffer = buffer.partition(b"\r\n\r\n")
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        while len(buffer) < length:
            buffer += sock.recv(65536)
        received = time.perf_counter()
        if not head.startswith(b"HTTP/1.1 200"):
            raise SystemExit(f"request {n}: {head.splitlines()[0].decode()}: {buffer[:300]!r}")
        buffer = buffer[length:]
        times[str(n)] = [sent, received]
    sock.close()
    print(json.dumps(times))


# ---------------------------------------------------------------------------------------------- floor

def floor(entry, texts: list[str], count: int, skip: int) -> dict:
    """The same texts through the entry's tokenizer, padding and solo session (or its first session),
    in this process with nothing else running: microseconds per step."""
    from service.tokenization import pad_batch

    backend = (entry.solo_backends or entry.backends)[0]
    steps: dict[str, list[float]] = {"tokenization": [], "padding": [], "inference (session.run)": [], "total": []}
    for n in range(count):
        text = texts[n % len(texts)]
        t0 = time.perf_counter()
        encoded = entry.tokenizer.encode_texts([text], False)
        t1 = time.perf_counter()
        batch = pad_batch(encoded, entry.input_names, entry.tokenizer.pad_id)
        t2 = time.perf_counter()
        backend.infer(batch)
        t3 = time.perf_counter()
        if n >= skip:
            for name, seconds in (("tokenization", t1 - t0), ("padding", t2 - t1), ("inference (session.run)", t3 - t2),
                                  ("total", t3 - t0)):
                steps[name].append(seconds * 1e6)
    return {name: {"p50_us": statistics.median(v), "mean_us": statistics.fmean(v)} for name, v in steps.items()}


# ---------------------------------------------------------------------------------------------- run

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.stages", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm", help="embedding variant to request (default: minilm)")
    p.add_argument("--store", default="model_store", help="model store (default: model_store)")
    p.add_argument("--requests", type=int, default=400, help="lone requests to time (default: 400)")
    p.add_argument("--skip", type=int, default=50, help="first requests not counted (default: 50)")
    p.add_argument("--out", default=None, help="Markdown report (JSON next to it); default: print only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--client", nargs=3, metavar=("PORT", "BODIES", "COUNT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not 1 <= args.requests <= 100_000 or not 0 <= args.skip < args.requests:
        p.error("--requests must be in [1, 100000] and --skip in [0, requests)")
    return args


async def _serve_and_measure(config, bodies_path: str, count: int) -> dict:
    import uvicorn

    server = uvicorn.Server(config)
    port = config.port
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            serving.result()
            raise RuntimeError("uvicorn stopped during start-up")
        await asyncio.sleep(0.05)
    try:
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.stages", "--client", str(port), bodies_path, str(count), cwd=REPO,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await child.communicate()
        if child.returncode != 0:
            raise RuntimeError(f"client failed ({child.returncode}): {err.decode()[-2000:]}")
        return {k: tuple(v) for k, v in json.loads(out).items()}
    finally:
        server.should_exit = True
        await serving


def render(result: dict) -> str:
    meta, b = result["meta"], result["budget"]
    lines = [
        "# Where one lone request's time goes",
        "",
        f"- **Date**: {meta['date']}",
        f"- **Command**: `{meta['command']}`",
        f"- **Machine**: {meta['nproc']} cores ({meta['cpu_model']}; {procstat.isa_text(meta)}), {meta['platform']}",
        f"- **Code**: {meta['code']}",
        f"- **Model**: `{meta['model']}` ({meta['model_format']} {meta['model_precision']}); settings: "
        + ", ".join(f"`{k}={v}`" for k, v in meta["settings"].items()),
        f"- **Requests**: {b['requests']} counted (of {meta['requests']}, the first {meta['skip']} not counted), "
        f"one at a time over one keep-alive connection; sessions that ran them: "
        + ", ".join(f"{k} {v}" for k, v in sorted(b["sessions"].items())),
        "",
        "Stages in the order a request meets them; each is the time between two clock stamps, so the medians",
        "need not add up to the median total (the means do).",
        "",
        "| stage | p50 µs | p90 µs | mean µs |",
        "|---|---|---|---|",
    ]
    for row in b["stages"]:
        lines.append(f"| {row['stage']} | {row['p50_us']:,.0f} | {row['p90_us']:,.0f} | {row['mean_us']:,.0f} |")
    t = b["total"]
    lines.append(f"| **total (client send -> last byte received)** | **{t['p50_us']:,.0f}** | **{t['p90_us']:,.0f}** "
                 f"| **{t['mean_us']:,.0f}** |")
    for row in b["after"]:
        lines.append(f"| ({row['stage']}; not on the client's path) | {row['p50_us']:,.0f} | {row['p90_us']:,.0f} "
                     f"| {row['mean_us']:,.0f} |")
    f = result["floor"]
    lines += [
        "",
        "The floor: the same texts in this process, tokenizer -> padding -> the solo session, no server:",
        "",
        "| step | p50 µs | mean µs |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {v['p50_us']:,.0f} | {v['mean_us']:,.0f} |" for name, v in f.items()]
    lines += ["", f"What the server adds to the floor, median: {t['p50_us'] - f['total']['p50_us']:,.0f} µs.", ""]
    return "\n".join(lines)


def measure(store: Path, model: str, requests: int, skip: int, seed: int = 0) -> dict:
    """The stage budget and the floor (``budget`` and ``floor`` of the result)."""
    from service.app import create_app
    from service.observability import configure_logging
    from service.registry import Registry
    from service.settings import ServiceSettings

    from bench.workloads import build_workloads

    texts = build_workloads(store, model, seed, 1)["short"].texts
    bodies = [json.dumps({"input": t, "model": model}) for t in texts]
    settings = ServiceSettings(model_store=store)
    root = logging.getLogger()
    saved = root.handlers[:], root.level, logging.logProcesses, logging.logThreads, logging.logMultiprocessing
    with tempfile.TemporaryDirectory(prefix="bench-stages-") as tmp:
        bodies_path = Path(tmp) / "bodies.json"
        bodies_path.write_text(json.dumps(bodies))
        # Logging as `bertserve` sets it up, with the access log going to a file, as a deployment's goes
        # to its log shipper: writing it is part of what a request costs.
        log_file = open(Path(tmp) / "server.log", "w")
        log_writer = configure_logging(settings.log_level, settings.log_format, log_file)
        try:
            app = create_app(settings)
            gc.freeze()  # as `bertserve` does once its app is made
            marks = Marks()
            # The sessions are probed once the lifespan has loaded them, before the first request.
            loaded_by_app = app.router.lifespan_context

            @contextlib.asynccontextmanager
            async def lifespan(a):
                async with loaded_by_app(a) as state:
                    probe_sessions(app.state.registry, marks)
                    yield state

            app.router.lifespan_context = lifespan
            import uvicorn

            with probes(app, marks) as (outer, layers):
                config = uvicorn.Config(outer, host=HOST, port=free_port(), log_config=None, access_log=False)
                # The event loop bertserve runs on (uvicorn's choice: uvloop when installed).
                with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
                    client = runner.run(_serve_and_measure(config, str(bodies_path), requests))
        finally:
            gc.unfreeze()
            log_writer.stop()
            log_file.close()
            root.handlers[:], level, logging.logProcesses, logging.logThreads, logging.logMultiprocessing = saved
            root.setLevel(level)
    result_budget = budget(marks, client, layers, skip)
    # The floor, after the server has gone: the same tokenizer and sessions, loaded again here.
    entry = _load_one(Registry(settings), store, model)
    try:
        result_floor = floor(entry, texts, requests, skip)
    finally:
        for backend in entry.backends + entry.solo_backends:
            backend.close()
    return {
        "meta": {
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "nproc": os.cpu_count(), "cpu_model": procstat.cpu_model(), **procstat.isa(),
            "platform": platform.platform(), "code": code_version(), "model": model,
            "model_format": entry.manifest.format, "model_precision": entry.manifest.precision,
            "requests": requests, "skip": skip,
            "settings": {"instances": settings.instances, "threads": settings.threads,
                         "solo_threads": settings.solo_threads, "ort_spinning": settings.ort_spinning,
                         "max_queue_delay_ms": settings.max_queue_delay_ms},
        },
        "budget": result_budget,
        "floor": result_floor,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.client:
        client_main(int(args.client[0]), args.client[1], int(args.client[2]))
        return 0
    os.chdir(REPO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if time.get_clock_info("perf_counter").implementation != "clock_gettime(CLOCK_MONOTONIC)":
        print("error: this needs perf_counter on CLOCK_MONOTONIC (Linux), shared by the client process",
              file=sys.stderr)
        return 2
    result = measure(Path(args.store).resolve(), args.model, args.requests, args.skip, args.seed)
    result["meta"]["command"] = " ".join(["python -m bench.stages", *(argv if argv is not None else sys.argv[1:])])
    text = render(result)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    return 0


def _load_one(registry, store: Path, model: str):
    from service.model_entry import ModelEntry

    versions = sorted((int(p.name) for p in (store / model).iterdir() if p.name.isdigit()), reverse=True)
    entry = registry.prepare(ModelEntry(model, versions[0], store / model / str(versions[0])))
    if entry.status != "loading":
        raise RuntimeError(f"{model} v{versions[0]} did not load: {entry.reason}")
    return entry


if __name__ == "__main__":
    sys.exit(main())
