"""Routing test helpers: a transport that routes by host to in-process ASGI apps, and the error-shape check."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

import httpx
import pytest

from backends.mock_vllm import MockConfig, MockVLLM

ASGIApp = Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]]


class HostRouter(httpx.AsyncBaseTransport):
    """Send each request to the in-process ASGI app registered for its host; unknown hosts refuse to connect.

    Unlike `httpx.ASGITransport`, the request's read timeout is enforced (as httpx.ReadTimeout), so that a
    hanging in-process backend behaves like a hanging real one.
    """

    def __init__(self, apps: Mapping[str, ASGIApp]) -> None:
        self.transports = {host: httpx.ASGITransport(app=app) for host, app in apps.items()}
        self.requests: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Dispatch by host; raise ConnectError for an unknown host, ReadTimeout past the read timeout."""
        host = request.url.host
        self.requests.append(host)
        transport = self.transports.get(host)
        if transport is None:
            raise httpx.ConnectError(f"[Errno 111] Connection refused ({host})", request=request)
        read_timeout = (request.extensions.get("timeout") or {}).get("read")
        try:
            async with asyncio.timeout(read_timeout):
                return await transport.handle_async_request(request)
        except TimeoutError:
            raise httpx.ReadTimeout(f"no answer from {host} within {read_timeout} s", request=request) from None


def assert_openai_error(
    response: httpx.Response,
    status: int,
    *,
    type: str,  # noqa: A002 - OpenAI's field name
    param: str | None,
    code: str | int | None,
) -> dict[str, Any]:
    """Assert a JSON OpenAI-shaped error with these status, type, param and code; return the error object."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].split(";")[0] == "application/json", response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) >= {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert (error["type"], error["param"], error["code"]) == (type, param, code), error
    return error


@pytest.fixture
def mock_b() -> MockVLLM:
    """A second in-process mock vLLM serving the same models as `mock_vllm`."""
    return MockVLLM(MockConfig(models=["served-chat", "served-text"], embed_models=["served-embed"]))
