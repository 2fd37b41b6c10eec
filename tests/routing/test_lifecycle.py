"""One request lifecycle: on every path (JSON, SSE, WebSocket) and every ending (success, the backend's own error,
a backend failure, a stream broken mid-way, a client that leaves), each step happens exactly once per request:
the backend slot is released with one verdict, the upstream response is closed, one usage record is written and
the rate-limit reservation is settled once.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import httpx
import orjson
import pytest
from channels.testing import WebsocketCommunicator

from backends.mock_vllm import MockServer, MockVLLM
from governance.models import key_hash
from governance.ratelimit import LocalRateLimiter, Reservation
from governance.snapshot import KeySnap, KeySnapshot
from routing.gateway import Gateway
from routing.registry import RegistryCache
from routing.ws import websocket_application
from tests.factories import backend_snap, registry_snap
from tests.routing.conftest import HostRouter

SECRET = "sk-lifecycle"
CHAT = {"model": "chat-model", "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 30}


class CountingLimiter(LocalRateLimiter):
    """A local limiter that counts settlements."""

    def __init__(self) -> None:
        super().__init__()
        self.settled: list[int] = []

    async def settle(self, reservation: Reservation, actual_tokens: int) -> None:
        self.settled.append(actual_tokens)
        await super().settle(reservation, actual_tokens)


class CountingResponse:
    """An upstream response whose closes are counted."""

    def __init__(self, response: Any, counts: Counter[str]) -> None:
        self._response = response
        self._counts = counts

    def __getattr__(self, name: str) -> Any:
        return getattr(self._response, name)

    async def aclose(self) -> None:
        self._counts["close"] += 1
        await self._response.aclose()


class Steps:
    """Counts the lifecycle's steps at their boundaries: slot released, response closed, usage, settle."""

    def __init__(self, gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
        self.counts: Counter[str] = Counter()
        self.gateway = gateway
        dispatcher = gateway.dispatcher
        done, send = dispatcher.done, dispatcher.send

        def counted_done(backend: Any, ok: bool | None = True, reason: str = "") -> None:
            self.counts["done"] += 1
            done(backend, ok, reason)

        async def counted_send(**kwargs: Any) -> Any:
            response, backend = await send(**kwargs)
            return CountingResponse(response, self.counts), backend

        monkeypatch.setattr(dispatcher, "done", counted_done)
        monkeypatch.setattr(dispatcher, "send", counted_send)

    def once_each(self) -> dict[str, int]:
        """Counts of every step, with the usage records and settlements."""
        limiter = self.gateway.limiter
        assert isinstance(limiter, CountingLimiter)
        return {
            **self.counts,
            "usage": len(self.gateway.usage.events),  # type: ignore[attr-defined]
            "settle": len(limiter.settled),
        }


@pytest.fixture
def mock_vllm() -> Iterator[MockServer]:
    """The mock vLLM on a real loopback socket, so that streams arrive chunk by chunk."""
    with MockServer(models=["served-chat", "served-text"], embed_models=["served-embed"]) as server:
        yield server


@pytest.fixture
def gateway(make_gateway: Callable[..., Gateway], mock_vllm: MockServer) -> Gateway:
    registry = registry_snap(backends=[backend_snap("b1", base_url=mock_vllm.url)])
    gateway = make_gateway(registry=registry, max_attempts=1)
    key = KeySnap(
        id=7, name="team", allowed_models=None, expires_at=None, rpm_limit=1000, tpm_limit=None, daily_token_budget=None
    )
    gateway.keys = RegistryCache.static(KeySnapshot(version=1, by_hash={key_hash(SECRET): key}))
    gateway.limiter = CountingLimiter()
    return gateway


@pytest.fixture
def steps(gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> Steps:
    return Steps(gateway, monkeypatch)


async def call(
    gateway: Gateway,
    body: dict[str, Any],
    *,
    leave_after_chunks: int | None = None,
    leave_after_s: float | None = None,
) -> list[dict]:
    """Drive the gateway's ASGI app directly; the client disconnects after N body messages, or after some seconds,
    when asked."""
    sent: list[dict] = []
    left = asyncio.Event()
    request_sent = False
    if leave_after_s is not None:
        asyncio.get_running_loop().call_later(leave_after_s, left.set)

    async def receive() -> dict[str, Any]:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": orjson.dumps(body), "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        if left.is_set():
            raise OSError("client gone")
        sent.append(dict(message))
        chunks = sum(1 for m in sent if m["type"] == "http.response.body" and m.get("body"))
        if leave_after_chunks is not None and chunks >= leave_after_chunks:
            left.set()

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [(b"content-type", b"application/json"), (b"authorization", f"Bearer {SECRET}".encode())],
    }
    async with asyncio.timeout(10):
        await gateway(scope, receive, send)
    return sent


def status_of(sent: list[dict]) -> int:
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


ONCE = {"done": 1, "close": 1, "usage": 1, "settle": 1}


async def test_json_success_each_step_once(gateway: Gateway, steps: Steps) -> None:
    sent = await call(gateway, CHAT)
    assert status_of(sent) == 200
    assert steps.once_each() == ONCE
    assert gateway.usage.events[-1].completion_tokens == 30  # type: ignore[attr-defined]


async def test_json_backend_own_400_each_step_once(gateway: Gateway, steps: Steps, mock_vllm: MockServer) -> None:
    mock_vllm.config.fail_status = 400
    sent = await call(gateway, CHAT)
    assert status_of(sent) == 400
    assert steps.once_each() == ONCE


async def test_json_backend_500_each_step_once(gateway: Gateway, steps: Steps, mock_vllm: MockServer) -> None:
    mock_vllm.config.fail_status = 500
    sent = await call(gateway, CHAT)
    assert status_of(sent) == 502
    assert steps.once_each() == ONCE
    assert gateway.usage.events[-1].status == 502  # type: ignore[attr-defined]


async def test_sse_success_each_step_once(gateway: Gateway, steps: Steps) -> None:
    sent = await call(gateway, {**CHAT, "stream": True})
    assert status_of(sent) == 200
    assert steps.once_each() == ONCE
    event = gateway.usage.events[-1]  # type: ignore[attr-defined]
    assert (event.status, event.completion_tokens, event.stream) == (200, 30, True)


async def test_sse_broken_mid_stream_each_step_once(gateway: Gateway, steps: Steps, mock_vllm: MockServer) -> None:
    mock_vllm.config.die_after_tokens = 3
    sent = await call(gateway, {**CHAT, "stream": True})
    assert b"event: error" in b"".join(m.get("body", b"") for m in sent)
    assert steps.once_each() == ONCE
    assert gateway.usage.events[-1].status == 502  # type: ignore[attr-defined]


async def test_sse_client_leaving_each_step_once(gateway: Gateway, steps: Steps, mock_vllm: MockServer) -> None:
    mock_vllm.config.token_delay_s = 0.01
    await call(gateway, {**CHAT, "stream": True}, leave_after_chunks=3)
    assert steps.once_each() == ONCE
    assert gateway.usage.events[-1].status == 499  # type: ignore[attr-defined]


async def test_json_client_leaving_releases_the_backend(gateway: Gateway, steps: Steps, mock_vllm: MockServer) -> None:
    # given a backend that takes 5 s to answer a non-streamed request
    mock_vllm.config.latency_s = 5.0
    # when the client disconnects after 0.8 s
    async with asyncio.timeout(3):
        sent = await call(gateway, CHAT, leave_after_s=0.8)
    # then the upstream request is cancelled at once (the backend stops working on it), nothing is sent,
    # and the request is recorded once as 499 with its slot released (no response object was ever returned)
    assert sent == []
    async with asyncio.timeout(2):
        while mock_vllm.stats.open_requests:
            await asyncio.sleep(0.02)
    assert steps.once_each() == {"done": 1, "usage": 1, "settle": 1}
    assert gateway.usage.events[-1].status == 499  # type: ignore[attr-defined]
    assert gateway.dispatcher.in_flight["b1"] == 0


async def test_no_backend_reached_records_and_settles_once_without_a_slot(gateway: Gateway, steps: Steps) -> None:
    sent = await call(gateway, {**CHAT, "model": "embed-model"})  # wrong kind: 400 before any backend
    assert status_of(sent) == 400
    assert steps.once_each() == {"usage": 1, "settle": 0}  # refused before admission: nothing reserved


async def _ws_request(gateway: Gateway, body: dict[str, Any], *, cancel_after_chunks: int | None = None) -> list:
    communicator = WebsocketCommunicator(
        websocket_application(gateway), "/v1/ws", headers=[(b"authorization", f"Bearer {SECRET}".encode())]
    )
    connected, _ = await communicator.connect()
    assert connected
    rid = uuid.uuid4().hex
    await communicator.send_json_to({"type": "request", "id": rid, "endpoint": "chat.completions", "body": body})
    messages = []
    async with asyncio.timeout(10):
        while True:
            message = await communicator.receive_json_from(timeout=5)
            messages.append(message)
            if message["type"] in {"done", "error", "cancelled"}:
                break
            chunks = sum(1 for m in messages if m["type"] == "chunk")
            if cancel_after_chunks is not None and chunks == cancel_after_chunks:
                await communicator.send_json_to({"type": "cancel", "id": rid})
    await communicator.disconnect()
    return messages


async def test_websocket_success_each_step_once(gateway: Gateway, steps: Steps) -> None:
    messages = await _ws_request(gateway, CHAT)
    assert messages[-1]["type"] == "done" and messages[-1]["usage"]["completion_tokens"] == 30
    assert steps.once_each() == ONCE


async def test_websocket_cancel_each_step_once(gateway: Gateway, steps: Steps, mock_vllm: MockServer) -> None:
    mock_vllm.config.token_delay_s = 0.01
    messages = await _ws_request(gateway, CHAT, cancel_after_chunks=2)
    assert messages[-1]["type"] == "cancelled"
    assert steps.once_each() == ONCE
    assert gateway.usage.events[-1].status == 499  # type: ignore[attr-defined]


async def test_websocket_backend_500_each_step_once(gateway: Gateway, steps: Steps, mock_vllm: MockServer) -> None:
    mock_vllm.config.fail_status = 500
    messages = await _ws_request(gateway, CHAT)
    assert messages[-1]["type"] == "error" and messages[-1]["status"] == 502
    assert steps.once_each() == ONCE


async def test_client_key_sees_no_backend_name(gateway: Gateway, mock_vllm: MockServer) -> None:
    ok = await call(gateway, CHAT)
    headers = dict(next(m for m in ok if m["type"] == "http.response.start")["headers"])
    assert b"x-router-backend" not in headers
    mock_vllm.config.fail_status = 500
    failed = await call(gateway, CHAT)
    body = b"".join(m.get("body", b"") for m in failed)
    assert b"b1" not in body and b"127.0.0.1" not in body
    assert orjson.loads(body)["error"]["code"] == "backend_error"


async def test_master_key_sees_backend_name(make_gateway: Callable[..., Gateway]) -> None:
    mock = MockVLLM()
    mock.config.models = ["served-chat"]
    gateway = make_gateway(registry=registry_snap(), transport=HostRouter({"mock-a": mock}))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="http://router") as client:
        from tests.conftest import AUTH

        response = await client.post("/v1/chat/completions", headers=AUTH, json=CHAT)
    assert response.headers["x-router-backend"] == "b1"


async def test_budget_holds_when_every_client_leaves_early(gateway: Gateway, mock_vllm: MockServer) -> None:
    """Given a key with a 2,000-token daily budget, when every client leaves its stream after a few chunks,
    then each stream is charged the tokens generated up to its last chunk, and the budget stops admission."""
    key = KeySnap(
        id=8,
        name="budget",
        allowed_models=None,
        expires_at=None,
        rpm_limit=None,
        tpm_limit=None,
        daily_token_budget=2000,
    )
    gateway.keys = RegistryCache.static(KeySnapshot(version=2, by_hash={key_hash(SECRET): key}))
    mock_vllm.config.token_delay_s = 0.005
    long_prompt = [{"role": "user", "content": "Tell me a story about " + "a very long road " * 80}]
    body = {**CHAT, "messages": long_prompt, "stream": True, "max_tokens": 200}
    statuses = []
    for _ in range(30):
        sent = await call(gateway, body, leave_after_chunks=6)
        statuses.append(status_of(sent))
        if statuses[-1] == 429:
            break
    limiter = gateway.limiter
    assert isinstance(limiter, CountingLimiter)
    charged = limiter.settled
    streamed = [e for e in gateway.usage.events if e.status == 499]  # type: ignore[attr-defined]
    # each early-leaving stream was charged its prompt and the tokens generated before the client left
    assert charged and all(c == e.prompt_tokens + e.completion_tokens for c, e in zip(charged, streamed, strict=True))
    assert all(e.completion_tokens >= 3 for e in streamed)
    # and the budget held: admission stopped once it was spent, with no more than it granted
    assert statuses[-1] == 429
    assert len(charged) < 10
    assert sum(charged) <= 2000 + 400  # the last admitted stream may overrun by what it consumed
