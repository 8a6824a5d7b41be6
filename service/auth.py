"""Access control: optional API keys for the inference routes, a separate admin key for the model
repository routes, health and metrics open by default.

A pure ASGI middleware that decides from the path alone, before routing and before the body is read,
so a request without the right key costs almost nothing. Keys are compared with hmac.compare_digest
against every configured key (no early exit), and never logged: the access log has no headers.
"""

from __future__ import annotations

import hmac

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from service import routes
from service.settings import ServiceSettings


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers") or ():
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def _matches(token: str | None, keys: list[bytes]) -> bool:
    given = (token or "").encode()
    ok = False
    for key in keys:  # every key is compared, whichever matches
        ok |= hmac.compare_digest(given, key)
    return ok and token is not None


class AccessControl:
    def __init__(self, app: ASGIApp, settings: ServiceSettings):
        self.app = app
        self.api_keys = [k.encode() for k in settings.api_key_list]
        self.admin_keys = [settings.admin_secret.encode()] if settings.admin_secret else []
        self.open_health = settings.open_health_and_metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if path.startswith(routes.REPOSITORY_PREFIX):
            if not self.admin_keys:
                return await self._refuse(scope, receive, send, 403, "forbidden",
                                          "the model repository routes are disabled; set BERTSERVE_ADMIN_KEY")
            if not _matches(_bearer(scope), self.admin_keys):
                return await self._refuse(scope, receive, send, 401, "unauthorized",
                                          "this route needs the admin key: Authorization: Bearer <key>")
        elif self.api_keys and not (self.open_health and path in routes.OPEN_WITHOUT_KEY):
            if not _matches(_bearer(scope), self.api_keys):
                return await self._refuse(scope, receive, send, 401, "unauthorized",
                                          "missing or wrong API key: send Authorization: Bearer <key>")
        await self.app(scope, receive, send)

    async def _refuse(self, scope, receive, send, status: int, type_: str, message: str) -> None:
        from service.api.errors import error_response

        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        response = error_response(Request(scope, receive), status, type_, message, headers)
        await response(scope, receive, send)
