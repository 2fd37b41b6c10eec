"""OpenAI-shaped API errors: `{"error": {"message", "type", "param", "code"}}` with the right status."""

from __future__ import annotations

import orjson

from core.errors import APIError, error_message_from, strip_addresses  # the parser and the stripper live in core


class PassthroughError(APIError):
    """A backend's own 4xx answer, passed to the client: its body as it was when it is OpenAI-shaped."""

    def __init__(self, raw: bytes, status: int, message: str, error: dict[str, object] | None) -> None:
        super().__init__(status, message, code=status)
        self.raw = raw if error is not None else None
        if error is not None:
            err_type, param, code = error.get("type"), error.get("param"), error.get("code")
            self.type = err_type if isinstance(err_type, str) else self.type
            self.param = param if isinstance(param, str) else None
            self.code = code if isinstance(code, str | int) else None

    def body(self, internal: bool = False) -> bytes:
        """The backend's bytes when they were already an OpenAI error object."""
        return self.raw if self.raw is not None else super().body(internal)


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


def backend_failed(backend: str, reason: str, *, status: int = 502, detail: str | None = None) -> APIError:
    """502 (or a passed-through 503): the backend failed to answer properly.

    Clients read the reason; the master key also reads the backend's name and the detail (never an address).
    """
    reason = strip_addresses(reason)
    error = APIError(status, f"The backend failed: {reason}", type="server_error", code="backend_error")
    suffix = f" ({strip_addresses(detail)})" if detail else ""
    error.internal_message = f"Backend `{backend}` failed: {reason}{suffix}"
    error.backend = backend
    return error


def backend_timeout(backend: str, timeout_s: float, what: str = "respond") -> APIError:
    """504: the backend did not answer in time."""
    error = APIError(
        504, f"The backend did not {what} within {timeout_s:g} s.", type="server_error", code="backend_timeout"
    )
    error.internal_message = f"Backend `{backend}` did not {what} within {timeout_s:g} s."
    error.backend = backend
    return error


def passthrough(raw: bytes, status: int) -> APIError:
    """A backend's own 4xx answer for the client: OpenAI-shaped bodies pass as they are, others are wrapped."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = None
    error = data["error"] if isinstance(data, dict) and isinstance(data.get("error"), dict) else None
    return PassthroughError(raw, status, error_message_from(raw, status), error)


def describe(exc: BaseException) -> str:
    """An exception as a short text for errors and logs: its class and message, with addresses removed."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    text = strip_addresses(text)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def capacity_exceeded(model: str, *, queue_full: bool, retry_after_s: int = 1, shed: bool = False) -> APIError:
    """429: every usable backend is at its concurrency limit and the wait queue is full (the request was refused,
    or `shed`: a request to be served earlier took its place) or the wait timed out."""
    if shed:
        why = "the wait queue is full and a request of a higher class or of a key with fewer waiting took its place"
    else:
        why = "the wait queue is full" if queue_full else "no slot freed up in time"
    return APIError(
        429,
        f"All backends serving `{model}` are at capacity ({why}); retry shortly.",
        type="rate_limit_error",
        code="backend_capacity",
        headers=((b"retry-after", str(retry_after_s).encode()),),
    )
