"""What the server knows about one request while answering it: one typed context per request.

Created and attached here, once, by the outermost layer (``RequestScope``); every other module reads and
writes its fields through ``of(scope)``, never a key of the ASGI scope's state dict. ``RequestScope``
also gives the request id back on the answer, and when the request is over gives back what the request
held: its leases on model versions (an unloading version waits for them, ``Registry.drain``) and its
admission ticket if no queue took it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Receive, Scope, Send

if TYPE_CHECKING:
    from service.batching.admission import Ticket
    from service.model_entry import ModelEntry

REQUEST_ID_HEADER = "x-request-id"
_HEADER_BYTES = REQUEST_ID_HEADER.encode()
_KEY = "bertserve.context"  # its one key in the scope's state


@dataclass(slots=True)
class Timing:
    """Where a request's time went, for the timing headers, the trace and the metrics; None: no such step."""

    tokenization_s: float | None = None
    queue_s: float | None = None  # the longest wait of its items before their batch started
    infer_s: float | None = None  # backend time of the batches that carried its items, summed


@dataclass(slots=True, eq=False)
class RequestContext:
    request_id: str
    model: str | None = None  # the loaded model the request resolved to, for its metrics and log line
    error_type: str | None = None  # the error it was answered with (service/api/errors.py)
    timing: Timing = field(default_factory=Timing)
    ticket: "Ticket | None" = None  # its admission into a model's queue, when the door took one
    leases: list["ModelEntry"] = field(default_factory=list)

    def hold(self, entry: "ModelEntry") -> None:
        """The request resolved ``entry``: keep it loaded until the request is over."""
        entry.acquire()
        self.leases.append(entry)
        self.model = entry.name

    def finish(self) -> None:
        """Give back what the request held (once)."""
        if self.ticket is not None:
            self.ticket.release()
            self.ticket = None
        leases, self.leases = self.leases, []
        for entry in leases:
            entry.release()


def of(scope: Scope) -> RequestContext:
    """The request's context (made here if no ``RequestScope`` made it, e.g. a test's bare app)."""
    state = scope.setdefault("state", {})
    context = state.get(_KEY)
    if context is None:
        context = state[_KEY] = RequestContext(_request_id(scope))
    return context


def _request_id(scope: Scope) -> str:
    """The client's X-Request-Id (up to 128 characters), or a fresh one."""
    for name, value in scope.get("headers") or ():
        if name == _HEADER_BYTES:
            return value.decode("latin-1")[:128] or uuid.uuid4().hex
    return uuid.uuid4().hex


class RequestScope:
    """Pure ASGI middleware, outermost: the context of every HTTP request, its id on the answer, and
    what it held given back when it is over, even when a handler raised."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        context = of(scope)
        rid = context.request_id.encode("latin-1")  # as it was decoded: the client's id goes back byte for byte

        async def tagged_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = message.get("headers", [])
                if not any(k.lower() == _HEADER_BYTES for k, _ in headers):
                    message["headers"] = [*headers, (_HEADER_BYTES, rid)]
            await send(message)

        try:
            await self.app(scope, receive, tagged_send)
        finally:
            context.finish()
