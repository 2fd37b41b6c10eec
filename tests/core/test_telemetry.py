"""core.telemetry: tracing off by default, on with the standard OTEL_* variables; Celery tasks traced."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.export import ConsoleSpanExporter
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from core import telemetry


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, False),
        ({"OTEL_TRACES_EXPORTER": " ", "OTEL_EXPORTER_OTLP_ENDPOINT": ""}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, False),
        ({"OTEL_SDK_DISABLED": "false", "OTEL_TRACES_EXPORTER": "otlp"}, True),
    ],
)
def test_tracing_is_off_unless_the_environment_asks(environ: dict[str, str], on: bool) -> None:
    assert telemetry.wanted(environ) is on


def test_exporters_are_otlp_over_http_or_the_console() -> None:
    env = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}
    exporters = telemetry.exporters_from(env)
    assert [type(e) for e in exporters] == [OTLPSpanExporter]
    assert [type(e) for e in telemetry.exporters_from({"OTEL_TRACES_EXPORTER": "otlp,console"})] == [
        OTLPSpanExporter,
        ConsoleSpanExporter,
    ]
    for exporter in exporters:
        exporter.shutdown()


@pytest.mark.parametrize(
    "environ",
    [
        {"OTEL_TRACES_EXPORTER": "zipkin"},
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"},
    ],
)
def test_a_configuration_that_cannot_work_leaves_tracing_off_with_an_error(
    environ: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    assert telemetry.configure(environ=environ) is False
    assert telemetry.TRACING is False and telemetry.tracer is None
    assert "tracing stays off" in caplog.text


def test_configure_from_the_environment_turns_tracing_on(monkeypatch: pytest.MonkeyPatch) -> None:
    environ = {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:9/v1/traces",
        "OTEL_TRACES_SAMPLER": "traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.25",
    }
    for name, value in environ.items():
        monkeypatch.setenv(name, value)  # the SDK reads the sampler from the process environment
    monkeypatch.setattr("opentelemetry.trace.set_tracer_provider", lambda provider: None)
    try:
        assert telemetry.configure(environ=environ, service_name="svc-test") is True
        assert telemetry.TRACING is True and telemetry.provider is not None
        assert telemetry.provider.resource.attributes["service.name"] == "svc-test"
        assert "TraceIdRatioBased{0.25}" in telemetry.provider.sampler.get_description()
    finally:
        provider = telemetry.provider
        telemetry.install(None)
        if provider is not None:
            provider.shutdown()


def test_empty_otel_variables_count_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://127.0.0.1:9/v1/traces")
    monkeypatch.setattr("opentelemetry.trace.set_tracer_provider", lambda provider: None)
    try:
        assert telemetry.configure() is True
        assert "OTEL_TRACES_SAMPLER" not in os.environ
    finally:
        provider = telemetry.provider
        telemetry.install(None)
        if provider is not None:
            provider.shutdown()


@pytest.fixture
def traced_celery() -> Iterator[InMemorySpanExporter]:
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    exporter = InMemorySpanExporter()
    telemetry.install(telemetry.provider_for_tests(exporter))
    yield exporter
    CeleryInstrumentor().uninstrument()
    telemetry.install(None)


def test_celery_tasks_are_traced(traced_celery: InMemorySpanExporter) -> None:
    from llm_platform.celery import app

    @app.task(name="tests.telemetry.add")
    def add(a: int, b: int) -> int:
        return a + b

    assert telemetry.instrument_celery() is True
    assert add.apply(args=(2, 3)).get() == 5
    spans = traced_celery.get_finished_spans()
    run = next(s for s in spans if s.name == "run/tests.telemetry.add")
    assert run.kind is SpanKind.CONSUMER
    assert run.resource.attributes["service.name"] == telemetry.SERVICE_NAME


def test_celery_is_not_instrumented_while_tracing_is_off() -> None:
    assert telemetry.TRACING is False
    assert telemetry.instrument_celery() is False
