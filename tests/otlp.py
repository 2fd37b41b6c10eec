"""A small OTLP/HTTP trace receiver for the tests and the tracing benchmark: `POST /v1/traces` with protobuf.

No package ships the OpenTelemetry Collector (neither PyPI nor Debian), so this speaks the protocol's HTTP binding
itself (opentelemetry-proto's messages): it accepts `ExportTraceServiceRequest` bodies (gzip or not), answers an
`ExportTraceServiceResponse`, and keeps every span it received, decoded, for assertions. vLLM's exporter
(`OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf`) and the platform's both send to it.

    with OtlpReceiver() as receiver:        # receiver.endpoint: http://127.0.0.1:<port>/v1/traces
        ...
        spans = receiver.wait_for(lambda spans: any(s.name == "llm_request" for s in spans))
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

MAX_BODY_BYTES = 64 * 1024 * 1024
KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as the receiver decoded it (ids as hex)."""

    service: str
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_span_id: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)
    events: tuple[tuple[str, int, dict[str, Any]], ...] = ()
    status_code: int = 0
    resource: dict[str, Any] = field(default_factory=dict)

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind) if kind else None


def _attributes(items: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in items}


def decode_spans(body: bytes) -> list[ReceivedSpan]:
    """The spans of an ExportTraceServiceRequest."""
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    out: list[ReceivedSpan] = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        service = str(resource.get("service.name", ""))
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                out.append(
                    ReceivedSpan(
                        service=service,
                        name=span.name,
                        kind=KINDS.get(span.kind, str(span.kind)),
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        attributes=_attributes(span.attributes),
                        events=tuple((e.name, e.time_unix_nano, _attributes(e.attributes)) for e in span.events),
                        status_code=span.status.code,
                        resource=resource,
                    )
                )
    return out


class OtlpReceiver:
    """The receiver on 127.0.0.1 (a free port), served by a thread; `decode=False` only counts (benchmarks)."""

    def __init__(self, *, decode: bool = True, port: int = 0) -> None:
        self.decode = decode
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self.bytes = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if self.path.rstrip("/") != "/v1/traces" or not 0 < length <= MAX_BODY_BYTES:
                    self._answer(404 if self.path.rstrip("/") != "/v1/traces" else 400, b"")
                    return
                body = self.rfile.read(length)
                encoding = (self.headers.get("content-encoding") or "").lower()
                try:
                    if encoding == "gzip":
                        body = gzip.decompress(body)
                    elif encoding == "deflate":
                        body = zlib.decompress(body)
                    spans = decode_spans(body) if receiver.decode else []
                except Exception as exc:  # a malformed export: 400, as a collector answers
                    with receiver._lock:
                        receiver.errors.append(f"{type(exc).__name__}: {exc}")
                    self._answer(400, b"")
                    return
                with receiver._changed:
                    receiver.requests += 1
                    receiver.bytes += len(body)
                    receiver.spans.extend(spans)
                    receiver._changed.notify_all()
                self._answer(200, ExportTraceServiceResponse().SerializeToString())

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.endpoint = f"{self.url}/v1/traces"
        self._thread = threading.Thread(target=self.server.serve_forever, name="otlp-receiver", daemon=True)

    def start(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def snapshot(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self.spans)

    def wait_for(self, done: Callable[[list[ReceivedSpan]], bool], timeout_s: float = 20.0) -> list[ReceivedSpan]:
        """Wait until `done(spans)` holds; return the spans then (AssertionError after the timeout)."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not done(list(self.spans)):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    names = sorted({(s.service, s.name) for s in self.spans})
                    raise AssertionError(f"OTLP receiver: condition not met in {timeout_s} s; received {names}")
                self._changed.wait(remaining)
            return list(self.spans)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        """The spans of one trace, in start order."""
        return sorted((s for s in self.snapshot() if s.trace_id == trace_id), key=lambda s: s.start_ns)
