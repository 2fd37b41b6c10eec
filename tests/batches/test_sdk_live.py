"""The official openai SDK against a live platform process and a real Celery worker: the Batch API round trip."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import Any

import openai
import orjson
import pytest

from backends.mock_vllm import MockServer
from governance.services import api_key_create
from tests.batches.conftest import Worker, chat_line, jsonl
from tests.conftest import MASTER_KEY
from tests.live import PlatformProcess

pytestmark = pytest.mark.django_db(transaction=True)


def _poll(client: openai.OpenAI, batch_id: str, *, until: set[str], timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in until:
            return batch
        time.sleep(0.2)
    raise AssertionError(f"batch {batch_id} still {batch.status} after {timeout_s} s")


def test_sdk_round_trip_files_batches_output(
    mock_server: MockServer, chat_model: Any, batch_env: dict[str, str], start_worker: Callable[..., Worker]
) -> None:
    # given a platform process, a worker, a client key and a batch file of three requests
    _, secret = api_key_create(name="team-batch")
    start_worker()
    with PlatformProcess(master_key=MASTER_KEY, env=batch_env) as platform:
        client = openai.OpenAI(base_url=f"{platform.url}/v1", api_key=secret, max_retries=0)
        content = jsonl([chat_line("capital"), chat_line("story", "Tell me a story"), chat_line("again")])
        # when the SDK uploads it, creates a batch and polls it
        uploaded = client.files.create(file=("requests.jsonl", io.BytesIO(content)), purpose="batch")
        assert (uploaded.purpose, uploaded.bytes, uploaded.filename) == ("batch", len(content), "requests.jsonl")
        batch = client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"job": "nightly"},
        )
        assert batch.status == "in_progress" and batch.request_counts is not None
        assert batch.request_counts.total == 3
        done = _poll(client, batch.id, until={"completed", "failed", "expired", "cancelled"})
        # then it completed with every line in the output file, in the OpenAI result shape
        assert done.status == "completed", done
        assert (done.request_counts.completed, done.request_counts.failed) == (3, 0)
        assert done.metadata == {"job": "nightly"} and done.error_file_id is None
        assert done.completed_at is not None and done.in_progress_at is not None
        results = [orjson.loads(line) for line in client.files.content(done.output_file_id).content.splitlines()]
        by_id = {r["custom_id"]: r for r in results}
        assert sorted(by_id) == ["again", "capital", "story"]
        capital = by_id["capital"]["response"]
        assert capital["status_code"] == 200
        assert capital["body"]["choices"][0]["message"]["content"] == "Paris"
        assert capital["body"]["model"] == "chat-model"
        assert mock_server.stats.completed_requests == 3
        # and the key lists and retrieves its files and batches
        assert batch.id in [b.id for b in client.batches.list()]
        assert {uploaded.id, done.output_file_id} <= {f.id for f in client.files.list()}
        assert client.files.retrieve(uploaded.id).id == uploaded.id
        # and another key sees none of them (404 as if they did not exist)
        _, other_secret = api_key_create(name="someone-else")
        time.sleep(0.5)  # the platform reads keys on each call; nothing cached to wait for, kept for clarity
        other = openai.OpenAI(base_url=f"{platform.url}/v1", api_key=other_secret, max_retries=0)
        with pytest.raises(openai.NotFoundError):
            other.files.content(done.output_file_id)
        with pytest.raises(openai.NotFoundError):
            other.batches.retrieve(batch.id)
        with pytest.raises(openai.NotFoundError):
            other.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert other.batches.list().data == []
        # and a finished batch cannot be cancelled; a bad file names its line
        with pytest.raises(openai.ConflictError):
            client.batches.cancel(batch.id)
        with pytest.raises(openai.BadRequestError) as bad:
            client.files.create(file=("bad.jsonl", io.BytesIO(b'{"custom_id": "a"}\n{nope\n')), purpose="batch")
        assert "Line 1" in bad.value.message
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{platform.url}/v1", api_key="wrong", max_retries=0).files.list()


def test_sdk_cancel_stops_new_lines_within_seconds(
    mock_server: MockServer, chat_model: Any, batch_env: dict[str, str], start_worker: Callable[..., Worker]
) -> None:
    # given a slow backend and a batch of 40 requests running on a worker
    mock_server.config.latency_s = 0.3
    start_worker()
    with PlatformProcess(master_key=MASTER_KEY, env=batch_env) as platform:
        client = openai.OpenAI(base_url=f"{platform.url}/v1", api_key=MASTER_KEY, max_retries=0)
        content = jsonl([chat_line(f"line-{i}") for i in range(40)])
        uploaded = client.files.create(file=("slow.jsonl", io.BytesIO(content)), purpose="batch")
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        deadline = time.monotonic() + 30
        while mock_server.stats.completed_requests < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        # when it is cancelled
        cancelling = client.batches.cancel(batch.id)
        assert cancelling.status in {"cancelling", "cancelled"}
        cancelled_at = time.monotonic()
        done = _poll(client, batch.id, until={"cancelled", "completed", "failed"}, timeout_s=10)
        # then it ends cancelled within seconds, with the lines that finished in its output and no new line started
        assert done.status == "cancelled"
        assert time.monotonic() - cancelled_at < 5
        sent = mock_server.stats.total_requests
        time.sleep(1.0)
        assert mock_server.stats.total_requests == sent
        assert sent < 40
        finished = done.request_counts.completed
        if finished:
            lines = client.files.content(done.output_file_id).content.splitlines()
            assert len(lines) == finished
