"""What the server knows about one request while answering it: one typed context per request.

Created and attached here, once, by ``of(scope)``, which the outermost layer calls first; every module
reads and writes its fields through ``of(scope)``, never a key of the ASGI scope's state dict. When the
request is over, ``finish`` gives back what it held: its leases on model versions (an unloading version
waits for them, ``Registry.drain``) and its admission ticket if no queue took it (service/app.py's
RequestGuard calls it). The request id goes back on the answer with the other response headers
(service/observability.py).
"""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.types import Scope

if TYPE_CHECKING:
    from service.batching.admission import Ticket
    from service.model_entry import ModelEntry

REQUEST_ID_HEADER = "x-request-id"
REQUEST_ID_HEADER_BYTES = REQUEST_ID_HEADER.encode()
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
    """The request's context, made on the first call."""
    state = scope.setdefault("state", {})
    context = state.get(_KEY)
    if context is None:
        context = state[_KEY] = RequestContext(_request_id(scope))
    return context


class _RequestIds:
    """Fresh request ids: 32 hex digits, a random prefix drawn once per process and a counter. Unique
    in the process and, by the prefix, across its restarts and replicas; uuid4 per request cost a
    getrandom system call each, which on a virtual machine showed in the event loop's profile
    (bench/reports/)."""

    def __init__(self):
        self._prefix = uuid.uuid4().hex[:16]
        self._count = itertools.count()

    def next(self) -> str:
        return f"{self._prefix}{next(self._count) & 0xFFFF_FFFF_FFFF_FFFF:016x}"


_ids = _RequestIds()


def request_id(given: str | None) -> str:
    """The client's request id (up to 128 characters), or a fresh one when it sent none."""
    return given[:128] if given else _ids.next()


def _request_id(scope: Scope) -> str:
    """The client's X-Request-Id (up to 128 characters), or a fresh one."""
    for name, value in scope.get("headers") or ():
        if name == REQUEST_ID_HEADER_BYTES:
            return request_id(value.decode("latin-1"))
    return _ids.next()
