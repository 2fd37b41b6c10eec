"""The spans of one `/v1` request, driven by its `Lifecycle` (routing.exchange) while tracing is on.

    POST /v1/chat/completions       SERVER  the request (HTTP, SSE; "WS /v1/ws <endpoint>", "batch <endpoint>")
    ├── router.admission            INTERNAL  the key's rate-limit check (reservation)
    ├── router.queue                INTERNAL  waiting for a backend slot (only when every backend was full)
    ├── chat <model>                CLIENT  one upstream attempt (backend, retry reason); its context goes to the
    │   │                                   backend in `traceparent`, so vLLM's `llm_request` span is its child
    │   └── router.stream           INTERNAL  a stream from its first byte to its end; event `first_token`
    └── chat <model>                CLIENT  the retry on another backend, ...

Attributes follow OpenTelemetry's GenAI semantic conventions (`gen_ai.operation.name`, `gen_ai.request.model`,
`gen_ai.response.model`, `gen_ai.usage.input_tokens` / `output_tokens`) plus the router's own (`router.pool`,
`router.backend`, `router.strategy`, `router.key_name`, ...). A backend is named, never its address; a key by
its name, never its secret; the prompt only with ROUTER_TRACE_CAPTURE_PROMPTS on. See docs/operations.md.

Nothing here runs while tracing is off: the Lifecycle holds None instead of a RequestTrace.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Iterable
from typing import TYPE_CHECKING, Any

import orjson
from opentelemetry.trace import NonRecordingSpan, Span, SpanKind, Status, StatusCode, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from core import telemetry
from routing.errors import APIError

if TYPE_CHECKING:
    from backends.snapshot import BackendSnap, RegistrySnapshot
    from governance.ratelimit import Reservation
    from routing.auth import Principal
    from routing.gateway import Endpoint, PreparedRequest

PROPAGATOR = TraceContextTextMapPropagator()
"""W3C trace context only (`traceparent`, `tracestate`): a client's baggage is not passed on to backends."""
OPERATIONS = {"chat.completions": "chat", "completions": "text_completion", "embeddings": "embeddings"}
"""GenAI `gen_ai.operation.name` of each endpoint (others: the endpoint's name)."""
CAPTURE_MAX_CHARS = 16_384
"""Captured prompt text is cut to this many characters."""
CAPTURE_PROMPTS = False
"""ROUTER_TRACE_CAPTURE_PROMPTS: put the request's messages / prompt / input on the request span."""
_TRACE_HEADERS = (b"traceparent", b"tracestate")


def reason_of(error: BaseException) -> str:
    """An error as operators read it: the internal message (backend names, no addresses), else its class."""
    if isinstance(error, APIError):
        return error.internal_message or error.message
    return type(error).__name__


def configure_capture(enabled: bool) -> None:
    """Set prompt capture (from the ROUTER_TRACE_CAPTURE_PROMPTS setting)."""
    global CAPTURE_PROMPTS
    CAPTURE_PROMPTS = enabled


def incoming_context(headers: Iterable[tuple[bytes, bytes]]) -> Any:
    """The remote parent of a client's W3C `traceparent` header, or None (a new trace)."""
    carrier: dict[str, str] = {}
    for name, value in headers:
        if name in _TRACE_HEADERS:
            carrier[name.decode()] = value.decode("latin-1")
    return PROPAGATOR.extract(carrier) if "traceparent" in carrier else None


class RequestTrace:
    """The spans of one request; see the module docstring. Methods are called by the Lifecycle only."""

    __slots__ = (
        "attempt_number",
        "attempt_span",
        "model",
        "operation",
        "queue_span",
        "queued_at",
        "root",
        "served",
        "stream_span",
    )

    def __init__(
        self, endpoint: Endpoint, transport: str, headers: Iterable[tuple[bytes, bytes]] | None = None
    ) -> None:
        tracer = telemetry.tracer
        assert tracer is not None
        self.operation = OPERATIONS.get(endpoint.name, endpoint.name)
        if transport == "http":
            name, kind = f"POST {endpoint.upstream_path}", SpanKind.SERVER
        elif transport == "websocket":
            name, kind = f"WS /v1/ws {endpoint.name}", SpanKind.SERVER
        else:
            name, kind = f"{transport} {endpoint.name}", SpanKind.INTERNAL
        self.root: Span = tracer.start_span(
            name,
            context=incoming_context(headers) if headers else None,
            kind=kind,
            attributes={"gen_ai.operation.name": self.operation, "router.transport": transport},
        )
        self.attempt_span: Span | None = None
        self.attempt_number = 0
        self.queue_span: Span | None = None
        self.queued_at = 0.0
        self.stream_span: Span | None = None
        self.model = ""
        self.served = ""

    @property
    def trace_id(self) -> str | None:
        """The trace's id (32 hex digits) when it is sampled (recorded and exported), else None."""
        context = self.root.get_span_context()
        return f"{context.trace_id:032x}" if context.trace_flags.sampled else None

    def _child(self, name: str, parent: Span, kind: SpanKind = SpanKind.INTERNAL, **attributes: Any) -> Span:
        tracer = telemetry.tracer
        if tracer is None or isinstance(parent, NonRecordingSpan):
            return NonRecordingSpan(parent.get_span_context())  # unsampled: nothing to record
        return tracer.start_span(name, context=set_span_in_context(parent), kind=kind, attributes=attributes)

    # --- what the request is ------------------------------------------------------------------------------------

    def request(self, prepared: PreparedRequest, principal: Principal | None, request_id: str) -> None:
        """The request's model, key name and stream flag (after validation)."""
        self.model = prepared.requested
        self.served = prepared.model.served_name
        root = self.root
        if not root.is_recording():
            return
        root.set_attribute("gen_ai.request.model", prepared.requested)
        root.set_attribute("router.request_id", request_id)
        root.set_attribute("router.stream", prepared.stream)
        root.set_attribute("router.key_name", principal.name if principal is not None else "anonymous")
        pool = prepared.registry.pools.get(prepared.model.pool)
        root.set_attribute("router.pool", prepared.model.pool)
        if pool is not None:
            root.set_attribute("router.strategy", pool.strategy)
        if CAPTURE_PROMPTS:
            data = prepared.data
            for field in ("messages", "prompt", "input"):
                if field in data:
                    text = orjson.dumps(data[field]).decode()
                    root.set_attribute("gen_ai.input.messages", text[:CAPTURE_MAX_CHARS])
                    break

    async def admission(self, check: Awaitable[Reservation]) -> Reservation:
        """The rate-limit check, in its span: the reservation's tokens, or the 429."""
        span = self._child("router.admission", self.root)
        try:
            reservation = await check
            if span.is_recording():
                span.set_attribute("router.ratelimit.reserved_tokens", reservation.reserved_tokens)
            return reservation
        except BaseException as exc:
            if span.is_recording():
                span.set_status(Status(StatusCode.ERROR, reason_of(exc)))
            raise
        finally:
            span.end()

    # --- the dispatcher's observer (routing.dispatch.AttemptObserver) -------------------------------------------

    def queued(self) -> None:
        """Every usable backend is at its limit: the request waits in the queue."""
        if self.queue_span is None:
            self.queued_at = time.perf_counter()
            self.queue_span = self._child("router.queue", self.root)

    def attempt(self, backend: BackendSnap, registry: RegistrySnapshot, previous: APIError | None) -> dict[str, str]:
        """A new upstream attempt on `backend`: its span started (the previous one ended with `previous`, the
        failure that makes this a retry), the headers that carry its context to the backend returned."""
        retry_reason = reason_of(previous) if previous is not None else None
        self._end_queue()
        self._end_attempt(retry_reason, error=True)
        self.attempt_number += 1
        pool = registry.pools.get(backend.pool)
        span = self._child(
            f"{self.operation} {self.served}",
            self.root,
            SpanKind.CLIENT,
            **{
                "gen_ai.operation.name": self.operation,
                "gen_ai.request.model": self.served,
                "router.backend": backend.name,
                "router.pool": backend.pool,
                "router.strategy": pool.strategy if pool is not None else "",
                "router.attempt": self.attempt_number,
            },
        )
        if retry_reason is not None and span.is_recording():
            span.set_attribute("router.retry_reason", retry_reason)
        self.attempt_span = span
        carrier: dict[str, str] = {}
        PROPAGATOR.inject(carrier, context=set_span_in_context(span))
        return carrier

    def _end_queue(self, error: str | None = None) -> None:
        span = self.queue_span
        if span is None:
            return
        self.queue_span = None
        wait_ms = (time.perf_counter() - self.queued_at) * 1000.0
        if span.is_recording():
            span.set_attribute("router.queue_wait_ms", round(wait_ms, 3))
            if error is not None:
                span.set_status(Status(StatusCode.ERROR, error))
        self.root.set_attribute("router.queue_wait_ms", round(wait_ms, 3))
        span.end()

    def _end_attempt(self, failure: str | None, *, error: bool, status: int | None = None) -> None:
        span = self.attempt_span
        if span is None:
            return
        self.attempt_span = None
        if span.is_recording():
            if status is not None:
                span.set_attribute("http.response.status_code", status)
            if error:
                span.set_status(Status(StatusCode.ERROR, failure))
                if failure:
                    span.set_attribute("error.type", failure[:200])
        span.end()

    # --- the exchange -------------------------------------------------------------------------------------------

    def answered(self, backend: BackendSnap, status: int, stream: bool) -> None:
        """The backend chosen answered with `status` (its body read, or for a 200 stream about to be relayed)."""
        span = self.attempt_span
        if span is not None and span.is_recording():
            span.set_attribute("http.response.status_code", status)
        root = self.root
        if root.is_recording():
            root.set_attribute("router.backend", backend.name)
            root.set_attribute("router.attempts", self.attempt_number)
        if stream and status == 200 and span is not None:
            self.stream_span = self._child("router.stream", span)

    def send_failed(self, error: BaseException) -> None:
        """No backend answered (the last attempt's failure, or the queue's 429)."""
        message = reason_of(error)
        cancelled = isinstance(error, asyncio.CancelledError)  # the client left: not the backend's failure
        self._end_queue(None if cancelled else message)
        self._end_attempt(message, error=not cancelled)
        if self.root.is_recording():
            self.root.set_attribute("router.attempts", self.attempt_number)

    def first_token(self, ttft_ms: float) -> None:
        """The stream's first bytes reached the transport."""
        value = round(ttft_ms, 3)
        self.root.set_attribute("router.ttft_ms", value)
        span = self.stream_span
        if span is not None:
            span.add_event("first_token", {"router.ttft_ms": value})

    def stream_ended(self, events: int) -> None:
        """The stream is over (complete, broken, or its client gone): the count of events relayed."""
        span = self.stream_span
        if span is not None and span.is_recording():
            span.set_attribute("router.stream.events", events)
            span.add_event("stream_end", {"router.stream.events": events})

    def _end_stream(self, status: int) -> None:
        span = self.stream_span
        if span is None:
            return
        self.stream_span = None
        if span.is_recording():
            span.set_attribute("router.stream.status", status)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
        span.end()

    def finish(
        self,
        *,
        status: int,
        code: str | None,
        response_model: str | None,
        input_tokens: int,
        output_tokens: int,
        usage_seen: bool,
        priority: str = "",
    ) -> None:
        """End every open span with the request's outcome (and its priority class)."""
        error = code or (f"HTTP {status}" if status >= 400 else None)
        self._end_queue(error)
        self._end_stream(status)
        self._end_attempt(error, error=status >= 500 and status != 499, status=None)
        root = self.root
        if root.is_recording():
            root.set_attribute("http.response.status_code", status)
            if priority:
                root.set_attribute("router.priority", priority)
            if response_model:
                root.set_attribute("gen_ai.response.model", response_model)
            if usage_seen:
                root.set_attribute("gen_ai.usage.input_tokens", input_tokens)
                root.set_attribute("gen_ai.usage.output_tokens", output_tokens)
            if error is not None:
                root.set_attribute("error.type", error)
            if status >= 500:
                root.set_status(Status(StatusCode.ERROR, error))
        root.end()
