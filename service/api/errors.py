"""The one place where errors become HTTP responses: {"error": {"type", "message"}} plus a request id;
and the table that gives the same errors their gRPC status codes (the gRPC service,
service/api/grpc_service.py, answers with the code and the same message)."""

from __future__ import annotations

import logging
import sys

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from service.api.responses import FastJSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import context
from service.context import REQUEST_ID_HEADER
from service.errors import ServiceError

log = logging.getLogger("bertserve.api")


class ErrorDetail(BaseModel):
    type: str = Field(description="machine-readable error name, e.g. invalid_input, overloaded, timeout")
    message: str
    request_id: str


class ErrorBody(BaseModel):
    """The one error shape of every route."""

    error: ErrorDetail


# Every route can answer these; documented once so that the OpenAPI schema describes real error bodies
# (FastAPI's default 422 schema is not what this server sends).
ERROR_RESPONSES: dict = {code: {"model": ErrorBody, "description": what} for code, what in (
    (400, "malformed request"), (401, "missing or wrong API key"), (404, "unknown model or route"),
    (405, "method not allowed"), (413, "too large"), (422, "invalid input"), (429, "overloaded; see Retry-After"),
    (500, "a backend failed this batch"), (503, "not ready, shutting down, or timed out"))}
# A message is for a person. One that quotes a client's text is cut here, so that no request can make
# the server echo its megabyte back, whatever the raising code quoted.
MAX_MESSAGE_CHARS = 1024


# gRPC status codes (grpc.StatusCode names) of our errors, by the HTTP status they answer with; a few
# error types first, where the HTTP status is shared with errors gRPC tells apart. Choices: 413 is
# RESOURCE_EXHAUSTED, the code gRPC itself gives a message over its size limit; 429 (overloaded) is
# UNAVAILABLE, as Triton answers overload and as gRPC clients' retry policies expect (a request that
# may succeed if sent again later, with a retry-after trailer); a timeout is DEADLINE_EXCEEDED.
GRPC_STATUS_BY_TYPE = {"timeout": "DEADLINE_EXCEEDED", "client_disconnected": "CANCELLED",
                       "not_implemented": "UNIMPLEMENTED"}
GRPC_STATUS_BY_HTTP = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
    413: "RESOURCE_EXHAUSTED", 422: "INVALID_ARGUMENT", 429: "UNAVAILABLE", 499: "CANCELLED",
    503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED",
}  # anything else (500: a backend failed, an unexpected exception): INTERNAL


def grpc_status(status: int, type_: str) -> str:
    """The gRPC status code name of an error answered over HTTP with ``status`` and ``type_``."""
    return GRPC_STATUS_BY_TYPE.get(type_) or GRPC_STATUS_BY_HTTP.get(status, "INTERNAL")


def request_id(request: Request) -> str:
    """The request's id (from the client's X-Request-Id or fresh; service/context.py)."""
    return context.of(request.scope).request_id


def printable(message: str) -> str:
    """The message as UTF-8 can carry it, at most MAX_MESSAGE_CHARS long. Client text quoted in it may
    hold unpaired UTF-16 surrogates (JSON's "\\ud800" escape decodes to one), which UTF-8 cannot
    encode: orjson would refuse the whole body and turn a 4xx into a 500. They are written as escapes."""
    message = str(message)[: MAX_MESSAGE_CHARS * 2]  # escaping grows it; no need to escape what is cut
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 3] + "..."


def error_response(request: Request, status: int, type_: str, message: str,
                   headers: dict[str, str] | None = None) -> FastJSONResponse:
    ctx = context.of(request.scope)
    rid = ctx.request_id
    ctx.error_type = type_  # for the request metrics and the access log
    body = {"error": {"type": type_, "message": printable(message), "request_id": rid}}
    return FastJSONResponse(body, status_code=status, headers={**(headers or {}), REQUEST_ID_HEADER: rid})


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        # A location may hold a client's own key (an extra field, a dict key): cut, like every quote.
        loc = ".".join(str(p)[:64] for p in err.get("loc", ()) if p != "body") or "body"
        if err.get("type") == "json_invalid":
            return "request body is not valid JSON: " + str(err.get("ctx", {}).get("error", err.get("msg")))
        parts.append(f"{loc}: {err.get('msg')}")
    more = len(exc.errors()) - 3
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _unreadable_body(exc: StarletteHTTPException) -> str | None:
    """Why a JSON body could not be read, when json.loads refused it with other than a syntax error
    (FastAPI answers those with a bare 400 "There was an error parsing the body"); else None."""
    cause = exc.__cause__
    if exc.status_code != 400 or not isinstance(cause, (ValueError, RecursionError)):
        return None
    if isinstance(cause, RecursionError):
        return "request body is not usable JSON: its arrays or objects nest deeper than this server reads"
    if isinstance(cause, UnicodeDecodeError):
        return "request body is not valid JSON: it is not valid UTF-8"
    if "digits" in str(cause):  # JSON allows any integer; Python's int() stops at a limit of digits
        return (f"request body is not usable JSON: it holds an integer of more than "
                f"{sys.get_int_max_str_digits()} digits")
    return None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError):
        return error_response(request, exc.status_code, exc.type, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return error_response(request, 422, "invalid_input", _describe_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        unreadable = _unreadable_body(exc)
        if unreadable is not None:  # the same answer as a JSON syntax error (_validation): 422 invalid_input
            return error_response(request, 422, "invalid_input", unreadable)
        type_ = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(exc.status_code, "http_error")
        # Starlette's own headers matter (405 carries Allow, as RFC 9110 requires).
        return error_response(request, exc.status_code, type_, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        # Never echo an internal exception's text to the client.
        log.exception("unhandled error for request %s", request_id(request))
        return error_response(request, 500, "internal_error", "internal server error; see the server log")
