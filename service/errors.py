"""One error tree for the service; the API maps it to HTTP status codes in one place (api/errors.py)."""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error a client may see. ``type`` is the machine-readable name in the JSON body."""

    status_code = 500
    type = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class ModelLoadFailed(ServiceError):
    """A model the admin asked to load has a version that failed verification or loading. 400, as
    Triton answers a failed load; what served before goes on serving."""

    status_code = 400
    type = "model_load_failed"


class InvalidInput(ServiceError):
    status_code = 422
    type = "invalid_input"


class Unauthorized(ServiceError):
    """A missing or wrong API key or admin key (service/auth.py)."""

    status_code = 401
    type = "unauthorized"

    def __init__(self, message: str):
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(ServiceError):
    """The model repository while no admin key is set (service/auth.py)."""

    status_code = 403
    type = "forbidden"


class ModelNotFound(ServiceError):
    status_code = 404
    type = "model_not_found"


class PayloadTooLarge(ServiceError):
    status_code = 413
    type = "payload_too_large"


class Overloaded(ServiceError):
    status_code = 429
    type = "overloaded"

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message, headers={"Retry-After": str(max(1, int(retry_after_s)))})


class NotReady(ServiceError):
    status_code = 503
    type = "not_ready"


class DeadlineExceeded(ServiceError):
    status_code = 503
    type = "timeout"


class InferenceFailed(ServiceError):
    """The backend raised while running a batch; the message never carries the backend's text."""

    status_code = 500
    type = "inference_failed"


class NotImplementedHere(ServiceError):
    """A part of a protocol this server does not serve (the gRPC service's other RPCs): UNIMPLEMENTED
    over gRPC, counted as 404, as an unknown HTTP route is (a client's mistake, not a server error)."""

    status_code = 404
    type = "not_implemented"


class ClientDisconnected(ServiceError):
    """The client went away before its answer was ready; nobody reads this response."""

    status_code = 499
    type = "client_disconnected"


class ConfigurationError(Exception):
    """The server cannot start as configured (a setting asks for what is not installed). Not a client's
    error: ``bertserve`` prints its one-line message and exits (service/__main__.py)."""


def shown(value: object, limit: int = 64) -> str:
    """A client's value as an error message quotes it: its repr, cut to about ``limit`` characters.

    Never raises, and never grows with the value: JSON allows what repr() refuses or cannot finish (an
    int past Python's 4300-digit str() limit, lists nested near the recursion limit), and a message
    that echoed a client's megabyte back would be an amplifier. Big integers are described, not printed.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        digits = int(value.bit_length() * 0.30103) + 1  # log10(2): the digit count, give or take one
        return f"{'a negative' if value < 0 else 'an'} integer of about {digits} digits"
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        return f"a {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
