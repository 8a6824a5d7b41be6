"""What every route shares on the HTTP side: the app's state, resolving a model (and holding it until
the answer is sent), and the ``Call`` a model entry needs: the request's context, its deadline from
the X-Request-Timeout header or the server's setting, and how to tell its client has gone."""

from __future__ import annotations

from fastapi import Request

from service import context
from service.errors import InvalidInput
from service.model_entry import Call, ModelEntry

TIMEOUT_HEADER = "x-request-timeout"


def state(request: Request):
    return request.app.state


def model_entry(request: Request, name: str | None, version: int | None = None) -> ModelEntry:
    """The loaded model a request names (the default when None), held by the request until its
    response is sent, so that unloading it lets this request finish."""
    entry = state(request).registry.get(name, version)
    context.of(request.scope).hold(entry)
    return entry


async def off_loop(request: Request, size: int, fn, *args):
    """``fn(*args)`` inline when ``size`` is small, else in the tokenizer pool (``Runtime.off_loop``)."""
    return await state(request).registry.runtime.off_loop(size, fn, *args)


def request_timeout(request: Request) -> float:
    """The server's deadline, or a shorter one the client asks for in the X-Request-Timeout header (s)."""
    limit = state(request).settings.request_timeout_s
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return limit
    try:
        asked = float(raw)
    except ValueError:
        asked = -1.0
    if not asked > 0:
        raise InvalidInput(f"{TIMEOUT_HEADER} must be a positive number of seconds, got {raw[:32]!r}")
    return min(asked, limit)


def call(request: Request, timeout_s: float | None = None, timed: bool = True) -> Call:
    """This request as a model entry sees it. ``timeout_s`` is a per-request timeout from the body
    (KServe parameters), capped by the setting; otherwise X-Request-Timeout or the setting applies.
    ``timed=False``: no deadline (nothing is queued, e.g. /tokenize), and the header is not read."""
    if not timed:
        return Call(context.of(request.scope))
    wait = request_timeout(request) if timeout_s is None else min(timeout_s, state(request).settings.request_timeout_s)

    async def disconnected() -> None:
        # After the body is read, receive() only returns when the client disconnects.
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return Call(context.of(request.scope), wait, disconnected)
