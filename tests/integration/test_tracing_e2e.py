"""One trace across the platform and a real vLLM: the router's spans and vLLM's own `llm_request` span.

A separate CPU vLLM chat server is started for this module (`scripts/real_backend.sh start-chat PORT` with
REAL_BACKEND_OTLP_ENDPOINT: vLLM's --otlp-traces-endpoint pointing at the test's OTLP/HTTP receiver), so the shared
pool is never restarted; it is stopped at the end. A platform process with tracing on (the standard OTEL_*
variables) routes to it; a client sends a W3C `traceparent`, and the receiver must then hold one trace: the
client's span -> the platform's request span -> its attempt span -> vLLM's `llm_request`. The span names and
timings are printed (docs/operations.md shows such a trace).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from backends.mock_vllm import free_port
from tests.conftest import MASTER_KEY
from tests.integration.conftest import E2EConfig, E2ERegistry, LatencyLog
from tests.live import ROOT, PlatformProcess
from tests.otlp import OtlpReceiver, ReceivedSpan

pytestmark = pytest.mark.e2e

SCRIPT = ROOT / "scripts" / "real_backend.sh"
POOL = "e2e-traced"
CLIENT_TRACE = "5b8efff798038103d269b633813fc60c"
CLIENT_SPAN = "eee19b7ec3c1b174"


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as otlp:
        yield otlp


@pytest.fixture(scope="module")
def traced_vllm(e2e_config: E2EConfig, receiver: OtlpReceiver) -> Iterator[str]:
    """A chat server of its own exporting its traces to the receiver; its base URL."""
    if not e2e_config.can_kill_backend:
        pytest.skip("E2E_CAN_KILL_BACKEND is not 1: scripts/real_backend.sh does not manage the backends here")
    port = free_port()
    env = {
        **os.environ,
        "REAL_BACKEND_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_SERVICE_NAME": "vllm",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
        "VLLM_MODEL_NAME": e2e_config.model,
    }
    try:
        subprocess.run(["bash", str(SCRIPT), "start-chat", str(port)], cwd=ROOT, env=env, check=True, timeout=900)
        yield f"http://127.0.0.1:{port}"
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop-one", str(port)], cwd=ROOT, env=env, check=False, timeout=120)


@pytest.fixture(scope="module")
def traced_model(traced_vllm: str, e2e_registry: E2ERegistry, django_db_blocker: Any) -> Iterator[str]:
    from backends.models import Backend, GpuPool, ServedModel

    with django_db_blocker.unblock():
        served = ServedModel.objects.get(name=e2e_registry.model).served_name
        pool = GpuPool.objects.create(name=POOL, description="E2E: a vLLM exporting traces")
        Backend.objects.create(pool=pool, name=f"{POOL}-1", base_url=traced_vllm)
        public = ServedModel.objects.create(
            name=f"{e2e_registry.model}-traced", served_name=served, kind="chat", pool=pool
        )
    yield public.name
    with django_db_blocker.unblock():
        ServedModel.objects.filter(pool__name=POOL).delete()
        GpuPool.objects.filter(name=POOL).delete()


def _complete(spans: list[ReceivedSpan]) -> bool:
    """The client's trace holds the platform's request span and vLLM's."""
    names = {s.name for s in spans if s.trace_id == CLIENT_TRACE}
    return {"llm_request", "POST /v1/chat/completions", "router.stream"} <= names


def _tree(spans: list[ReceivedSpan]) -> list[str]:
    """The trace as indented lines: name, service, start offset and duration."""
    t0 = min(s.start_ns for s in spans)
    ids = {s.span_id for s in spans}
    children: dict[str, list[ReceivedSpan]] = {}
    for span in spans:
        children.setdefault(span.parent_span_id if span.parent_span_id in ids else "", []).append(span)
    lines: list[str] = []

    def walk(parent: str, depth: int) -> None:
        for span in sorted(children.get(parent, []), key=lambda s: s.start_ns):
            offset = (span.start_ns - t0) / 1e6
            lines.append(
                f"{'  ' * depth}{span.name} [{span.service}, {span.kind}] +{offset:.1f} ms, {span.duration_ms:.1f} ms"
            )
            latencies = {k.rsplit(".", 1)[1]: round(v, 4) for k, v in span.attributes.items() if ".latency." in k}
            if latencies:
                lines.append(f"{'  ' * (depth + 1)}vLLM latencies (s): {latencies}")
            for name, at, attributes in span.events:
                lines.append(f"{'  ' * (depth + 1)}event {name} +{(at - t0) / 1e6:.1f} ms {attributes}")
            walk(span.span_id, depth + 1)

    walk("", 0)
    return lines


def test_one_trace_holds_the_router_spans_and_vllm_spans(
    traced_model: str, receiver: OtlpReceiver, latency: LatencyLog, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    headers = {"Authorization": f"Bearer {MASTER_KEY}", "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}
    body = {
        "model": traced_model,
        "messages": [{"role": "user", "content": "In one word, can you provide me the capital of France?"}],
        "temperature": 0,
        "max_tokens": 16,
        "stream": True,
    }
    with PlatformProcess(master_key=MASTER_KEY, env=env) as platform:
        with latency.measure("tracing: streamed chat, traced end to end") as timing:
            with httpx.stream(
                "POST", f"{platform.url}/v1/chat/completions", json=body, headers=headers, timeout=120
            ) as response:
                assert response.status_code == 200
                text = ""
                for chunk in response.iter_text():
                    if chunk.strip():
                        timing.first_token()
                    text += chunk
        assert "[DONE]" in text
        spans = receiver.wait_for(_complete, timeout_s=30)
    trace = [s for s in spans if s.trace_id == CLIENT_TRACE]
    by_name = {s.name: s for s in trace}
    root = by_name["POST /v1/chat/completions"]
    attempt = next(s for s in trace if s.kind == "CLIENT" and s.service == "llm-platform")
    stream = by_name["router.stream"]
    engine = by_name["llm_request"]
    # one trace: client -> platform request -> attempt -> vLLM's request span (and the router's stream span)
    assert root.parent_span_id == CLIENT_SPAN
    assert attempt.parent_span_id == root.span_id
    assert engine.parent_span_id == attempt.span_id and engine.service == "vllm"
    assert stream.parent_span_id == attempt.span_id
    assert root.attributes["gen_ai.usage.output_tokens"] == engine.attributes["gen_ai.usage.completion_tokens"]
    assert root.attributes["gen_ai.usage.input_tokens"] == engine.attributes["gen_ai.usage.prompt_tokens"]
    assert root.attributes["router.pool"] == POOL
    # vLLM's request lies within the attempt (its clock is the same machine's)
    assert attempt.start_ns <= engine.start_ns and engine.end_ns <= attempt.end_ns + 50_000_000
    with capsys.disabled():
        print("\n[tracing e2e] one trace across the platform and vLLM:")
        for line in _tree(trace):
            print(f"  {line}")
