"""CORS for browser apps on other origins (BERTSERVE_CORS_ORIGINS): Starlette's CORSMiddleware, outside
every other layer.

Outermost, so that a preflight (OPTIONS with Origin and Access-Control-Request-Method) is answered
before the keys (service/auth.py: a browser never sends credentials with a preflight) and before the
door (service/shedding.py), and is neither refused nor counted as a request; and so that every answer
carries the headers a browser needs to let the page read it, errors included: the keys' 401, the door's
429, the routes' 404 and 422, and the 500 of an unexpected error, which Starlette's ServerErrorMiddleware
sends from outside the app's own middleware (hence the wrapping of the built stack, not add_middleware).
Off (no layer at all) while no origin is set.
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from service.api.common import TIMEOUT_HEADER
from service.api.kserve import BINARY_HEADER
from service.context import REQUEST_ID_HEADER
from service.observability import RESPONSE_HEADERS
from service.settings import ServiceSettings

# What our APIs are called with.
ALLOW_METHODS = ("GET", "POST", "OPTIONS")
ALLOW_HEADERS = ("Authorization", "Content-Type", REQUEST_ID_HEADER, TIMEOUT_HEADER, BINARY_HEADER)
# Response headers clients read, beyond those every browser shows (Content-Type, ...): the request id and
# timings (service/observability.py), Retry-After on 429, WWW-Authenticate on 401, KServe's binary split.
EXPOSE_HEADERS = (*RESPONSE_HEADERS, "Retry-After", "WWW-Authenticate", BINARY_HEADER)


def add_cors(app: FastAPI, settings: ServiceSettings) -> None:
    """Put CORS around ``app``'s whole middleware stack when origins are set. Call it last in
    ``create_app``: OpenTelemetry's instrumentation (service/tracing.py) wraps the stack too and expects
    to find Starlette's own outermost layer, so it must wrap first."""
    origins = settings.cors_origin_list
    if not origins:
        return
    build = app.build_middleware_stack

    def build_with_cors():
        return CORSMiddleware(build(), allow_origins=origins, allow_methods=ALLOW_METHODS,
                              allow_headers=ALLOW_HEADERS, allow_credentials=settings.cors_allow_credentials,
                              expose_headers=EXPOSE_HEADERS)

    app.build_middleware_stack = build_with_cors
