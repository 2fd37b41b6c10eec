"""OpenTelemetry tracing of this process: off unless the standard `OTEL_*` environment variables ask for it.

Tracing is on when `OTEL_TRACES_EXPORTER` names an exporter (`otlp`, or `console` for debugging), or when it is
unset and an OTLP endpoint is given (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`); it is
off by default, with `OTEL_TRACES_EXPORTER=none` and with `OTEL_SDK_DISABLED=true`. The rest is the SDK's own
reading of the standard variables: the exporter's endpoint, headers, timeout and compression
(`OTEL_EXPORTER_OTLP_*`; the protocol is OTLP/HTTP with protobuf, `http/protobuf`), the sampler
(`OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`; default `parentbased_always_on`), the batch processor
(`OTEL_BSP_*`) and the resource (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`). See docs/operations.md.

`TRACING` is the one flag the hot path reads: while it is False no span object is ever created.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Tracer

logger = logging.getLogger(__name__)

TRACING = False
"""Whether this process traces (read per request by routing.exchange; set only by `configure` / `install`)."""
tracer: Tracer | None = None
"""The platform's tracer while TRACING."""
provider: TracerProvider | None = None
SERVICE_NAME = "llm-platform"
SUPPORTED_PROTOCOLS = ("http/protobuf",)
EXPORTERS = ("otlp", "console")


def wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment turns tracing on (see the module docstring)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters:
        return exporters != "none"
    return bool(environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def exporters_from(environ: Mapping[str, str] = os.environ) -> list[SpanExporter]:
    """The span exporters `OTEL_TRACES_EXPORTER` names (default `otlp`); ValueError for what is not supported."""
    names = [n.strip() for n in environ.get("OTEL_TRACES_EXPORTER", "otlp").lower().split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPORTERS]
    if unknown:
        raise ValueError(f"OTEL_TRACES_EXPORTER: {', '.join(unknown)} not supported (use {' or '.join(EXPORTERS)})")
    out: list[SpanExporter] = []
    for name in names:
        if name == "otlp":
            protocol = (
                environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or ""
            ).strip()
            if protocol and protocol not in SUPPORTED_PROTOCOLS:
                raise ValueError(f"OTLP protocol {protocol!r} not supported: only http/protobuf (port 4318)")
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            out.append(OTLPSpanExporter())
        else:
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            out.append(ConsoleSpanExporter())
    return out


def configure(*, service_name: str = SERVICE_NAME, environ: Mapping[str, str] = os.environ) -> bool:
    """Turn tracing on for this process when the environment asks for it; returns whether it is on.

    A configuration that cannot work (an unknown exporter, the gRPC protocol) is logged as an error and leaves
    tracing off: the platform serves requests either way.
    """
    if TRACING or not wanted(environ):
        return TRACING
    try:
        exporters = exporters_from(environ)
    except ValueError as exc:
        logger.error("tracing stays off: %s", exc)
        return False
    if environ is os.environ:  # an empty variable (a copied .env.example) means unset, to the SDK as well
        for name in [k for k, v in os.environ.items() if k.startswith("OTEL_") and not v.strip()]:
            del os.environ[name]
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    named = environ.get("OTEL_SERVICE_NAME") or "service.name=" in environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    new = TracerProvider(resource=Resource.create({} if named else {"service.name": service_name}))
    for exporter in exporters:
        new.add_span_processor(BatchSpanProcessor(exporter))
    install(new)
    trace.set_tracer_provider(new)  # for libraries that trace through the global provider (Celery's instrumentation)
    logger.info("tracing on: %s", ", ".join(type(e).__name__ for e in exporters))
    return True


def install(new_provider: TracerProvider | None) -> None:
    """Trace with this provider (None: stop tracing). Tests install one with an in-memory exporter."""
    global TRACING, tracer, provider
    provider = new_provider
    tracer = new_provider.get_tracer("llm_platform") if new_provider is not None else None
    TRACING = new_provider is not None


def provider_for_tests(exporter: SpanExporter, processor: SpanProcessor | None = None) -> TracerProvider:
    """A provider that hands every span to `exporter` as it ends (sampling: always on)."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    new = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}))
    new.add_span_processor(processor or SimpleSpanProcessor(exporter))
    return new


def force_flush(timeout_ms: int = 5000) -> None:
    """Export the spans still buffered (at shutdown)."""
    if provider is not None:
        try:
            provider.force_flush(timeout_ms)
        except Exception:  # an unreachable collector must not stop a shutdown
            logger.warning("flushing spans failed", exc_info=True)


def instrument_celery() -> bool:
    """Trace Celery tasks (a span per task run, context carried from the publisher) when tracing is on."""
    if not TRACING:
        return False
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    instrumentor = CeleryInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument(tracer_provider=provider)
    return True
