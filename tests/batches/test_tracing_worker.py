"""A batch run by a real Celery worker with tracing on: the task's span, a span per line, the attempts beneath."""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest

from backends.mock_vllm import MockServer
from batches.tasks import RUN_TASK_NAME
from governance.services import api_key_create
from tests.batches.conftest import Worker, chat_line, jsonl
from tests.conftest import MASTER_KEY
from tests.live import PlatformProcess
from tests.otlp import OtlpReceiver

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as otlp:
        yield otlp


def test_a_batch_task_and_its_lines_are_traced_by_the_worker(
    mock_server: MockServer,
    chat_model: Any,
    batch_env: dict[str, str],
    start_worker: Callable[..., Worker],
    receiver: OtlpReceiver,
) -> None:
    # given a worker whose environment turns tracing on (the platform's web process does not trace here)
    _, secret = api_key_create(name="team-batch")
    start_worker(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=receiver.endpoint, OTEL_BSP_SCHEDULE_DELAY="100")
    with PlatformProcess(master_key=MASTER_KEY, env=batch_env) as platform:
        client = openai.OpenAI(base_url=f"{platform.url}/v1", api_key=secret, max_retries=0)
        uploaded = client.files.create(
            file=("requests.jsonl", io.BytesIO(jsonl([chat_line("one"), chat_line("two")]))), purpose="batch"
        )
        # when a batch of two lines runs
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        deadline = time.monotonic() + 60
        while client.batches.retrieve(batch.id).status != "completed":
            assert time.monotonic() < deadline, "the batch did not complete in 60 s"
            time.sleep(0.2)
    # then the worker exported the task's span with one span per line beneath it, each with its attempt
    spans = receiver.wait_for(lambda got: len([s for s in got if s.name == "batch chat.completions"]) == 2)
    task = next(s for s in spans if s.name == f"run/{RUN_TASK_NAME}")
    assert task.service == "llm-platform-worker" and task.kind == "CONSUMER"
    lines = [s for s in spans if s.name == "batch chat.completions"]
    assert {s.parent_span_id for s in lines} == {task.span_id}
    assert {s.trace_id for s in lines} == {task.trace_id}
    assert all(s.attributes["router.key_name"] == "team-batch" for s in lines)
    attempts = [s for s in spans if s.name == "chat served-chat"]
    assert sorted(s.parent_span_id for s in attempts) == sorted(s.span_id for s in lines)
    assert mock_server.stats.last_headers["traceparent"].split("-")[1] == task.trace_id
