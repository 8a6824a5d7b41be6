"""What every inference route shares: tokenize off the event loop, submit to the batcher, watch the client."""

from __future__ import annotations

import asyncio
import time
from typing import Sequence

import numpy as np
from fastapi import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import ClientDisconnected, InvalidInput, PayloadTooLarge
from service.registry import ModelEntry
from service.tokenization import Direction, Encoded, check_token_total
from service.tracing import annotate_request


# Requests with less text (characters, or token ids) than this are tokenized on the event loop; larger
# ones in the tokenizer pool, so a big request never stalls the loop.
INLINE_TOKENIZE_CHARS = 2000


def state(request: Request):
    return request.app.state


def model_entry(request: Request, name: str | None, version: int | None = None) -> ModelEntry:
    """The loaded model a request names (the default when None); remembered for metrics and logs, and
    held until the response is sent (``EntryLeases``), so that unloading it lets this request finish."""
    entry = state(request).registry.get(name, version)
    request.state.model = entry.name
    entry.acquire()
    leases = getattr(request.state, "leases", None)
    if leases is None:
        leases = request.state.leases = []
    leases.append(entry)
    return entry


class EntryLeases:
    """Pure ASGI middleware: gives back the model entries a request resolved once it is answered, even
    when the handler raised. A version being unloaded waits for these (Registry.drain)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            await self.app(scope, receive, send)
        finally:
            for entry in scope.get("state", {}).pop("leases", ()):
                entry.release()


def _timing(request: Request) -> dict:
    timing = getattr(request.state, "timing", None)
    if timing is None:
        timing = request.state.timing = {}
    return timing


def _record_tokenization(request: Request, entry: ModelEntry, began: float, encoded: list[Encoded]) -> None:
    seconds = time.perf_counter() - began
    timing = _timing(request)
    timing["tokenization_s"] = timing.get("tokenization_s", 0.0) + seconds
    state(request).metrics.observe_tokenization(entry.name, seconds, sum(len(e) for e in encoded))


def _check_count(request: Request, items: Sequence, field: str, what: str) -> None:
    limit = state(request).settings.max_inputs_per_request
    if len(items) == 0:
        raise InvalidInput(f"{field} is empty: send at least one {what}")
    if len(items) > limit:
        raise PayloadTooLarge(f"{field} has {len(items)} items; at most {limit} per request")


def check_texts(request: Request, texts: Sequence[str], field: str = "input") -> None:
    settings = state(request).settings
    _check_count(request, texts, field, "text")
    for i, text in enumerate(texts):
        if not text.strip():
            raise InvalidInput(f"{field}[{i}] is an empty string; every input must contain text")
        if len(text) > settings.max_chars_per_text:
            raise PayloadTooLarge(f"{field}[{i}] has {len(text)} characters; at most {settings.max_chars_per_text}")
        at = unpaired_surrogate(text)
        if at is not None:  # no tokenizer takes it (a TypeError out of it), and no answer could quote it
            raise InvalidInput(f"{field}[{i}] holds an unpaired UTF-16 surrogate at character {at}; "
                               f"texts must be valid Unicode")


def unpaired_surrogate(text: str) -> int | None:
    """Where ``text`` holds half a UTF-16 pair (JSON's "\ud800" escape decodes to one), which UTF-8
    cannot encode; None when it is valid Unicode."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def check_ids(request: Request, sequences: Sequence[Sequence[int]], field: str = "input") -> None:
    _check_count(request, sequences, field, "input")


async def off_loop(request: Request, size: int, fn, *args):
    """``fn(*args)`` on the event loop when ``size`` (characters or token ids) is small, else in the
    tokenizer pool: a tweet tokenizes in tens of microseconds, cheaper than the hop to a thread and back,
    while a request of megabytes would stall every other client."""
    if size <= INLINE_TOKENIZE_CHARS:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(state(request).tokenizer_pool, fn, *args)


def _reservation(request: Request):
    """The room the door (service/shedding.py) reserved for this request in its model's queue, if any."""
    return request.scope.get("state", {}).get("reservation")


def admit(request: Request, entry: ModelEntry, items: int) -> None:
    """An overloaded model refuses before the tokenizing work, unless the door already admitted the
    request into this model's queue (its reservation counts there; admitting again would count it twice)."""
    reservation = _reservation(request)
    if reservation is None or reservation.batcher is not entry.batcher or reservation.items < items:
        entry.batcher.admit(items)


async def encode_texts(request: Request, entry: ModelEntry, texts: Sequence[str], truncate: bool,
                       direction: Direction = "right", field: str = "input") -> list[Encoded]:
    check_texts(request, texts, field)
    admit(request, entry, len(texts))
    began = time.perf_counter()
    encoded = await off_loop(request, sum(len(t) for t in texts), entry.tokenizer.encode_texts, list(texts),
                             truncate, direction, field)
    check_token_total(sum(len(e) for e in encoded), state(request).settings.max_tokens_per_request, field)
    _record_tokenization(request, entry, began, encoded)
    return encoded


async def encode_ids(request: Request, entry: ModelEntry, sequences: Sequence[Sequence[int]], truncate: bool,
                     direction: Direction = "right", field: str = "input") -> list[Encoded]:
    check_ids(request, sequences, field)
    admit(request, entry, len(sequences))
    began = time.perf_counter()
    encoded = await off_loop(request, sum(len(s) for s in sequences), entry.tokenizer.encode_ids, sequences,
                             truncate, direction, field)
    check_token_total(sum(len(e) for e in encoded), state(request).settings.max_tokens_per_request, field)
    _record_tokenization(request, entry, began, encoded)
    return encoded


async def _wait_for_disconnect(request: Request) -> None:
    # After the body is read, receive() only returns when the client disconnects.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


TIMEOUT_HEADER = "x-request-timeout"


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


async def run(request: Request, entry: ModelEntry, encoded: list[Encoded], timeout_s: float | None = None) -> np.ndarray:
    """Rows of the model output for each encoded input, in order; batched with other requests.

    ``timeout_s`` is a per-request timeout from the request body (KServe parameters); otherwise
    the X-Request-Timeout header or the server's setting applies.
    """
    wait = request_timeout(request) if timeout_s is None else min(timeout_s, state(request).settings.request_timeout_s)
    deadline = time.monotonic() + wait
    submit = asyncio.ensure_future(entry.batcher.submit([(e, len(e)) for e in encoded], deadline,
                                                        _timing(request), _reservation(request)))
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({submit, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        submit.cancel()
        raise
    finally:
        watcher.cancel()
    if submit not in done:
        submit.cancel()  # its queued items are dropped before inference
        raise ClientDisconnected("client disconnected before the answer was ready")
    rows = np.stack(submit.result())
    if state(request).tracing:
        annotate_request(entry.name, len(encoded), _timing(request))
    return rows
