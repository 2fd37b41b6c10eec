"""OpenTelemetry spans of `/v1` requests (routing.tracing, driven by the Lifecycle), with the SDK's in-memory exporter.

Checked: span names, kinds and parents; the GenAI attributes; the client's `traceparent` continued and the attempt's
`traceparent` received by the backend; retries, the queue, streams and the WebSocket; nothing secret (key, backend
address, prompt) in any attribute unless prompt capture is on; no span at all while tracing is off.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from channels.testing import WebsocketCommunicator
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind, StatusCode

from backends.mock_vllm import MockConfig, MockServer, MockVLLM
from core import telemetry
from governance.models import key_hash
from governance.ratelimit import LocalRateLimiter
from governance.snapshot import KeySnap, KeySnapshot
from routing import tracing
from routing.gateway import Gateway
from routing.registry import RegistryCache
from routing.ws import websocket_application
from tests.factories import backend_snap, registry_snap
from tests.routing.conftest import HostRouter

SECRET = "sk-tracing-secret-7f3a"
BACKEND_KEY = "backend-secret-91c2"
PROMPT = "Tell me about the lighthouse keeper"
CHAT = {"model": "chat-model", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 12}
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
ROOT = "POST /v1/chat/completions"
ATTEMPT = "chat served-chat"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on for the test, every span kept in memory."""
    exporter = InMemorySpanExporter()
    telemetry.install(telemetry.provider_for_tests(exporter))
    yield exporter
    telemetry.install(None)
    tracing.configure_capture(False)


def _key(**limits: Any) -> KeySnap:
    fields: dict[str, Any] = {"rpm_limit": None, "tpm_limit": None, "daily_token_budget": None, **limits}
    return KeySnap(id=7, name="team-a", allowed_models=None, expires_at=None, **fields)


@pytest.fixture
def build(make_gateway: Callable[..., Gateway]) -> Callable[..., Gateway]:
    """A gateway over in-process backends by host (unknown hosts refuse connections), with the key `team-a`."""

    def make(apps: dict[str, Any], backends: list[Any] | None = None, key: KeySnap | None = None, **kw: Any) -> Gateway:
        backends = backends or [backend_snap("b1", base_url="http://mock-a", api_key=BACKEND_KEY)]
        gateway = make_gateway(registry=registry_snap(backends=backends), transport=HostRouter(apps), **kw)
        gateway.keys = RegistryCache.static(KeySnapshot(version=1, by_hash={key_hash(SECRET): key or _key()}))
        gateway.limiter = LocalRateLimiter()
        return gateway

    return make


async def _post(gateway: Gateway, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
    transport = httpx.ASGITransport(app=gateway)
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
        return await client.post(
            "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {SECRET}", **(headers or {})}
        )


def by_name(exporter: InMemorySpanExporter) -> dict[str, list[ReadableSpan]]:
    out: dict[str, list[ReadableSpan]] = {}
    for span in exporter.get_finished_spans():
        out.setdefault(span.name, []).append(span)
    return out


def one(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    found = by_name(exporter).get(name, [])
    assert len(found) == 1, (name, sorted(by_name(exporter)))
    return found[0]


def attrs_of(span: Any) -> dict[str, Any]:
    """A span's (or an event's) attributes, as a plain dict."""
    return dict(span.attributes or {})


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def all_values(exporter: InMemorySpanExporter) -> str:
    """Every attribute and event attribute value of every span, as one text."""
    parts: list[str] = []
    for span in exporter.get_finished_spans():
        parts.append(span.name)
        parts.extend(str(v) for v in (span.attributes or {}).values())
        for event in span.events:
            parts.extend(str(v) for v in (event.attributes or {}).values())
        parts.append(span.status.description or "")
    return "\n".join(parts)


def traceparent_of(span: ReadableSpan) -> str:
    context = span.get_span_context()
    assert context is not None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


# --- one JSON request ---------------------------------------------------------------------------------------------


async def test_json_request_spans_names_parents_and_genai_attributes(
    spans: InMemorySpanExporter, build: Callable[..., Gateway], mock_vllm: MockVLLM
) -> None:
    gateway = build({"mock-a": mock_vllm}, key=_key(rpm_limit=100))
    response = await _post(gateway, CHAT)
    assert response.status_code == 200, response.text
    assert sorted(by_name(spans)) == sorted([ROOT, "router.admission", ATTEMPT])
    root, admission, attempt = one(spans, ROOT), one(spans, "router.admission"), one(spans, ATTEMPT)
    # one trace: the root has no parent, the others are its children
    assert root.parent is None and root.kind is SpanKind.SERVER
    assert {s.context.trace_id for s in (root, admission, attempt)} == {root.context.trace_id}
    assert parent_id(admission) == parent_id(attempt) == root.context.span_id
    assert attempt.kind is SpanKind.CLIENT and admission.kind is SpanKind.INTERNAL
    # the request, in GenAI semantic conventions and the router's own names
    attrs = attrs_of(root)
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == "chat-model"
    assert attrs["gen_ai.response.model"] == "served-chat"
    assert attrs["gen_ai.usage.output_tokens"] == 12
    assert attrs["gen_ai.usage.input_tokens"] == response.json()["usage"]["prompt_tokens"] > 0
    assert (attrs["router.pool"], attrs["router.backend"], attrs["router.strategy"]) == ("p1", "b1", "round_robin")
    assert (attrs["router.key_name"], attrs["router.attempts"], attrs["http.response.status_code"]) == (
        "team-a",
        1,
        200,
    )
    assert attrs["router.request_id"] == response.headers["x-request-id"]
    assert attrs["router.stream"] is False
    assert attrs["router.priority"] == "standard"
    assert root.status.status_code is StatusCode.UNSET
    # the attempt: which backend, which served model
    attempt_attrs = attrs_of(attempt)
    assert attempt_attrs["router.backend"] == "b1"
    assert attempt_attrs["gen_ai.request.model"] == "served-chat"
    assert attempt_attrs["http.response.status_code"] == 200
    assert attempt_attrs["router.attempt"] == 1
    assert "router.retry_reason" not in attempt_attrs
    assert attrs_of(admission)["router.ratelimit.reserved_tokens"] > 0
    # the backend received the attempt's context: its spans become the attempt's children
    assert mock_vllm.stats.last_headers["traceparent"] == traceparent_of(attempt)


async def test_nothing_secret_in_any_span(
    spans: InMemorySpanExporter, build: Callable[..., Gateway], mock_vllm: MockVLLM
) -> None:
    gateway = build({"mock-a": mock_vllm})
    assert (await _post(gateway, CHAT)).status_code == 200
    mock_vllm.config.fail_status = 500
    assert (await _post(gateway, CHAT)).status_code == 502
    text = all_values(spans)
    assert len(spans.get_finished_spans()) == 4
    for secret in (SECRET, BACKEND_KEY, "mock-a", "http://", PROMPT, "lighthouse"):
        assert secret not in text, secret


async def test_prompt_captured_only_when_the_operator_turns_it_on(
    spans: InMemorySpanExporter, build: Callable[..., Gateway], mock_vllm: MockVLLM
) -> None:
    gateway = build({"mock-a": mock_vllm})
    tracing.configure_capture(True)
    assert (await _post(gateway, CHAT)).status_code == 200
    captured = dict(one(spans, ROOT).attributes or {})["gen_ai.input.messages"]
    assert PROMPT in str(captured)


async def test_client_traceparent_is_continued_and_passed_to_the_backend(
    spans: InMemorySpanExporter, build: Callable[..., Gateway], mock_vllm: MockVLLM
) -> None:
    gateway = build({"mock-a": mock_vllm})
    response = await _post(gateway, CHAT, {"traceparent": TRACEPARENT, "tracestate": "vendor=abc"})
    assert response.status_code == 200
    root, attempt = one(spans, ROOT), one(spans, ATTEMPT)
    assert f"{root.context.trace_id:032x}" == CLIENT_TRACE
    assert root.parent is not None and f"{root.parent.span_id:016x}" == CLIENT_SPAN and root.parent.is_remote
    seen = mock_vllm.stats.last_headers
    assert seen["traceparent"] == traceparent_of(attempt)
    assert seen["traceparent"].split("-")[1] == CLIENT_TRACE
    assert seen["tracestate"] == "vendor=abc"


async def test_an_invalid_traceparent_starts_a_new_trace(
    spans: InMemorySpanExporter, build: Callable[..., Gateway], mock_vllm: MockVLLM
) -> None:
    gateway = build({"mock-a": mock_vllm})
    assert (await _post(gateway, CHAT, {"traceparent": "00-zz-not-a-trace"})).status_code == 200
    root = one(spans, ROOT)
    assert root.parent is None
    assert mock_vllm.stats.last_headers["traceparent"].split("-")[1] == f"{root.context.trace_id:032x}"


# --- retries, the queue, the admission ------------------------------------------------------------------------


async def test_each_attempt_is_a_span_with_the_retry_reason(
    spans: InMemorySpanExporter, build: Callable[..., Gateway], mock_vllm: MockVLLM
) -> None:
    failing = MockVLLM(MockConfig(models=["served-chat"], fail_status=503))
    backends = [backend_snap("b1", base_url="http://mock-a"), backend_snap("b2", base_url="http://mock-b")]
    gateway = build({"mock-a": failing, "mock-b": mock_vllm}, backends)
    response = await _post(gateway, CHAT)
    assert response.status_code == 200
    attempts = sorted(by_name(spans)[ATTEMPT], key=lambda s: s.start_time or 0)
    assert [attrs_of(s)["router.backend"] for s in attempts] == ["b1", "b2"]
    first, second = (attrs_of(s) for s in attempts)
    assert attempts[0].status.status_code is StatusCode.ERROR
    assert "b1" in str(first["error.type"]) and "503" in str(first["error.type"])
    assert (first["router.attempt"], second["router.attempt"]) == (1, 2)
    assert second["router.retry_reason"] == first["error.type"]
    assert attempts[1].status.status_code is StatusCode.UNSET
    root = one(spans, ROOT)
    assert attrs_of(root)["router.attempts"] == 2
    assert {parent_id(s) for s in attempts} == {root.context.span_id}
    # the backend that answered got the second attempt's context
    assert mock_vllm.stats.last_headers["traceparent"] == traceparent_of(attempts[1])


async def test_no_backend_answering_ends_every_span_in_error(
    spans: InMemorySpanExporter, build: Callable[..., Gateway]
) -> None:
    gateway = build({})  # mock-a refuses connections
    response = await _post(gateway, CHAT)
    assert response.status_code == 502
    root, attempt = one(spans, ROOT), one(spans, ATTEMPT)
    assert attempt.status.status_code is StatusCode.ERROR and "cannot connect" in str(attempt.attributes)
    assert root.status.status_code is StatusCode.ERROR
    assert attrs_of(root)["http.response.status_code"] == 502
    assert attrs_of(root)["error.type"] == "backend_error"
    assert "gen_ai.response.model" not in attrs_of(root)


async def test_waiting_for_a_backend_slot_is_the_queue_span(
    spans: InMemorySpanExporter, build: Callable[..., Gateway], mock_vllm: MockVLLM
) -> None:
    mock_vllm.config.latency_s = 0.3
    backends = [backend_snap("b1", base_url="http://mock-a", max_concurrent_requests=1)]
    gateway = build({"mock-a": mock_vllm}, backends)
    first, second = await asyncio.gather(_post(gateway, CHAT), _post(gateway, CHAT))
    assert first.status_code == second.status_code == 200
    queue = one(spans, "router.queue")
    wait_ms = attrs_of(queue)["router.queue_wait_ms"]
    assert 150 <= wait_ms <= 2000
    waited = next(s for s in by_name(spans)[ROOT] if s.context.span_id == parent_id(queue))
    assert attrs_of(waited)["router.queue_wait_ms"] == wait_ms
    attempt = next(s for s in by_name(spans)[ATTEMPT] if parent_id(s) == waited.context.span_id)
    assert (queue.end_time or 0) <= (attempt.start_time or 0)


async def test_a_rate_limited_request_has_a_failed_admission_span(
    spans: InMemorySpanExporter, build: Callable[..., Gateway], mock_vllm: MockVLLM
) -> None:
    gateway = build({"mock-a": mock_vllm}, key=_key(rpm_limit=1))
    assert (await _post(gateway, CHAT)).status_code == 200
    assert (await _post(gateway, CHAT)).status_code == 429
    admissions = sorted(by_name(spans)["router.admission"], key=lambda s: s.start_time or 0)
    assert [s.status.status_code for s in admissions] == [StatusCode.UNSET, StatusCode.ERROR]
    refused = next(s for s in by_name(spans)[ROOT] if s.context.span_id == parent_id(admissions[1]))
    assert attrs_of(refused)["http.response.status_code"] == 429
    assert refused.status.status_code is StatusCode.UNSET  # a 4xx is the client's, not a server error
    assert len(by_name(spans)[ATTEMPT]) == 1  # no backend was asked


# --- streams --------------------------------------------------------------------------------------------------


async def test_stream_has_its_span_with_the_first_token_and_its_end(
    spans: InMemorySpanExporter, build: Callable[..., Gateway], mock_vllm: MockVLLM
) -> None:
    mock_vllm.config.token_delay_s = 0.005
    gateway = build({"mock-a": mock_vllm})
    response = await _post(gateway, {**CHAT, "stream": True})
    assert response.status_code == 200 and "data: [DONE]" in response.text
    root, attempt, stream = one(spans, ROOT), one(spans, ATTEMPT), one(spans, "router.stream")
    assert parent_id(stream) == attempt.context.span_id
    assert [e.name for e in stream.events] == ["first_token", "stream_end"]
    ttft = attrs_of(stream.events[0])["router.ttft_ms"]
    assert attrs_of(root)["router.ttft_ms"] == ttft > 0
    assert stream.events[0].timestamp <= stream.events[1].timestamp <= (stream.end_time or 0)
    stream_attrs = attrs_of(stream)
    assert stream_attrs["router.stream.events"] >= 12
    assert stream_attrs["router.stream.status"] == 200
    assert attrs_of(root)["gen_ai.usage.output_tokens"] == 12
    assert attrs_of(root)["router.stream"] is True
    # nesting in time: request > attempt > stream
    assert (root.start_time or 0) <= (attempt.start_time or 0) <= (stream.start_time or 0)
    assert (stream.end_time or 0) <= (attempt.end_time or 0) <= (root.end_time or 0)


async def test_a_stream_broken_mid_way_ends_its_spans_in_error(
    spans: InMemorySpanExporter, make_gateway: Callable[..., Gateway]
) -> None:
    # the mock on a real socket (its connection really drops), reached by the platform's own upstream client
    with MockServer(models=["served-chat"], embed_models=["served-embed"]) as server:
        server.config.die_after_tokens = 3
        gateway = make_gateway(registry=registry_snap(backends=[backend_snap("b1", base_url=server.url)]))
        gateway.keys = RegistryCache.static(KeySnapshot(version=1, by_hash={key_hash(SECRET): _key()}))
        response = await _post(gateway, {**CHAT, "stream": True})
        await gateway.dispatcher.aclose()
    assert "event: error" in response.text
    stream, attempt, root = one(spans, "router.stream"), one(spans, ATTEMPT), one(spans, ROOT)
    assert attrs_of(stream)["router.stream.status"] == 502
    assert {s.status.status_code for s in (stream, attempt, root)} == {StatusCode.ERROR}


# --- WebSocket ------------------------------------------------------------------------------------------------


async def test_websocket_request_is_a_server_span_continuing_the_handshake_traceparent(
    spans: InMemorySpanExporter, build: Callable[..., Gateway], mock_vllm: MockVLLM
) -> None:
    gateway = build({"mock-a": mock_vllm})
    communicator = WebsocketCommunicator(
        websocket_application(gateway),
        "/v1/ws",
        headers=[(b"authorization", f"Bearer {SECRET}".encode()), (b"traceparent", TRACEPARENT.encode())],
    )
    connected, _ = await communicator.connect()
    assert connected
    rid = uuid.uuid4().hex
    await communicator.send_json_to({"type": "request", "id": rid, "endpoint": "chat.completions", "body": CHAT})
    async with asyncio.timeout(10):
        while (await communicator.receive_json_from(timeout=5))["type"] not in {"done", "error"}:
            pass
    await communicator.disconnect()
    root = one(spans, "WS /v1/ws chat.completions")
    assert root.kind is SpanKind.SERVER
    assert f"{root.context.trace_id:032x}" == CLIENT_TRACE
    assert attrs_of(root)["router.transport"] == "websocket"
    stream = one(spans, "router.stream")
    assert parent_id(one(spans, ATTEMPT)) == root.context.span_id
    assert [e.name for e in stream.events] == ["first_token", "stream_end"]
    assert mock_vllm.stats.last_headers["traceparent"] == traceparent_of(one(spans, ATTEMPT))


# --- off, unsampled -------------------------------------------------------------------------------------------


async def test_tracing_off_makes_no_span_and_sends_no_traceparent(
    build: Callable[..., Gateway], mock_vllm: MockVLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    exporter = InMemorySpanExporter()
    provider = telemetry.provider_for_tests(exporter)  # made, but not installed: tracing is off
    assert telemetry.TRACING is False
    made: list[Any] = []
    monkeypatch.setattr(tracing.RequestTrace, "__init__", lambda *a, **k: made.append(a))
    gateway = build({"mock-a": mock_vllm})
    lifecycle = gateway.lifecycle(gateway_endpoint(), "r1", 0.0)
    assert lifecycle.trace is None and lifecycle.trace_id is None
    response = await _post(gateway, CHAT, {"traceparent": TRACEPARENT})
    assert response.status_code == 200
    assert made == [] and exporter.get_finished_spans() == ()
    assert "traceparent" not in mock_vllm.stats.last_headers
    provider.shutdown()


def gateway_endpoint() -> Any:
    from routing.gateway import ENDPOINTS

    return ENDPOINTS["/v1/chat/completions"]


async def test_unsampled_requests_export_nothing_but_still_pass_the_context_on(
    build: Callable[..., Gateway], mock_vllm: MockVLLM
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.install(provider)
    try:
        gateway = build({"mock-a": mock_vllm})
        lifecycle = gateway.lifecycle(gateway_endpoint(), "r1", 0.0)
        assert lifecycle.trace is not None and lifecycle.trace_id is None  # nothing to link a usage record to
        assert (await _post(gateway, {**CHAT, "stream": True})).status_code == 200
    finally:
        telemetry.install(None)
    assert exporter.get_finished_spans() == ()
    flags = int(mock_vllm.stats.last_headers["traceparent"].rsplit("-", 1)[1], 16)
    assert flags & 1 == 0  # not sampled: vLLM does not record it either


async def test_lifecycle_exposes_the_sampled_trace_id(
    spans: InMemorySpanExporter, build: Callable[..., Gateway]
) -> None:
    gateway = build({})
    lifecycle = gateway.lifecycle(gateway_endpoint(), "r1", 0.0, headers=[(b"traceparent", TRACEPARENT.encode())])
    assert lifecycle.trace_id == CLIENT_TRACE
    await lifecycle.finish()
    assert one(spans, ROOT).context.trace_id == int(CLIENT_TRACE, 16)


async def test_a_batch_line_is_an_internal_span_under_the_current_one(
    spans: InMemorySpanExporter, build: Callable[..., Gateway]
) -> None:
    gateway = build({})
    tracer = telemetry.tracer
    assert tracer is not None
    with tracer.start_as_current_span("run/batches.tasks.batch_run"):  # what the Celery instrumentation opens
        lifecycle = gateway.lifecycle(gateway_endpoint(), "r1", 0.0, transport="batch")
    await lifecycle.finish()
    line, task = one(spans, "batch chat.completions"), one(spans, "run/batches.tasks.batch_run")
    assert line.kind is SpanKind.INTERNAL
    assert parent_id(line) == task.context.span_id
