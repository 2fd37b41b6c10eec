"""Tests of the bundled mock vLLM server (backends.mock_vllm): API shapes, tokenizer, knobs, streaming."""

from __future__ import annotations

import asyncio
import base64
import math
import time
from array import array
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import orjson
import pytest

from backends.mock_vllm import (
    DEFAULT_ANSWER,
    MockConfig,
    MockServer,
    MockVLLM,
    await_until,
    count_tokens,
    free_port,
)
from backends.mock_vllm.__main__ import build_parser, config_from_args

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
PARIS_MESSAGES = [
    {"role": "system", "content": "You are a geography assistant."},
    {"role": "user", "content": "What is the Capital of FRANCE?"},
]


@pytest.fixture
def app() -> MockVLLM:
    """A fresh in-process mock app."""
    return MockVLLM()


@pytest.fixture
async def client(app: MockVLLM) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client talking to the app in-process."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://mock") as c:
        yield c


@pytest.fixture(scope="module")
def _module_server() -> Iterator[MockServer]:
    """One real-socket mock server for the module (reset before each test)."""
    with MockServer() as server:
        yield server


@pytest.fixture
def server(_module_server: MockServer) -> MockServer:
    """The module's real-socket mock server, reset to defaults."""
    _module_server.reset()
    return _module_server


def _chat(content: str = "hello", **extra: Any) -> dict[str, Any]:
    """Build a chat completions request body."""
    return {"model": "mock-chat", "messages": [{"role": "user", "content": content}], **extra}


def _sse_events(text: str) -> list[Any]:
    """Parse an SSE body into decoded JSON events (and the '[DONE]' marker)."""
    events: list[Any] = []
    for block in text.split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        events.append(payload if payload == "[DONE]" else orjson.loads(payload))
    return events


def _cosine(a: list[float], b: list[float]) -> float:
    """Cosine similarity of two vectors."""
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


# ---------------------------------------------------------------------------------------------
# Non-streaming shapes and deterministic answers (in-process).
# ---------------------------------------------------------------------------------------------


async def test_chat_answers_paris(client: httpx.AsyncClient) -> None:
    """A prompt mentioning the capital of France is answered exactly 'Paris'."""
    resp = await client.post(CHAT, json={"model": "mock-chat", "messages": PARIS_MESSAGES})
    assert resp.status_code == 200
    data = resp.json()
    assert data["id"].startswith("chatcmpl-")
    assert data["object"] == "chat.completion"
    assert data["model"] == "mock-chat"
    assert isinstance(data["created"], int)
    (choice,) = data["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "Paris"
    assert choice["finish_reason"] == "stop"
    assert choice["index"] == 0
    assert choice["logprobs"] is None
    usage = data["usage"]
    assert usage["completion_tokens"] == 1
    assert usage["total_tokens"] == usage["prompt_tokens"] + 1


async def test_default_answer_without_max_tokens_stops(client: httpx.AsyncClient) -> None:
    """Without max_tokens the default sentence is answered once with finish_reason 'stop'."""
    data = (await client.post(CHAT, json=_chat("Tell me a story"))).json()
    assert data["choices"][0]["message"]["content"] == DEFAULT_ANSWER
    assert data["choices"][0]["finish_reason"] == "stop"
    assert data["usage"]["completion_tokens"] == count_tokens(DEFAULT_ANSWER)


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
async def test_max_tokens_gives_length_finish(client: httpx.AsyncClient, field: str) -> None:
    """max_tokens (or max_completion_tokens) bounds the answer and gives finish_reason 'length'."""
    data = (await client.post(CHAT, json=_chat("Tell me a story", **{field: 5}))).json()
    choice = data["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"] == "This is a deterministic answer"
    assert data["usage"]["completion_tokens"] == 5


async def test_default_answer_fills_large_max_tokens(client: httpx.AsyncClient) -> None:
    """The default sentence repeats to produce exactly max_tokens tokens."""
    data = (await client.post(CHAT, json=_chat("hi", max_tokens=40))).json()
    content = data["choices"][0]["message"]["content"]
    assert count_tokens(content) == 40 == data["usage"]["completion_tokens"]
    assert content.startswith(DEFAULT_ANSWER + " This is")
    assert data["choices"][0]["finish_reason"] == "length"


async def test_n_choices_and_stop(client: httpx.AsyncClient) -> None:
    """n returns n identical choices (usage counts all of them); stop truncates the answer."""
    data = (await client.post(CHAT, json=_chat("hi", n=3, max_tokens=4))).json()
    assert [c["index"] for c in data["choices"]] == [0, 1, 2]
    assert data["usage"]["completion_tokens"] == 12
    data = (await client.post(CHAT, json=_chat("hi", stop=[" answer"]))).json()
    choice = data["choices"][0]
    assert choice["message"]["content"] == "This is a deterministic"
    assert choice["finish_reason"] == "stop"
    assert choice["stop_reason"] == " answer"


async def test_completions_endpoint(client: httpx.AsyncClient) -> None:
    """/v1/completions answers text choices in vLLM's shape, with Paris, length and batches."""
    resp = await client.post(
        COMPLETIONS, json={"model": "mock-chat", "prompt": "The capital of France is", "max_tokens": 8}
    )
    data = resp.json()
    assert data["id"].startswith("cmpl-")
    assert data["object"] == "text_completion"
    assert data["choices"][0]["text"] == "Paris"
    assert data["choices"][0]["finish_reason"] == "stop"
    assert data["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 1,
        "total_tokens": 6,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }
    data = (await client.post(COMPLETIONS, json={"model": "mock-chat", "prompt": "x", "max_tokens": 3})).json()
    assert data["choices"][0]["text"] == "This is a"
    assert data["choices"][0]["finish_reason"] == "length"
    batch = {"model": "mock-chat", "prompt": ["a b", "capital of france"], "max_tokens": 2, "n": 2}
    data = (await client.post(COMPLETIONS, json=batch)).json()
    assert [c["index"] for c in data["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in data["choices"]] == ["This is", "This is", "Paris", "Paris"]
    assert data["usage"]["prompt_tokens"] == 2 + 3
    assert data["usage"]["completion_tokens"] == 2 * 2 + 1 * 2


async def test_usage_matches_tokenize(client: httpx.AsyncClient) -> None:
    """usage.prompt_tokens equals what /tokenize returns for the same chat or prompt input."""
    messages = [
        *PARIS_MESSAGES,
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "Sure?"},
    ]
    chat = (await client.post(CHAT, json={"model": "mock-chat", "messages": messages})).json()
    tok = (await client.post("/tokenize", json={"model": "mock-chat", "messages": messages})).json()
    assert tok["count"] == chat["usage"]["prompt_tokens"] == len(tok["tokens"])
    assert tok["max_model_len"] == 2048
    assert all(isinstance(t, int) for t in tok["tokens"])
    prompt = "Hello, world! How are you doing today?"
    cmpl = (await client.post(COMPLETIONS, json={"model": "mock-chat", "prompt": prompt})).json()
    tok = (await client.post("/tokenize", json={"model": "mock-chat", "prompt": prompt})).json()
    assert tok["count"] == cmpl["usage"]["prompt_tokens"] == count_tokens(prompt) == 10


async def test_models_health_version(client: httpx.AsyncClient, app: MockVLLM) -> None:
    """/v1/models lists chat and embedding models; /health is an empty 200; models_listed overrides."""
    health = await client.get("/health")
    assert health.status_code == 200 and health.content == b""
    data = (await client.get("/v1/models")).json()
    assert data["object"] == "list"
    assert [m["id"] for m in data["data"]] == ["mock-chat", "mock-embed"]
    card = data["data"][0]
    assert card["object"] == "model" and card["owned_by"] == "vllm" and card["root"] == "mock-chat"
    assert card["parent"] is None and card["max_model_len"] == 2048
    app.config.models_listed = ["other"]
    assert [m["id"] for m in (await client.get("/v1/models")).json()["data"]] == ["other"]
    app.config.health_status = 503
    assert (await client.get("/health")).status_code == 503
    assert (await client.get("/version")).json()["version"]


async def test_unknown_model_is_404(client: httpx.AsyncClient) -> None:
    """An unserved model answers vLLM's 404 NotFoundError."""
    resp = await client.post(CHAT, json={"model": "gpt-9", "messages": PARIS_MESSAGES})
    assert resp.status_code == 404
    assert resp.json() == {
        "error": {
            "message": "The model `gpt-9` does not exist. Valid aliases: mock-chat.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    }


async def test_bad_requests(client: httpx.AsyncClient) -> None:
    """Invalid JSON, missing messages and bad max_tokens answer 400 (JSON: FastAPI's "Bad Request", as vLLM 0.32)."""
    resp = await client.post(CHAT, content=b"{not json", headers={"content-type": "application/json"})
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "Bad Request"
    assert resp.json()["error"]["param"] == "body.1"
    assert resp.json()["error"]["code"] == 400
    assert (await client.post(CHAT, json={"model": "mock-chat"})).status_code == 400
    assert (await client.post(CHAT, json=_chat(max_tokens=0))).status_code == 400
    assert (await client.post(COMPLETIONS, json={"model": "mock-chat"})).status_code == 400


async def test_prompt_too_long_is_400(client: httpx.AsyncClient, app: MockVLLM) -> None:
    """A prompt over max_model_len answers vLLM 0.32's context-length 400."""
    long_prompt = " ".join(["word"] * 2100)
    resp = await client.post(CHAT, json=_chat(long_prompt))
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["type"] == "BadRequestError"
    assert error["param"] == "input_tokens"
    assert error["message"].startswith("This model's maximum context length is 2048 tokens. However, ")
    assert "at least 2107 input tokens" in error["message"]  # 2100 words + 4 per message + 3


async def test_max_tokens_bounds(client: httpx.AsyncClient, app: MockVLLM) -> None:
    """max_tokens > max_model_len is a 400; prompt + max_tokens over the context just stops at 'length'."""
    app.config.max_model_len = 20
    resp = await client.post(COMPLETIONS, json={"model": "mock-chat", "prompt": "a b c", "max_tokens": 25})
    assert resp.status_code == 400
    assert resp.json()["error"]["message"].startswith("max_tokens=25 cannot be greater than max_model_len=20.")
    resp = await client.post(COMPLETIONS, json={"model": "mock-chat", "prompt": "a b c", "max_tokens": 20})
    assert resp.status_code == 200
    data = resp.json()
    assert data["usage"]["completion_tokens"] == 17 and data["usage"]["total_tokens"] == 20
    assert data["choices"][0]["finish_reason"] == "length"


async def test_wrong_method_and_unknown_path(client: httpx.AsyncClient) -> None:
    """Wrong methods answer 405 and unknown paths 404, as JSON like vLLM's FastAPI."""
    resp = await client.get(CHAT)
    assert resp.status_code == 405
    assert resp.json() == {"detail": "Method Not Allowed"}
    resp = await client.get("/v2/nothing")
    assert resp.status_code == 404
    assert resp.json() == {"detail": "Not Found"}


async def test_embeddings_shape_and_similarity(client: httpx.AsyncClient) -> None:
    """Embeddings have vLLM's shape, dimension 384, unit norm and meaningful similarity."""
    texts = [
        "The cat sat on the warm mat.",
        "A cat was sitting on the mat.",
        "Quarterly revenue grew by twelve percent.",
    ]
    resp = await client.post("/v1/embeddings", json={"model": "mock-embed", "input": texts})
    data = resp.json()
    assert data["object"] == "list" and data["model"] == "mock-embed"
    assert [d["index"] for d in data["data"]] == [0, 1, 2]
    assert all(d["object"] == "embedding" for d in data["data"])
    vectors = [d["embedding"] for d in data["data"]]
    assert all(len(v) == 384 for v in vectors)
    assert math.isclose(sum(x * x for x in vectors[0]), 1.0, rel_tol=1e-9)
    assert _cosine(vectors[0], vectors[1]) > _cosine(vectors[0], vectors[2]) + 0.3
    assert data["usage"]["prompt_tokens"] == data["usage"]["total_tokens"] == sum(count_tokens(t) for t in texts)
    single = (await client.post("/v1/embeddings", json={"model": "mock-embed", "input": texts[0]})).json()
    assert single["data"][0]["embedding"] == vectors[0]
    b64 = (
        await client.post(
            "/v1/embeddings", json={"model": "mock-embed", "input": texts[0], "encoding_format": "base64"}
        )
    ).json()
    decoded = array("f", base64.b64decode(b64["data"][0]["embedding"]))
    assert all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7) for a, b in zip(decoded, vectors[0], strict=True))
    tokens = (await client.post("/v1/embeddings", json={"model": "mock-embed", "input": [[1, 2, 3]]})).json()
    assert tokens["usage"]["prompt_tokens"] == 3
    wrong = await client.post("/v1/embeddings", json={"model": "mock-chat", "input": "x"})
    assert wrong.status_code == 400


async def test_metrics_text(client: httpx.AsyncClient, app: MockVLLM) -> None:
    """/metrics serves Prometheus text with vLLM gauge names and knob-driven values."""
    app.config.num_requests_waiting = 3
    app.config.kv_cache_usage_perc = 0.25
    resp = await client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    text = resp.text
    assert 'vllm:num_requests_running{engine="0",model_name="mock-chat"} 0.0' in text
    assert 'vllm:num_requests_waiting{engine="0",model_name="mock-chat"} 3.0' in text
    assert 'vllm:kv_cache_usage_perc{engine="0",model_name="mock-chat"} 0.25' in text
    assert "# TYPE vllm:num_requests_running gauge" in text


# ---------------------------------------------------------------------------------------------
# Knobs (in-process).
# ---------------------------------------------------------------------------------------------


async def test_fail_next_and_fail_status(client: httpx.AsyncClient, app: MockVLLM) -> None:
    """fail_next fails the next N work requests; fail_status fails all of them with that status."""
    app.config.fail_next = 2
    statuses = [(await client.post(CHAT, json=_chat())).status_code for _ in range(3)]
    assert statuses == [500, 500, 200]
    assert (await client.get("/health")).status_code == 200
    app.config.fail_status = 503
    resp = await client.post(CHAT, json=_chat())
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == 503
    assert app.stats.failed_requests == 3 and app.stats.completed_requests == 1


async def test_error_message_override(client: httpx.AsyncClient, app: MockVLLM) -> None:
    """error_message_override answers a 500 carrying that message (e.g. CUDA OOM)."""
    app.config.error_message_override = "CUDA out of memory. Tried to allocate 2.00 GiB"
    resp = await client.post(CHAT, json=_chat())
    assert resp.status_code == 500
    assert resp.json()["error"]["message"].startswith("CUDA out of memory.")
    assert resp.json()["error"]["type"] == "InternalServerError"


async def test_answer_override_and_usage_offset(client: httpx.AsyncClient, app: MockVLLM) -> None:
    """answer_override replaces the answer; usage_prompt_tokens_offset skews prompt_tokens."""
    honest = (await client.post(CHAT, json={"model": "mock-chat", "messages": PARIS_MESSAGES})).json()
    app.config.answer_override = "Lyon, obviously."
    app.config.usage_prompt_tokens_offset = 7
    data = (await client.post(CHAT, json={"model": "mock-chat", "messages": PARIS_MESSAGES})).json()
    assert data["choices"][0]["message"]["content"] == "Lyon, obviously."
    assert data["usage"]["completion_tokens"] == 4
    assert data["usage"]["prompt_tokens"] == honest["usage"]["prompt_tokens"] + 7


async def test_latency(client: httpx.AsyncClient, app: MockVLLM) -> None:
    """latency_s delays the response."""
    app.config.latency_s = 0.03
    start = time.perf_counter()
    assert (await client.post(CHAT, json=_chat())).status_code == 200
    assert time.perf_counter() - start >= 0.03


async def test_control_endpoints_and_stats(client: httpx.AsyncClient, app: MockVLLM) -> None:
    """/mock/config changes knobs, /mock/stats reports counters, /mock/reset restores defaults."""
    resp = await client.post("/mock/config", json={"fail_next": 1, "num_requests_waiting": 5})
    assert resp.status_code == 200 and resp.json()["fail_next"] == 1
    assert app.config.num_requests_waiting == 5
    assert (await client.post("/mock/config", json={"no_such_knob": 1})).status_code == 400
    await client.post(CHAT, json=_chat("first"), headers={"x-trace": "abc"})
    await client.post(CHAT, json=_chat("second"), headers={"x-trace": "def"})
    stats = (await client.get("/mock/stats")).json()
    assert stats["total_requests"] == 2
    assert stats["open_requests"] == 0
    assert stats["completed_requests"] == 1 and stats["failed_requests"] == 1
    assert stats["by_path"] == {CHAT: 2}
    assert stats["last_request"]["messages"][0]["content"] == "second"
    assert stats["last_headers"]["x-trace"] == "def"
    assert (await client.post("/mock/reset")).status_code == 200
    assert app.config == MockConfig()
    stats = (await client.get("/mock/stats")).json()
    assert stats["total_requests"] == 0 and stats["by_path"] == {}


async def test_in_process_stream(client: httpx.AsyncClient) -> None:
    """Streaming also works in-process (ASGITransport buffers it, the shape is the same)."""
    resp = await client.post(CHAT, json=_chat(max_tokens=3, stream=True))
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = _sse_events(resp.text)
    assert events[-1] == "[DONE]"
    assert len(events) == 1 + 3 + 1  # role, tokens (the last carries finish_reason 'length'), [DONE]
    assert events[3]["choices"][0]["finish_reason"] == "length"


# ---------------------------------------------------------------------------------------------
# Real socket: streaming, hangs, aborts, disconnects.
# ---------------------------------------------------------------------------------------------


async def test_stream_chunk_sequence_with_usage(server: MockServer) -> None:
    """A cut chat stream is role chunk, one chunk per token (last one finishing), usage, [DONE]."""
    body = _chat("hi there", max_tokens=6, stream=True, stream_options={"include_usage": True})
    async with httpx.AsyncClient(base_url=server.url) as c:
        raw_chunks: list[bytes] = []
        async with c.stream("POST", CHAT, json=body) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            async for raw in resp.aiter_raw():
                raw_chunks.append(raw)
        non_stream = (await c.post(CHAT, json=_chat("hi there", max_tokens=6))).json()
    events = _sse_events(b"".join(raw_chunks).decode())
    assert len(events) == 1 + 6 + 1 + 1
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    assert len({e["id"] for e in events[:-1]}) == 1
    tokens = events[1:7]
    assert [e["choices"][0]["finish_reason"] for e in tokens] == [None] * 5 + ["length"]
    content = "".join(e["choices"][0]["delta"]["content"] for e in tokens)
    assert content == non_stream["choices"][0]["message"]["content"]
    usage = non_stream["usage"]
    assert events[7]["choices"] == []
    assert events[7]["usage"] == {k: usage[k] for k in ("prompt_tokens", "total_tokens", "completion_tokens")}
    assert events[8] == "[DONE]"


async def test_stream_natural_stop_has_finish_chunk(server: MockServer) -> None:
    """On a natural stop the finish_reason comes in an extra chunk with empty content."""
    body = {"model": "mock-chat", "messages": PARIS_MESSAGES, "stream": True, "n": 2}
    async with httpx.AsyncClient(base_url=server.url) as c:
        events = _sse_events((await c.post(CHAT, json=body)).text)
    choices = [e["choices"][0] for e in events[:-1]]
    assert [(ch["index"], ch["delta"]) for ch in choices] == [
        (0, {"role": "assistant", "content": ""}),
        (1, {"role": "assistant", "content": ""}),
        (0, {"content": "Paris"}),
        (1, {"content": "Paris"}),
        (0, {"content": ""}),
        (1, {"content": ""}),
    ]
    assert [ch["finish_reason"] for ch in choices] == [None] * 4 + ["stop", "stop"]
    assert events[-1] == "[DONE]"


async def test_completions_stream(server: MockServer) -> None:
    """A completions stream has text_completion chunks, one per token, without a role chunk."""
    body = {"model": "mock-chat", "prompt": "capital of France?", "stream": True}
    async with httpx.AsyncClient(base_url=server.url) as c:
        resp = await c.post(COMPLETIONS, json=body)
    events = _sse_events(resp.text)
    assert [e["choices"][0]["text"] for e in events[:-1]] == ["Paris", ""]
    assert events[0]["object"] == "text_completion"
    assert events[1]["choices"][0]["finish_reason"] == "stop"
    assert events[-1] == "[DONE]"
    batch = {"model": "mock-chat", "prompt": ["a", "capital of france"], "max_tokens": 2, "stream": True}
    async with httpx.AsyncClient(base_url=server.url) as c:
        events = _sse_events((await c.post(COMPLETIONS, json=batch)).text)
    choices = [
        (e["choices"][0]["index"], e["choices"][0]["text"], e["choices"][0]["finish_reason"]) for e in events[:-1]
    ]
    assert choices == [(0, "This", None), (1, "Paris", None), (0, " is", "length"), (1, "", "stop")]


async def test_stream_is_token_by_token(server: MockServer) -> None:
    """With token_delay_s the chunks arrive spread over time, one event at a time."""
    server.config.token_delay_s = 0.1
    arrivals: list[float] = []
    async with httpx.AsyncClient(base_url=server.url) as c:
        start = time.perf_counter()
        async with c.stream("POST", CHAT, json=_chat(max_tokens=5, stream=True)) as resp:
            async for line in resp.aiter_lines():
                if line.startswith("data: "):
                    arrivals.append(time.perf_counter())
    assert len(arrivals) == 1 + 5 + 1
    assert arrivals[5] - start >= 0.4  # 4 gaps of 100 ms between the 5 tokens
    assert arrivals[5] - arrivals[1] > 0.15  # not one burst at the end (a wide margin for a loaded machine)


async def test_stream_latency_is_prefill(server: MockServer) -> None:
    """latency_s delays a stream's first chunk but not its headers, like vLLM's prefill."""
    server.config.latency_s = 0.5
    async with httpx.AsyncClient(base_url=server.url) as c:
        start = time.perf_counter()
        async with c.stream("POST", CHAT, json=_chat(max_tokens=2, stream=True)) as resp:
            headers_at = time.perf_counter() - start
            body = await resp.aread()
        first_chunk_at = time.perf_counter() - start
    assert headers_at < 0.4 <= 0.5 <= first_chunk_at  # margins wide enough for a loaded machine
    assert body.endswith(b"data: [DONE]\n\n")
    server.config.fail_status = 503
    async with httpx.AsyncClient(base_url=server.url) as c:
        start = time.perf_counter()
        resp = await c.post(CHAT, json=_chat(stream=True))
    assert resp.status_code == 503 and time.perf_counter() - start < 0.4  # errors are not delayed (0.5 s)


async def test_hang_until_client_timeout(server: MockServer) -> None:
    """hang never answers; the client's timeout disconnects and the request is cancelled."""
    server.config.hang = True
    async with httpx.AsyncClient(base_url=server.url, timeout=0.1) as c:
        with pytest.raises(httpx.ReadTimeout):
            await c.post(CHAT, json=_chat())
    assert await await_until(lambda: server.stats.open_requests == 0, timeout=1.0)
    assert server.stats.cancelled_requests == 1
    assert server.stats.total_requests == 1


async def test_die_after_tokens_breaks_stream(server: MockServer) -> None:
    """die_after_tokens drops the connection mid-stream after K token chunks."""
    server.config.die_after_tokens = 3
    received: list[str] = []
    async with httpx.AsyncClient(base_url=server.url) as c:
        with pytest.raises(httpx.RemoteProtocolError):
            async with c.stream("POST", CHAT, json=_chat(max_tokens=10, stream=True)) as resp:
                async for line in resp.aiter_lines():
                    if line.startswith("data: "):
                        received.append(line)
    assert len(received) == 1 + 3  # role chunk + 3 tokens, no finish, no [DONE]
    assert all('"finish_reason":null' in line for line in received)
    assert "[DONE]" not in "".join(received)
    assert await await_until(lambda: server.stats.open_requests == 0, timeout=1.0)
    assert server.stats.failed_requests == 1


async def test_client_disconnect_cancels_stream(server: MockServer) -> None:
    """Closing the stream mid-way cancels generation quickly and open_requests drops to 0."""
    server.config.token_delay_s = 0.02
    async with httpx.AsyncClient(base_url=server.url) as c:
        async with c.stream("POST", CHAT, json=_chat(max_tokens=500, stream=True)) as resp:
            seen = 0
            async for line in resp.aiter_lines():
                if line.startswith("data: "):
                    seen += 1
                if seen == 3:
                    assert server.stats.open_requests == 1
                    break
        closed_at = time.perf_counter()
    assert await await_until(lambda: server.stats.open_requests == 0, timeout=1.0)
    assert time.perf_counter() - closed_at < 1.0  # the stream had ~10 s left: it was cancelled, not finished
    assert server.stats.cancelled_requests == 1
    async with httpx.AsyncClient(base_url=server.url) as c:
        metrics = (await c.get("/metrics")).text
    assert 'vllm:num_requests_running{engine="0",model_name="mock-chat"} 0.0' in metrics
    assert server.stats.generation_tokens_total == 500  # accounted up front, like a scheduled request


async def test_running_metric_counts_open_requests(server: MockServer) -> None:
    """num_requests_running reports the requests currently open."""
    server.config.latency_s = 3.0
    async with httpx.AsyncClient(base_url=server.url) as c:
        pending = asyncio.ensure_future(c.post(CHAT, json=_chat()))
        assert await await_until(lambda: server.stats.open_requests == 1, timeout=1.0)
        metrics = (await c.get("/metrics")).text
        assert 'vllm:num_requests_running{engine="0",model_name="mock-chat"} 1.0' in metrics
        pending.cancel()


def test_sync_server_and_free_port() -> None:
    """MockServer works as a sync context manager on an explicit port; free_port gives a port."""
    port = free_port()
    with MockServer(port=port, models=["m1", "m2"], embed_models=[]) as srv:
        assert srv.url == f"http://127.0.0.1:{port}"
        ids = [m["id"] for m in httpx.get(f"{srv.url}/v1/models").json()["data"]]
        assert ids == ["m1", "m2"]
        resp = httpx.post(f"{srv.url}{CHAT}", json={"model": "m2", "messages": PARIS_MESSAGES})
        assert resp.json()["choices"][0]["message"]["content"] == "Paris"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{srv.url}/health")


def test_cli_config_parsing() -> None:
    """Every MockConfig knob is a CLI flag with an environment fallback."""
    argv = ["--model", "a", "--model", "b,c", "--embed-model", "e", "--latency-s", "0.5"]
    argv += ["--hang", "--fail-status", "503"]
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args, environ={"MOCK_VLLM_DIE_AFTER_TOKENS": "4", "MOCK_VLLM_LATENCY_S": "9"})
    assert cfg.models == ["a", "b", "c"] and cfg.embed_models == ["e"]
    assert cfg.latency_s == 0.5 and cfg.hang is True and cfg.fail_status == 503
    assert cfg.die_after_tokens == 4
    empty = config_from_args(build_parser().parse_args(["--embed-model", ""]), environ={})
    assert empty.embed_models == [] and empty == MockConfig(embed_models=[])


# --- rerank / score (vLLM's scoring API) and tokenizer options -------------------------------------------------

RERANK_DOCS = ["a kitten naps on the couch", "revenue grew by eight percent", "the cat sleeps on the sofa"]


@pytest.fixture
async def pooling_client() -> AsyncIterator[httpx.AsyncClient]:
    """A mock serving a chat model, an embedding model (bi-encoder scoring) and a reranker (cross-encoder)."""
    app = MockVLLM(MockConfig(models=["c"], embed_models=["e"], rerank_models=["r"]))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://mock") as c:
        yield c


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank", "/v2/rerank"])
@pytest.mark.parametrize("model", ["e", "r"])
async def test_rerank_has_vllms_shape(pooling_client: httpx.AsyncClient, path: str, model: str) -> None:
    body = {"model": model, "query": "the cat on the sofa", "documents": RERANK_DOCS, "top_n": 2}
    response = await pooling_client.post(path, json=body, headers={"x-request-id": "abc"})
    assert response.status_code == 200, response.text
    data = response.json()
    # vLLM 0.32's RerankResponse: id ("score-" + the X-Request-Id), model, usage {prompt, total}, results
    assert list(data) == ["id", "model", "usage", "results"] and data["id"] == "score-abc"
    assert data["usage"]["prompt_tokens"] == data["usage"]["total_tokens"] > 0
    assert [r["index"] for r in data["results"]] == [2, 0]  # top_n of the most relevant
    assert data["results"][0]["document"] == {"text": RERANK_DOCS[2], "multi_modal": None}
    assert data["results"][0]["relevance_score"] > data["results"][1]["relevance_score"]


async def test_bi_and_cross_encoders_count_their_prompts_as_vllm(pooling_client: httpx.AsyncClient) -> None:
    # a bi-encoder embeds the query once and each document; a cross-encoder reads the query with every document
    body = {"query": "a b", "documents": ["c", "d e"]}
    bi = (await pooling_client.post("/rerank", json={"model": "e", **body})).json()["usage"]["prompt_tokens"]
    cross = (await pooling_client.post("/rerank", json={"model": "r", **body})).json()["usage"]["prompt_tokens"]
    assert (bi, cross) == (2 + 1 + 2, (2 + 1) + (2 + 2))


async def test_score_has_vllms_shape(pooling_client: httpx.AsyncClient) -> None:
    body = {"model": "e", "queries": ["a cat", "a dog"], "documents": ["a cat", "revenue"]}
    data = (await pooling_client.post("/score", json=body)).json()
    assert list(data) == ["id", "object", "created", "model", "data", "usage"]
    assert data["object"] == "list" and data["id"].startswith("score-")
    assert [(d["index"], d["object"]) for d in data["data"]] == [(0, "score"), (1, "score")]
    assert data["data"][0]["score"] == pytest.approx(1.0) and data["data"][1]["score"] == pytest.approx(0.0)
    assert data["usage"]["completion_tokens"] == 0 and data["usage"]["prompt_tokens"] == 2 + 2 + 2 + 1


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/score", {"model": "e", "queries": ["a", "b"], "documents": ["a", "b", "c"]}, 400, "1:1, 1:N or N:N"),
        ("/rerank", {"model": "e", "query": "q", "documents": []}, 400, "text_pair"),
        ("/rerank", {"model": "e", "query": {"content": []}, "documents": ["d"]}, 400, "MultiModalParam"),
        ("/rerank", {"model": "x", "query": "q", "documents": ["d"]}, 404, "does not exist"),
        ("/rerank", {"model": "e", "documents": ["d"]}, 400, "body.query"),
    ],
)
async def test_scoring_errors(pooling_client: httpx.AsyncClient, path, body, status, message) -> None:
    response = await pooling_client.post(path, json=body)
    assert response.status_code == status and message in response.json()["error"]["message"]


async def test_routes_a_server_of_that_model_would_not_have(pooling_client: httpx.AsyncClient) -> None:
    # vLLM registers the scoring routes on pooling servers only, and embeddings not for a cross-encoder
    on_chat = await pooling_client.post("/rerank", json={"model": "c", "query": "q", "documents": ["d"]})
    embed_reranker = await pooling_client.post("/v1/embeddings", json={"model": "r", "input": "x"})
    assert on_chat.status_code == embed_reranker.status_code == 404
    assert on_chat.json() == embed_reranker.json() == {"detail": "Not Found"}


async def test_tokenize_token_strs_and_generation_prompt(pooling_client: httpx.AsyncClient) -> None:
    async def tokenize(**body: Any) -> dict[str, Any]:
        return dict((await pooling_client.post("/tokenize", json={"model": "c", **body})).json())

    assert (await tokenize(prompt="Hi, you", return_token_strs=True))["token_strs"] == ["Hi", ",", "you"]
    messages = [{"role": "user", "content": "Hi"}]
    strs = (await tokenize(messages=messages, return_token_strs=True))["token_strs"]
    assert strs == ["<|im_start|>", "user", "\n", "Hi", "<|im_end|>", "<|im_start|>", "assistant", "\n"]
    bare = await tokenize(messages=messages, add_generation_prompt=False)
    assert bare["count"] == len(strs) - 3 and bare["token_strs"] is None
