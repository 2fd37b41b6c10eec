"""OpenAI-shaped API errors: `{"error": {"message", "type", "param", "code"}}` with the right status."""

from __future__ import annotations

import orjson


class APIError(Exception):
    """An error answered to the client in OpenAI's JSON shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's field name
        param: str | None = None,
        code: str | int | None = None,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers
        # Context for the usage record of a failed request (set by the gateway as it learns them).
        self.model: str | None = None
        self.backend: str | None = None
        self.recorded = False

    def payload(self) -> dict[str, object]:
        """The error object as a dict."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def body(self) -> bytes:
        """The error as JSON bytes."""
        return orjson.dumps(self.payload())


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    """400: the request is malformed or a parameter is invalid."""
    return APIError(400, message, param=param, code=code)


def unauthorized(message: str = "Missing or invalid API key.") -> APIError:
    """401: no key, or a key the router does not accept."""
    return APIError(
        401, message, type="authentication_error", code="invalid_api_key", headers=((b"www-authenticate", b"Bearer"),)
    )


def model_not_found(model: str) -> APIError:
    """404: the model does not exist (or is not visible to this key)."""
    return APIError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def no_backend(model: str, *, retry_after_s: int = 5) -> APIError:
    """503: nothing can serve the model right now."""
    return APIError(
        503,
        f"No backend is available to serve model `{model}` right now; retry later.",
        type="server_error",
        code="no_backend_available",
        headers=((b"retry-after", str(retry_after_s).encode()),),
    )


def backend_failed(backend: str, reason: str, *, status: int = 502) -> APIError:
    """502 (or a passed-through 503): the backend failed to answer properly."""
    error = APIError(status, f"Backend `{backend}` failed: {reason}", type="server_error", code="backend_error")
    error.backend = backend
    return error


def backend_timeout(backend: str, timeout_s: float, what: str = "respond") -> APIError:
    """504: the backend did not answer in time."""
    error = APIError(
        504,
        f"Backend `{backend}` did not {what} within {timeout_s:g} s.",
        type="server_error",
        code="backend_timeout",
    )
    error.backend = backend
    return error


def capacity_exceeded(model: str, *, queue_full: bool, retry_after_s: int = 1) -> APIError:
    """429: every usable backend is at its concurrency limit and the wait queue is full or timed out."""
    why = "the wait queue is full" if queue_full else "no slot freed up in time"
    return APIError(
        429,
        f"All backends serving `{model}` are at capacity ({why}); retry shortly.",
        type="rate_limit_error",
        code="backend_capacity",
        headers=((b"retry-after", str(retry_after_s).encode()),),
    )
