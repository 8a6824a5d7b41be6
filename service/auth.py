"""Access control: optional API keys for the inference routes, a separate admin key for the model
repository routes, health and metrics open by default.

A pure ASGI middleware that decides from the path alone, before routing and before the body is read,
so a request without the right key costs almost nothing. Keys are compared with hmac.compare_digest
against every configured key (no early exit), and never logged: the access log has no headers.
The decision itself (``Keys.check``) is transport-free: the gRPC service (service/api/grpc_service.py)
asks it with the ``authorization`` metadata.
"""

from __future__ import annotations

import hmac

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from service import routes
from service.errors import Forbidden, ServiceError, Unauthorized
from service.settings import ServiceSettings


def bearer_token(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer KEY`` value; None for none or another scheme."""
    if authorization is None:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers") or ():
        if name == b"authorization":
            return bearer_token(value.decode("latin-1"))
    return None


def _matches(token: str | None, keys: list[bytes]) -> bool:
    given = (token or "").encode()
    ok = False
    for key in keys:  # every key is compared, whichever matches
        ok |= hmac.compare_digest(given, key)
    return ok and token is not None


class Keys:
    """The configured API keys and admin key, and who may do what with a given key."""

    def __init__(self, settings: ServiceSettings):
        self.api_keys = [k.encode() for k in settings.api_key_list]
        self.admin_keys = [settings.admin_secret.encode()] if settings.admin_secret else []
        self.open_health = settings.open_health_and_metrics

    def check(self, token: str | None, *, repository: bool = False, probe: bool = False) -> None:
        """Raise Forbidden or Unauthorized unless ``token`` may call: a model repository route or RPC
        (``repository``: the admin key, and none while no admin key is set), a probe (``probe``: open
        while BERTSERVE_OPEN_HEALTH_AND_METRICS is on), or anything else (an API key, when keys are set)."""
        if repository:
            if not self.admin_keys:
                raise Forbidden("the model repository routes are disabled; set BERTSERVE_ADMIN_KEY")
            if not _matches(token, self.admin_keys):
                raise Unauthorized("this route needs the admin key: Authorization: Bearer <key>")
        elif self.api_keys and not (self.open_health and probe):
            if not _matches(token, self.api_keys):
                raise Unauthorized("missing or wrong API key: send Authorization: Bearer <key>")


class AccessControl:
    def __init__(self, app: ASGIApp, settings: ServiceSettings):
        self.app = app
        self.keys = Keys(settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        try:
            self.keys.check(_bearer(scope), repository=path.startswith(routes.REPOSITORY_PREFIX),
                            probe=path in routes.OPEN_WITHOUT_KEY)
        except ServiceError as refusal:
            return await self._refuse(scope, receive, send, refusal)
        await self.app(scope, receive, send)

    async def _refuse(self, scope, receive, send, refusal: ServiceError) -> None:
        from service.api.errors import error_response

        response = error_response(Request(scope, receive), refusal.status_code, refusal.type, refusal.message,
                                  refusal.headers)
        await response(scope, receive, send)
