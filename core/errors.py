"""The error every client sees, in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with a status.

Raised by the hot path (routing) and by the rate limiter (governance); the constructors of the common errors are in
routing.errors, which re-exports this class.
"""

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
        # The message with internal names (the backend's), shown to the master key only.
        self.internal_message: str | None = None
        self.backend: str | None = None

    def payload(self, internal: bool = False) -> dict[str, object]:
        """The error object as a dict (with internal names when `internal`)."""
        message = self.internal_message if internal and self.internal_message else self.message
        return {"error": {"message": message, "type": self.type, "param": self.param, "code": self.code}}

    def body(self, internal: bool = False) -> bytes:
        """The error as JSON bytes."""
        return orjson.dumps(self.payload(internal))
