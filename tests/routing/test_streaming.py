"""Streaming through a live gateway (uvicorn in a thread) in front of the mock vLLM on a real socket."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest

from backends.mock_vllm import MockServer, await_until
from routing.gateway import Gateway
from tests.conftest import AUTH, MASTER_KEY
from tests.factories import backend_snap, registry_snap
from tests.live import serve_in_thread


@pytest.fixture
def mocks() -> Iterator[tuple[MockServer, MockServer]]:
    """Two mock backends on real sockets."""
    config: dict[str, Any] = {"models": ["served-chat", "served-text"], "embed_models": ["served-embed"]}
    with MockServer(**config) as a, MockServer(**config) as b:
        yield a, b


@pytest.fixture
def live_gateway(
    make_gateway: Callable[..., Gateway], mocks: tuple[MockServer, MockServer]
) -> Iterator[tuple[str, Gateway]]:
    """A gateway (static registry: pool p1 = both mocks) served by uvicorn in a thread."""
    a, b = mocks
    gateway = make_gateway(
        registry=registry_snap(backends=[backend_snap("b1", base_url=a.url), backend_snap("b2", base_url=b.url)]),
        stream_keepalive_s=0.1,
    )
    with serve_in_thread(gateway) as server:
        yield server.url, gateway


@pytest.fixture
async def http(live_gateway: tuple[str, Gateway]) -> AsyncIterator[httpx.AsyncClient]:
    url, _ = live_gateway
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=10) as client:
        yield client


def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": "chat-model", "messages": [{"role": "user", "content": "Tell me a story"}], **extra}


async def _events(response: httpx.Response) -> list[bytes]:
    body = b"".join([chunk async for chunk in response.aiter_bytes()])
    return [e for e in body.split(b"\n\n") if e]


async def test_sdk_receives_chunks_as_they_are_produced(live_gateway, mocks) -> None:
    # given backends that produce a token every 60 ms
    for mock in mocks:
        mock.config.token_delay_s = 0.06
    url, _ = live_gateway
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=MASTER_KEY, max_retries=0)
    # when the SDK streams 10 tokens
    arrivals: list[float] = []
    chunks = []
    stream = await client.chat.completions.create(**_chat(max_tokens=10), stream=True)
    async for chunk in stream:
        arrivals.append(time.monotonic())
        chunks.append(chunk)
    # then chunks arrive spread over the generation (not buffered until the end)
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) == 10
    assert arrivals[-1] - arrivals[0] > 0.3  # 9 gaps x 60 ms; a buffered stream arrives all at once
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.model == "chat-model" for c in chunks)


async def test_completions_stream_ends_with_done(http: httpx.AsyncClient) -> None:
    async with http.stream(
        "POST", "/v1/completions", json={"model": "text-model", "prompt": "Hi", "max_tokens": 4, "stream": True}
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        events = await _events(response)
    assert events[-1] == b"data: [DONE]"
    payloads = [orjson.loads(e[6:]) for e in events[:-1]]
    assert all(p["model"] == "text-model" for p in payloads)
    assert sum(1 for p in payloads if p["choices"] and p["choices"][0]["text"]) == 4


async def test_include_usage_passes_final_usage_chunk(http: httpx.AsyncClient, live_gateway) -> None:
    _, gateway = live_gateway
    body = _chat(max_tokens=6, stream=True, stream_options={"include_usage": True})
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        events = await _events(response)
    payloads = [orjson.loads(e[6:]) for e in events if e != b"data: [DONE]"]
    usage_chunks = [p for p in payloads if p.get("usage")]
    assert len(usage_chunks) == 1 and usage_chunks[0]["choices"] == []
    streamed = sum(1 for p in payloads if p["choices"] and p["choices"][0]["delta"].get("content"))
    assert usage_chunks[0]["usage"]["completion_tokens"] == streamed == 6
    # usage is recorded once the stream is closed, just after the last byte went out
    assert await await_until(lambda: len(gateway.usage.events) == 1, timeout=1.0)
    assert gateway.usage.events[-1].completion_tokens == 6


async def test_without_include_usage_no_usage_chunk_yet_usage_recorded(http: httpx.AsyncClient, live_gateway, mocks):
    _, gateway = live_gateway
    async with http.stream("POST", "/v1/chat/completions", json=_chat(max_tokens=5, stream=True)) as response:
        events = await _events(response)
    assert not any(b'"usage"' in e for e in events)
    # the backend was asked for usage anyway
    last = next(m for m in mocks if m.stats.total_requests).stats.last_request
    assert last["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert await await_until(lambda: len(gateway.usage.events) == 1, timeout=1.0)
    event = gateway.usage.events[-1]
    assert event.stream and event.completion_tokens == 5 and event.prompt_tokens > 0 and event.ttft_ms is not None


async def test_client_disconnect_closes_backend_request(http: httpx.AsyncClient, mocks) -> None:
    # given a long, slow generation
    for mock in mocks:
        mock.config.token_delay_s = 0.02
    async with http.stream("POST", "/v1/chat/completions", json=_chat(max_tokens=500, stream=True)) as response:
        received = 0
        async for _ in response.aiter_bytes():
            received += 1
            if received >= 3:
                break
        assert sum(m.stats.open_requests for m in mocks) == 1
    # when the client hangs up (the context manager closed the connection)
    # then the backend's open request count drops to zero within a second
    assert await await_until(lambda: sum(m.stats.open_requests for m in mocks) == 0, timeout=1.0)
    assert sum(m.stats.cancelled_requests for m in mocks) == 1


async def test_keepalive_comments_while_waiting_for_first_token(http: httpx.AsyncClient, mocks) -> None:
    for mock in mocks:
        mock.config.latency_s = 0.8  # prefill; the gateway's keep-alive interval is 0.1 s here
    async with http.stream("POST", "/v1/chat/completions", json=_chat(max_tokens=2, stream=True)) as response:
        events = await _events(response)
    keepalives = [e for e in events if e.startswith(b": keep-alive")]
    assert len(keepalives) >= 2
    assert events.index(keepalives[0]) == 0  # they come before any data
    assert events[-1] == b"data: [DONE]"


async def test_backend_dying_mid_stream_gives_error_event_then_next_request_succeeds(
    http: httpx.AsyncClient, mocks
) -> None:
    a, b = mocks
    a.config.die_after_tokens = 2
    b.config.die_after_tokens = 2
    async with http.stream("POST", "/v1/chat/completions", json=_chat(max_tokens=10, stream=True)) as response:
        assert response.status_code == 200
        events = await _events(response)
    assert events[-1].startswith(b"event: error\ndata: ")
    error = orjson.loads(events[-1].split(b"data: ", 1)[1])["error"]
    assert error["type"] == "server_error" and "stream broken" in error["message"]
    assert b"data: [DONE]" not in events
    # a healthy backend serves the next request
    a.config.die_after_tokens = None
    b.config.die_after_tokens = None
    response = await http.post("/v1/chat/completions", json=_chat(max_tokens=3, stream=True))
    assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")


async def test_stream_failing_before_first_byte_fails_over_or_gives_json_error(http: httpx.AsyncClient, mocks) -> None:
    a, b = mocks
    a.config.fail_status = 503
    # one backend fails with 503 before anything was sent: the request is retried on the other one
    for _ in range(2):
        response = await http.post("/v1/chat/completions", json=_chat(max_tokens=2, stream=True))
        assert response.status_code == 200
        assert response.headers["x-router-backend"] == "b2"
    # both fail: a JSON error, not an SSE stream
    b.config.fail_status = 503
    response = await http.post("/v1/chat/completions", json=_chat(max_tokens=2, stream=True))
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == "backend_error"


async def test_invalid_streaming_request_gets_json_400(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/chat/completions", json=_chat(stream=True, temperature=5))
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "temperature"


async def test_idle_timeout_between_tokens_ends_stream_with_error(
    make_gateway: Callable[..., Gateway], mocks: tuple[MockServer, MockServer]
) -> None:
    a, _ = mocks
    a.config.token_delay_s = 0.5
    gateway = make_gateway(
        registry=registry_snap(backends=[backend_snap("b1", base_url=a.url)]), stream_idle_timeout_s=0.1
    )
    with serve_in_thread(gateway) as server:
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=10) as client:
            async with client.stream("POST", "/v1/chat/completions", json=_chat(max_tokens=5, stream=True)) as r:
                events = await _events(r)
    error = orjson.loads(events[-1].split(b"data: ", 1)[1])["error"]
    assert error["code"] == "backend_timeout"
    assert await await_until(lambda: a.stats.open_requests == 0, timeout=1.0)
    await asyncio.sleep(0)


async def test_backend_read_timeout_mid_stream_names_the_backend_limit(
    make_gateway: Callable[..., Gateway], mocks: tuple[MockServer, MockServer]
) -> None:
    a, _ = mocks
    a.config.token_delay_s = 0.6
    gateway = make_gateway(registry=registry_snap(backends=[backend_snap("b1", base_url=a.url, read_timeout_s=0.2)]))
    with serve_in_thread(gateway) as server:
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=10) as client:
            async with client.stream("POST", "/v1/chat/completions", json=_chat(max_tokens=5, stream=True)) as r:
                events = await _events(r)
    error = orjson.loads(events[-1].split(b"data: ", 1)[1])["error"]
    assert error["code"] == "backend_timeout"
    assert error["message"] == "Backend `b1` did not send the next token within 0.2 s."
