"""Tracing end to end through a live platform process: its spans exported over OTLP/HTTP to a real receiver.

The platform runs under uvicorn with only the standard OTEL_* variables set; tests/otlp.py is the receiver (the
OpenTelemetry Collector is not packaged on PyPI or Debian). The client's `traceparent` is continued and the mock
vLLM receives the attempt span's context.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from backends.mock_vllm import MockServer
from tests.conftest import MASTER_KEY
from tests.factories import backend_create, model_create, pool_create
from tests.live import PlatformProcess
from tests.otlp import OtlpReceiver, ReceivedSpan

pytestmark = pytest.mark.django_db(transaction=True)

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"


@pytest.fixture
def mock_server() -> Iterator[MockServer]:
    with MockServer(models=["served-chat"], embed_models=["served-embed"]) as server:
        yield server


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as otlp:
        yield otlp


def _named(spans: list[ReceivedSpan], name: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.name == name]


def test_live_platform_exports_request_spans_over_otlp_http(mock_server: MockServer, receiver: OtlpReceiver) -> None:
    pool = pool_create(name="gpu-a")
    backend_create(pool=pool, name="mock-a", base_url=mock_server.url)
    model_create(pool=pool, name="chat-model", served_name="served-chat")
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.endpoint,
        "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    headers = {"Authorization": f"Bearer {MASTER_KEY}", "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}
    body = {"model": "chat-model", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    with PlatformProcess(master_key=MASTER_KEY, env=env) as platform:
        # given a client in a trace of its own; when it sends a JSON request and a stream
        answer = httpx.post(f"{platform.url}/v1/chat/completions", json=body, headers=headers, timeout=10)
        assert answer.status_code == 200, answer.text
        seen_json = mock_server.stats.last_headers["traceparent"]
        streamed = httpx.post(
            f"{platform.url}/v1/chat/completions",
            json={**body, "stream": True},
            headers={"Authorization": f"Bearer {MASTER_KEY}"},
            timeout=10,
        )
        assert streamed.status_code == 200 and "[DONE]" in streamed.text
        seen_stream = mock_server.stats.last_headers["traceparent"]
        # then the receiver gets both requests' spans, while the platform runs
        spans = receiver.wait_for(
            lambda got: len(_named(got, "POST /v1/chat/completions")) == 2 and len(_named(got, "router.stream")) == 1
        )
    assert receiver.errors == []
    roots = _named(spans, "POST /v1/chat/completions")
    assert {s.service for s in spans} == {"llm-platform"}
    joined = next(s for s in roots if s.trace_id == CLIENT_TRACE)
    assert joined.parent_span_id == CLIENT_SPAN and joined.kind == "SERVER"
    assert joined.attributes["gen_ai.operation.name"] == "chat"
    assert joined.attributes["gen_ai.request.model"] == "chat-model"
    assert joined.attributes["gen_ai.response.model"] == "served-chat"
    assert joined.attributes["gen_ai.usage.output_tokens"] == 4
    assert joined.attributes["router.backend"] == "mock-a"
    assert joined.attributes["router.key_name"] == "master"
    attempt = next(s for s in _named(spans, "chat served-chat") if s.trace_id == CLIENT_TRACE)
    assert attempt.parent_span_id == joined.span_id and attempt.kind == "CLIENT"
    assert seen_json == f"00-{CLIENT_TRACE}-{attempt.span_id}-01"  # the backend joins the client's trace
    # the stream: a new trace (no client context), its stream span under its attempt, the first token noted
    stream = _named(spans, "router.stream")[0]
    stream_attempt = next(s for s in spans if s.span_id == stream.parent_span_id)
    assert stream_attempt.name == "chat served-chat"
    assert seen_stream.startswith(f"00-{stream.trace_id}-{stream_attempt.span_id}-")  # flags: sampled (+ random)
    assert [name for name, _, _ in stream.events] == ["first_token", "stream_end"]
    # nothing secret went out
    text = repr(spans)
    assert MASTER_KEY not in text and mock_server.url not in text and "hello" not in text


def test_spans_still_buffered_are_exported_when_the_platform_stops(
    mock_server: MockServer, receiver: OtlpReceiver
) -> None:
    pool = pool_create(name="gpu-a")
    backend_create(pool=pool, name="mock-a", base_url=mock_server.url)
    model_create(pool=pool, name="chat-model", served_name="served-chat")
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "600000"}  # endpoint alone: on
    body = {"model": "chat-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with PlatformProcess(master_key=MASTER_KEY, env=env) as platform:
        for _ in range(3):
            response = httpx.post(
                f"{platform.url}/v1/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {MASTER_KEY}"},
                timeout=10,
            )
            assert response.status_code == 200
        assert receiver.snapshot() == []  # buffered: the schedule is ten minutes
    # stopped (SIGTERM): the lifespan's shutdown flushed them
    spans = receiver.wait_for(lambda got: len(_named(got, "POST /v1/chat/completions")) == 3, timeout_s=5)
    assert len(_named(spans, "chat served-chat")) == 3
