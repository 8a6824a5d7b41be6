"""Load shedding at the door: an inference request for a saturated model is refused (429 with
Retry-After) before FastAPI routes, validates and tokenizes it.

Under overload a server spends much of its time refusing (docs/measurements.md); every millisecond of
Python a refusal costs is taken from the model. Here a refusal costs reading the body, one orjson
parse to find the model and count its inputs, and one question to its admission
(service/batching/admission.py). An admitted request carries its ticket in its context; the model
entry uses that ticket instead of taking another, and its submit turns it into queued items. So a
burst read in one go is admitted only as far as the queue has room, and the rest is refused here,
cheaply, not after tokenizing. Anything this layer cannot read plainly (not a JSON object, a model it
does not know, a model not ready, more inputs than its queue holds) goes on to the routes, which answer
it as usual.
"""

from __future__ import annotations

import re

import orjson
from fastapi import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from service import context
from service.errors import Overloaded, PayloadTooLarge, ServiceError
from service.routes import BODY_NAMED, KSERVE_INFER, KSERVE_VERSION_INFER

# KServe v2 names the model (and maybe the version) in the path.
KSERVE_INFER_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([0-9]{1,9}))?/infer$")
KSERVE_TEMPLATES = {False: KSERVE_INFER, True: KSERVE_VERSION_INFER}


class _RouteTemplate:
    """Stands in for the matched route in the scope (``route.path`` is what metrics read)."""

    __slots__ = ("path",)

    def __init__(self, path: str):
        self.path = path


class LoadShedder:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        kserve = KSERVE_INFER_PATH.match(path) if scope["type"] == "http" else None
        if scope["type"] != "http" or scope.get("method") != "POST" or not (path in BODY_NAMED or kserve):
            return await self.app(scope, receive, send)
        registry = getattr(scope["app"].state, "registry", None)
        if registry is None or not registry.entries:
            return await self.app(scope, receive, send)

        chunks, message = [], {"more_body": True}
        while message.get("more_body", False):
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            chunks.append(message.get("body", b""))
        body = b"".join(chunks)

        entry, items = self._entry(registry, body, kserve)
        if entry is not None and entry.batcher is not None:
            try:
                # Given back when the request is over if no queue took it (RequestContext.finish).
                context.of(scope).ticket = entry.batcher.admission.admit(items)
            except PayloadTooLarge:
                pass  # more than the queue holds: the route answers 413 with the limit that applies
            except Overloaded as exc:
                from service.api.errors import error_response

                context.of(scope).model = entry.name
                # Refused before routing: name the route template the request was for, so its
                # metrics and log line say which API was refused, not "unmatched".
                scope["route"] = _RouteTemplate(path if not kserve else KSERVE_TEMPLATES[kserve.group(2) is not None])
                request = Request(scope, receive)
                response = error_response(request, exc.status_code, exc.type, exc.message, exc.headers)
                return await response(scope, receive, send)

        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    def _entry(registry, body: bytes, kserve) -> tuple[object | None, int]:
        """The model entry the request is for (None: let the routes answer) and its number of inputs."""
        items = 1
        if kserve:
            name, version = kserve.group(1), int(kserve.group(2)) if kserve.group(2) else None
        else:
            try:
                doc = orjson.loads(body)
            except orjson.JSONDecodeError:
                return None, 0
            if not isinstance(doc, dict) or not isinstance(doc.get("model", ""), (str, type(None))):
                return None, 0
            name, version = doc.get("model") or None, None
            inputs = doc.get("input", doc.get("inputs", doc.get("ids")))  # ids: /decode
            # A list of texts or of token-id lists is one input each; a text or one id list is one.
            if isinstance(inputs, list) and inputs and isinstance(inputs[0], (str, list)):
                items = len(inputs)
        try:
            entry = registry.get(name, version)
        except ServiceError:
            return None, 0
        return entry, items
