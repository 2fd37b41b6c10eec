"""The error every client sees, in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with a status.

Raised by the hot path (routing) and by the rate limiter (governance); the constructors of the common errors are in
routing.errors, which re-exports this class. Also the one parser of a backend's error body (`error_message_from`),
used by the router (passthrough and 5xx messages) and by the nightly checks (backends.checks).
"""

from __future__ import annotations

import re

import orjson

ERROR_MESSAGE_MAX = 1000
"""A backend's error message is cut to this many characters (a backend may send anything)."""
_TEXT_BODY_MAX = 500
_ADDRESS = re.compile(r"\('[^']*', \d+(?:, \d+, \d+)?\)|\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b|\bhttps?://\S+")


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


def strip_addresses(text: str) -> str:
    """The text with IP addresses, (host, port) tuples and URLs replaced by `<address>`."""
    return _ADDRESS.sub("<address>", text)


def error_message_from(raw: bytes | str, status: int | None = None) -> str:
    """The human message of a backend's error body: the `error.message` of an OpenAI/vLLM error, else a string
    `error`, `message` or `detail` (FastAPI), else the start of its text with addresses removed, else
    "HTTP <status> with an empty body" ("" without a status). At most ERROR_MESSAGE_MAX characters."""
    data_bytes = raw.encode() if isinstance(raw, str) else raw
    try:
        data = orjson.loads(data_bytes)
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        err = data.get("error", data)
        message: object = None
        if isinstance(err, dict) and isinstance(err.get("message"), str) and err["message"]:
            message = err["message"]
        elif isinstance(err, str) and err:
            message = err
        elif isinstance(data.get("message"), str) and data["message"]:
            message = data["message"]
        elif isinstance(data.get("detail"), str) and data["detail"]:
            message = data["detail"]
        if isinstance(message, str):
            return message[:ERROR_MESSAGE_MAX]
    text = data_bytes[:_TEXT_BODY_MAX].decode("utf-8", "replace").strip()
    if text:
        return strip_addresses(text)
    return f"HTTP {status} with an empty body" if status is not None else ""
