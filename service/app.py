"""create_app(settings): the FastAPI application. Registry, batchers and pools hang off app.state."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from importlib import metadata

from fastapi import FastAPI, Request
from service.api.responses import FastJSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from service import context, watchdog
from service.api import kserve, openai, ops, repository, tei
from service.api.errors import install_error_handlers
from service.auth import AccessControl
from service.cors import add_cors
from service.metrics import ServiceMetrics
from service.observability import RefusalLog, RequestObserver
from service.registry import Registry
from service.reloader import Reloader
from service.settings import ServiceSettings
from service.shedding import LoadShedder
from service.tracing import setup_tracing

log = logging.getLogger("bertserve")


def _version() -> str:
    try:
        return metadata.version("bertserve")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class RequestGuard:
    """Pure ASGI middleware: the body byte limit, checked on the declared length and on what is read;
    and, when the request is over, what it held given back (``RequestContext.finish``), even when a
    handler raised.

    (FastAPI's @app.middleware("http") wraps every request in extra tasks and streams; on a
    2-core machine that cost was visible next to a short inference: docs/measurements.md.)
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = next((v for k, v in scope.get("headers") or () if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        seen = 0
        started = False

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge(self.max_bytes)
            return message

        async def watched_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, watched_send)
        except _TooLarge:
            if not started:
                await self._refuse(scope, receive, send)
        finally:
            context.of(scope).finish()

    async def _refuse(self, scope, receive, send) -> None:
        from service.api.errors import error_response

        response = error_response(Request(scope, receive), 413, "payload_too_large",
                                  f"request body is larger than the limit of {self.max_bytes} bytes")
        await response(scope, receive, send)


class _TooLarge(StarletteHTTPException):
    """Raised while reading the body; an HTTPException so FastAPI's body parsing lets it through as 413."""

    def __init__(self, max_bytes: int):
        super().__init__(413, f"request body is larger than the limit of {max_bytes} bytes")


def _without_native_telemetry() -> dict:
    """FastAPI >= 0.16x instruments every request with OpenTelemetry on its own and checks whether
    to, at a cost per request even when nothing is configured (docs/measurements.md). Tracing here is
    service/tracing.py's (FastAPIInstrumentor, on only with an OTLP endpoint), so the native layer
    stays off: no double spans, and no cost on the refusal path."""
    import inspect

    if "telemetry" in inspect.signature(FastAPI.__init__).parameters:
        return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    return {}


def create_app(settings: ServiceSettings | None = None, registry: Registry | None = None,
               tracing_exporter=None) -> FastAPI:
    """Build the app. A registry may be injected (tests use one with fake backends or a fake backend
    loader); one that holds no entries is loaded from the store like the default one. A span exporter
    may be injected too (tests); otherwise tracing follows the OTEL_* environment (service/tracing.py)."""
    settings = settings or ServiceSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        reg = registry if registry is not None else Registry(settings)
        app.state.registry = reg
        reloader = app.state.reloader = Reloader(reg, settings)
        app.state.metrics.attach(reg)
        reg.runtime.tracing = app.state.tracing  # the model entries annotate the request's span
        if not reg.entries:
            await reloader.load_store()
        reg.start()
        if not reg.ready:
            log.error("not ready: %s", reg.problem or "no model loaded")
        poller = asyncio.create_task(reloader.poll()) if settings.store_poll_interval_s > 0 else None
        background = [asyncio.create_task(watchdog.watch(reg)), asyncio.create_task(app.state.refusals.run())]
        if grpc_server is not None:  # on this event loop, over the same registry
            await grpc_server.start()
        yield
        if grpc_server is not None:  # new calls refused; those in flight finish within the grace
            await grpc_server.stop(settings.shutdown_grace_s)
        if poller is not None:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
        await reg.stop(grace_s=settings.shutdown_grace_s)
        for task in background:  # after the drain: its last refusals are logged too
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        reloader.close()

    app = FastAPI(title="bertserve", version=_version(), default_response_class=FastJSONResponse, lifespan=lifespan,
                  **_without_native_telemetry(),
                  description="Serving optimized BERT-family models: OpenAI, text-embeddings-inference and "
                              "KServe v2 APIs over one dynamic batcher per model.")
    app.state.settings = settings
    app.state.version = _version()
    app.state.started_at = time.time()
    app.state.metrics = ServiceMetrics()
    app.state.refusals = RefusalLog()
    install_error_handlers(app)
    grpc_server = None
    if settings.grpc_port is not None:  # KServe v2 over gRPC; GrpcUnavailable at once without grpcio
        from service.api.grpc_service import GrpcServer

        grpc_server = app.state.grpc = GrpcServer(app, settings)

    app.include_router(openai.router)
    app.include_router(ops.router)
    app.include_router(tei.router)
    app.include_router(kserve.router)
    app.include_router(repository.router)
    # Outermost last. In a request's order: its observation (which makes its context; outermost, so the
    # guard's own answers are counted too), the body limit, the keys, then the door (after
    # authentication: an unauthorized client hears 401, not 429).
    app.add_middleware(LoadShedder)
    app.add_middleware(AccessControl, settings=settings)
    app.add_middleware(RequestGuard, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestObserver, metrics=app.state.metrics, refusals=app.state.refusals)
    app.state.tracing = setup_tracing(app, tracing_exporter)
    # Around all of it, when set: CORS (service/cors.py), after tracing, which wraps the stack first.
    add_cors(app, settings)
    return app
