"""The one place where errors become HTTP responses: {"error": {"type", "message"}} plus a request id."""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from service.api.responses import FastJSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

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
REQUEST_ID_HEADER = "x-request-id"


def request_id(request: Request) -> str:
    """The id app.RequestGuard gave this request (from the client's header or fresh)."""
    rid = getattr(request.state, "request_id", None)
    if rid is None:  # only outside the guard, e.g. an app built without it
        rid = request.state.request_id = uuid.uuid4().hex
    return rid


def error_response(request: Request, status: int, type_: str, message: str,
                   headers: dict[str, str] | None = None) -> FastJSONResponse:
    rid = request_id(request)
    request.state.error_type = type_  # for the request metrics and the access log
    body = {"error": {"type": type_, "message": message, "request_id": rid}}
    return FastJSONResponse(body, status_code=status, headers={**(headers or {}), REQUEST_ID_HEADER: rid})


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        if err.get("type") == "json_invalid":
            return "request body is not valid JSON: " + str(err.get("ctx", {}).get("error", err.get("msg")))
        parts.append(f"{loc}: {err.get('msg')}")
    more = len(exc.errors()) - 3
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError):
        return error_response(request, exc.status_code, exc.type, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return error_response(request, 422, "invalid_input", _describe_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        type_ = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(exc.status_code, "http_error")
        # Starlette's own headers matter (405 carries Allow, as RFC 9110 requires).
        return error_response(request, exc.status_code, type_, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        # Never echo an internal exception's text to the client.
        log.exception("unhandled error for request %s", request_id(request))
        return error_response(request, 500, "internal_error", "internal server error; see the server log")
