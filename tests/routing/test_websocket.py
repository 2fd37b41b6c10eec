"""The /v1/ws WebSocket endpoint against the mock vLLM on a real socket (so that upstream chunks really stream)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from channels.testing import WebsocketCommunicator

from backends.mock_vllm import MockServer, await_until
from routing.gateway import Gateway
from routing.ws import CLOSE_UNAUTHORIZED, websocket_application
from tests.conftest import AUTH, MASTER_KEY, usage_events
from tests.factories import backend_snap, registry_snap

AUTH_HEADERS = [(b"authorization", f"Bearer {MASTER_KEY}".encode())]
CAPITAL = "In one word, can you provide me the capital of France?"
STORY = "Tell me a long story."  # the default answer, repeated up to max_tokens
TERMINAL = {"done", "error", "cancelled"}


@pytest.fixture
async def server() -> AsyncIterator[MockServer]:
    """The mock vLLM on a real socket, 2 ms between streamed tokens."""
    async with MockServer(
        models=["served-chat", "served-text"], embed_models=["served-embed"], token_delay_s=0.002
    ) as mock:
        yield mock


@pytest.fixture
async def gateway(make_gateway: Callable[..., Gateway], server: MockServer) -> AsyncIterator[Gateway]:
    """A gateway whose single backend is the mock server."""
    gw = make_gateway(registry=registry_snap(backends=[backend_snap("b1", base_url=server.url)]), transport=None)
    yield gw
    await gw.dispatcher.aclose()


@asynccontextmanager
async def socket(
    gateway: Gateway, headers: list[tuple[bytes, bytes]] | None = AUTH_HEADERS, path: str = "/v1/ws", **options: Any
) -> AsyncIterator[WebsocketCommunicator]:
    """A connected communicator; disconnects (cancelling what still runs) on exit."""
    communicator = WebsocketCommunicator(websocket_application(gateway, **options), path, headers=headers)
    connected, _ = await communicator.connect()
    assert connected
    try:
        yield communicator
    finally:
        if not communicator.future.done():
            await communicator.disconnect()


def chat(rid: str, content: str = CAPITAL, **body: Any) -> dict[str, Any]:
    """A chat request message."""
    return {
        "type": "request",
        "id": rid,
        "endpoint": "chat.completions",
        "body": {"model": "chat-model", "messages": [{"role": "user", "content": content}], **body},
    }


async def collect(communicator: WebsocketCommunicator, ids: set[Any]) -> list[dict[str, Any]]:
    """Receive messages until every id in `ids` got its final message."""
    messages: list[dict[str, Any]] = []
    pending = set(ids)
    while pending:
        message = await communicator.receive_json_from(timeout=2)
        messages.append(message)
        if message["type"] in TERMINAL:
            pending.discard(message["id"])
    return messages


def text_of(messages: list[dict[str, Any]], rid: str) -> str:
    """The generated text of a chat request's chunks."""
    return "".join(
        choice["delta"].get("content") or ""
        for m in messages
        if m["type"] == "chunk" and m["id"] == rid
        for choice in m["data"]["choices"]
    )


async def test_header_auth_streams_chunks_then_done(gateway: Gateway, server: MockServer) -> None:
    async with socket(gateway) as ws:
        await ws.send_json_to(chat("a", temperature=0))
        messages = await collect(ws, {"a"})
    chunks, done = messages[:-1], messages[-1]
    assert chunks and all(m["type"] == "chunk" and m["id"] == "a" for m in chunks)
    assert {m["data"]["model"] for m in chunks} == {"chat-model"}
    assert all(m["data"]["choices"] for m in chunks)  # the usage chunk the client did not ask for is stripped
    assert text_of(messages, "a") == "Paris"
    assert done["type"] == "done" and done["id"] == "a"
    assert done["usage"]["completion_tokens"] == 1
    assert done["usage"]["total_tokens"] == done["usage"]["prompt_tokens"] + 1
    assert server.stats.last_request["model"] == "served-chat"
    assert server.stats.last_request["stream"] is True
    event = usage_events(gateway)[-1]
    assert (event.status, event.stream, event.endpoint, event.model, event.backend) == (
        200,
        True,
        "chat.completions",
        "chat-model",
        "b1",
    )
    assert (event.prompt_tokens, event.completion_tokens) == (done["usage"]["prompt_tokens"], 1)
    assert event.request_id == done["request_id"]


async def test_first_message_auth(gateway: Gateway) -> None:
    async with socket(gateway, headers=None) as ws:
        await ws.send_json_to(chat("early"))
        early = await ws.receive_json_from()
        assert (early["type"], early["id"], early["status"]) == ("error", "early", 401)  # the socket stays open
        await ws.send_json_to({"type": "auth", "api_key": MASTER_KEY})
        assert await ws.receive_json_from() == {"type": "authenticated"}
        await ws.send_json_to(
            {"type": "request", "id": 7, "endpoint": "completions", "body": {"model": "text-model", "prompt": "Hi"}}
        )
        messages = await collect(ws, {7})
    assert messages[-1]["type"] == "done"
    assert {m["data"]["model"] for m in messages[:-1]} == {"text-model"}
    assert usage_events(gateway)[-1].endpoint == "completions"


@pytest.mark.parametrize("by_header", [True, False])
async def test_bad_key_closes_4401(gateway: Gateway, by_header: bool) -> None:
    headers = [(b"authorization", b"Bearer wrong")] if by_header else None
    async with socket(gateway, headers=headers) as ws:
        if not by_header:
            await ws.send_json_to({"type": "auth", "api_key": "wrong"})
        error = await ws.receive_json_from()
        assert (error["type"], error["status"], error["error"]["code"]) == ("error", 401, "invalid_api_key")
        closed = await ws.receive_output()
        assert closed["type"] == "websocket.close"
        assert closed["code"] == CLOSE_UNAUTHORIZED
    assert not usage_events(gateway)


async def test_auth_times_out(gateway: Gateway) -> None:
    async with socket(gateway, headers=None, auth_timeout_s=0.02) as ws:
        assert (await ws.receive_json_from())["status"] == 401
        assert (await ws.receive_output())["code"] == CLOSE_UNAUTHORIZED


async def test_two_concurrent_requests_interleave(gateway: Gateway, server: MockServer) -> None:
    server.config.token_delay_s = 0.05  # `a` lasts ~0.6 s: `b` starts well before it ends, even on a slow machine
    async with socket(gateway) as ws:
        await ws.send_json_to(chat("a", "first", max_tokens=12))
        await ws.send_json_to(chat("b", "second", max_tokens=12))
        messages = await collect(ws, {"a", "b"})
    done = {m["id"]: m for m in messages if m["type"] == "done"}
    assert set(done) == {"a", "b"}
    assert done["a"]["usage"]["completion_tokens"] == done["b"]["usage"]["completion_tokens"] == 12
    order = [m["id"] for m in messages if m["type"] == "chunk"]
    assert order.index("b") < len(order) - 1 - order[::-1].index("a")  # b started before a ended: interleaved
    assert len(text_of(messages, "a").split()) == len(text_of(messages, "b").split()) == 12
    assert [e.status for e in usage_events(gateway)] == [200, 200]
    assert server.stats.completed_requests == 2


async def test_cancel_stops_the_request_and_the_upstream(gateway: Gateway, server: MockServer) -> None:
    async with socket(gateway) as ws:
        await ws.send_json_to(chat("long", STORY, max_tokens=2000))  # ~4 s of tokens
        first = await ws.receive_json_from()
        assert (first["type"], first["id"]) == ("chunk", "long")
        await ws.send_json_to({"type": "cancel", "id": "long"})
        messages = await collect(ws, {"long"})
        assert messages[-1] == {"type": "cancelled", "id": "long"}
        assert all(m["type"] == "chunk" for m in messages[:-1])
        assert await await_until(lambda: server.stats.open_requests == 0, timeout=1.0)
        assert server.stats.cancelled_requests == 1
        assert usage_events(gateway)[-1].status == 499
        await ws.send_json_to({"type": "cancel", "id": "long"})  # no longer running: a no-op
        assert await ws.receive_nothing(timeout=0.02)
        await ws.send_json_to(chat("long"))  # the id is free again
        assert (await collect(ws, {"long"}))[-1]["type"] == "done"


async def test_disconnect_cancels_running_requests(gateway: Gateway, server: MockServer) -> None:
    async with socket(gateway) as ws:
        await ws.send_json_to(chat("x", STORY, max_tokens=2000))
        await ws.send_json_to(chat("y", STORY, max_tokens=2000))
        streaming: set[str] = set()
        while streaming != {"x", "y"}:  # both upstream responses are open
            streaming.add((await ws.receive_json_from())["id"])
        await ws.disconnect()
    assert await await_until(lambda: server.stats.open_requests == 0, timeout=1.0)
    assert sorted(e.status for e in usage_events(gateway)) == [499, 499]


async def test_validation_error_matches_http(gateway: Gateway) -> None:
    body = {"model": "chat-model", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}
    async with socket(gateway) as ws:
        await ws.send_json_to({"type": "request", "id": "v", "endpoint": "chat.completions", "body": body})
        error = await ws.receive_json_from()
    assert (error["type"], error["id"], error["status"]) == ("error", "v", 400)
    assert error["error"]["param"] == "temperature"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="http://router") as client:
        http = await client.post("/v1/chat/completions", headers=AUTH, json={**body, "stream": True})
    assert http.status_code == 400
    assert http.json() == {"error": error["error"]}


async def test_unknown_model_is_404(gateway: Gateway, server: MockServer) -> None:
    async with socket(gateway) as ws:
        await ws.send_json_to({**chat("m"), "body": {"model": "nope", "messages": [{"role": "user", "content": "x"}]}})
        error = await ws.receive_json_from()
    assert (error["type"], error["id"], error["status"]) == ("error", "m", 404)
    assert (error["error"]["code"], error["error"]["param"]) == ("model_not_found", "model")
    assert server.stats.total_requests == 0


async def test_duplicate_running_id_is_refused(gateway: Gateway) -> None:
    async with socket(gateway) as ws:
        await ws.send_json_to(chat("d", STORY, max_tokens=10))
        await ws.send_json_to(chat("d"))
        messages = await collect(ws, {"d"})
    errors = [m for m in messages if m["type"] == "error"]
    assert [(e["id"], e["status"], e["error"]["code"]) for e in errors] == [(None, 409, "duplicate_id")]
    assert messages[-1]["type"] == "done"  # the running request was not disturbed
    assert messages[-1]["usage"]["completion_tokens"] == 10


async def test_backend_error_is_passed_through(gateway: Gateway, server: MockServer) -> None:
    server.config.fail_status = 400
    server.config.error_message_override = "bad things"
    async with socket(gateway) as ws:
        await ws.send_json_to(chat("e"))
        error = await ws.receive_json_from()
    assert (error["type"], error["status"], error["error"]["message"]) == ("error", 400, "bad things")
    assert usage_events(gateway)[-1].status == 400


async def test_malformed_messages_get_errors(gateway: Gateway) -> None:
    async with socket(gateway) as ws:
        await ws.send_to(text_data="{not json")
        assert (await ws.receive_json_from())["error"]["code"] == "invalid_json"
        await ws.send_json_to({"type": "subscribe"})
        assert (await ws.receive_json_from())["error"]["param"] == "type"
        await ws.send_json_to({**chat("z"), "endpoint": "embeddings"})
        assert (await ws.receive_json_from())["error"]["param"] == "endpoint"
        await ws.send_json_to({**chat("z"), "id": ""})
        assert (await ws.receive_json_from())["error"]["param"] == "id"
        await ws.send_to(bytes_data=b"\x00")
        assert (await ws.receive_json_from())["error"]["code"] == "unsupported_frame"
        await ws.send_json_to(chat("z"))  # the connection still works
        assert (await collect(ws, {"z"}))[-1]["type"] == "done"


async def test_too_many_requests_on_one_connection(gateway: Gateway) -> None:
    async with socket(gateway, max_requests=1) as ws:
        await ws.send_json_to(chat("one", STORY, max_tokens=10))
        await ws.send_json_to(chat("two"))
        messages = await collect(ws, {"one", "two"})
    assert [m["status"] for m in messages if m["type"] == "error"] == [429]


async def test_unknown_path_is_refused(gateway: Gateway) -> None:
    communicator = WebsocketCommunicator(websocket_application(gateway), "/v1/other", headers=AUTH_HEADERS)
    connected, _ = await communicator.connect()
    assert not connected
    await communicator.disconnect()


async def test_usage_chunk_kept_when_asked_and_model_kind_checked(gateway: Gateway) -> None:
    async with socket(gateway) as ws:
        await ws.send_json_to(chat("u", stream_options={"include_usage": True}))
        messages = await collect(ws, {"u"})
        usage_chunks = [m["data"] for m in messages if m["type"] == "chunk" and not m["data"]["choices"]]
        assert [c["usage"]["completion_tokens"] for c in usage_chunks] == [1]
        assert usage_chunks[0]["model"] == "chat-model"
        await ws.send_json_to(
            {**chat("k"), "body": {"model": "embed-model", "messages": [{"role": "user", "content": "x"}]}}
        )
        error = await ws.receive_json_from()
    assert (error["status"], error["error"]["code"], error["error"]["param"]) == (400, "model_not_supported", "model")


async def test_broken_upstream_stream_ends_with_502(gateway: Gateway, server: MockServer) -> None:
    server.config.die_after_tokens = 3
    async with socket(gateway) as ws:
        await ws.send_json_to(chat("b", STORY, max_tokens=50))
        messages = await collect(ws, {"b"})
    assert messages[-1]["type"] == "error"
    assert (messages[-1]["status"], messages[-1]["error"]["code"]) == (502, "backend_error")
    assert [m["type"] for m in messages[:-1]] == ["chunk"] * 4  # the role chunk and 3 tokens
    assert usage_events(gateway)[-1].status == 502


async def test_failed_reauthentication_cancels_and_closes(gateway: Gateway, server: MockServer) -> None:
    async with socket(gateway) as ws:
        await ws.send_json_to(chat("r", STORY, max_tokens=2000))
        assert (await ws.receive_json_from())["type"] == "chunk"
        await ws.send_json_to({"type": "auth", "api_key": "wrong"})
        while (message := await ws.receive_output())["type"] == "websocket.send":
            last = message
        assert '"status":401' in last["text"]
        assert message["code"] == CLOSE_UNAUTHORIZED
        assert await await_until(lambda: server.stats.open_requests == 0, timeout=1.0)
    assert (usage_events(gateway)[-1].status, usage_events(gateway)[-1].principal) == (499, "master")
