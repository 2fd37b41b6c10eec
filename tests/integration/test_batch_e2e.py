"""The Batch API against the real vLLM: a 50-line batch through the official SDK, a live platform and a real Celery
worker, run to `completed` and checked line by line; the key is charged exactly the output's usage; cancel works."""

from __future__ import annotations

import io
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from tests import live
from tests.batches.conftest import Worker
from tests.conftest import MASTER_KEY
from tests.integration.conftest import E2ERegistry
from tests.live import PlatformProcess

pytestmark = pytest.mark.e2e

CAPITAL = "In one word, can you provide me the capital of France?"
SEED = 1234  # see test_openai_e2e.py: at temperature 0 the seed changes nothing, it is there for symmetry
LINES = 50
CAPITAL_EVERY = 5  # lines 0, 5, 10, ...: ten capital questions among other prompts
FINAL = {"completed", "failed", "expired", "cancelled"}
BATCH_TIMEOUT_S = 600.0


def _line(i: int, model: str) -> dict[str, Any]:
    """Request i of the batch: the capital question every CAPITAL_EVERY lines, small arithmetic otherwise."""
    if i % CAPITAL_EVERY == 0:
        content, max_tokens = CAPITAL, 50
    else:
        content, max_tokens = f"What is {i} plus {i}? Answer with the number only.", 12
    return {
        "custom_id": f"req-{i:02d}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": model,
            "messages": [{"role": "user", "content": content}],
            "temperature": 0,
            "seed": SEED,
            "max_tokens": max_tokens,
        },
    }


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


def _poll(client: openai.OpenAI, batch_id: str, *, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    batch = client.batches.retrieve(batch_id)
    while batch.status not in FINAL and time.monotonic() < deadline:
        time.sleep(0.5)
        batch = client.batches.retrieve(batch_id)
    assert batch.status in FINAL, f"batch {batch_id} still {batch.status} after {timeout_s:g} s: {batch}"
    return batch


@pytest.fixture(scope="module")
def batch_platform(
    e2e_registry: E2ERegistry, django_db_blocker: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[PlatformProcess, Worker, str]]:
    """A platform process and a real Celery worker sharing the batch files and a queue of their own, and a key."""
    from governance.services import api_key_create

    with django_db_blocker.unblock():
        _, secret = api_key_create(name=f"e2e-batch-{uuid.uuid4().hex[:6]}")
        env = {
            "DATABASE_URL": live.test_database_url(),
            "DJANGO_SETTINGS_MODULE": "llm_platform.settings",
            "LOG_LEVEL": "WARNING",
            "BATCH_FILES_DIR": str(Path(tmp_path_factory.mktemp("batch-files"))),
            "BATCH_CELERY_QUEUE": f"batches-e2e-{uuid.uuid4().hex[:10]}",
            "BATCH_MAX_CONCURRENCY_PER_POOL": "4",  # two CPU servers in the pool
            "ROUTER_REGISTRY_POLL_S": "0.2",
        }
    worker = Worker(env["BATCH_CELERY_QUEUE"], {**os.environ, **env}).start()
    try:
        with PlatformProcess(master_key=MASTER_KEY, env=env) as platform:
            yield platform, worker, secret
    finally:
        worker.stop()


def test_a_50_line_batch_runs_to_completed_with_each_line_checked(
    batch_platform: tuple[PlatformProcess, Worker, str],
    e2e_registry: E2ERegistry,
    registry_db: None,
) -> None:
    from governance.models import ApiKey, UsageRecord, key_hash

    platform, worker, secret = batch_platform
    client = openai.OpenAI(base_url=f"{platform.url}/v1", api_key=secret, max_retries=0, timeout=60.0)
    lines = [_line(i, e2e_registry.model) for i in range(LINES)]
    # given a 50-line input file uploaded with the SDK
    uploaded = client.files.create(file=("e2e-batch.jsonl", io.BytesIO(_jsonl(lines))), purpose="batch")
    assert (uploaded.purpose, uploaded.filename, uploaded.bytes) == ("batch", "e2e-batch.jsonl", len(_jsonl(lines)))
    # when a batch is created and the worker runs it
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"suite": "e2e"},
    )
    assert batch.status == "in_progress" and batch.request_counts is not None
    assert batch.request_counts.total == LINES
    done = _poll(client, batch.id, timeout_s=BATCH_TIMEOUT_S)
    assert worker.proc is not None and worker.proc.poll() is None, "the worker died"

    # then it completed, every line a 200 in the output file, none in an error file
    assert done.status == "completed", done
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (LINES, 0), done.request_counts
    assert done.error_file_id is None and done.output_file_id and done.metadata == {"suite": "e2e"}
    output = [orjson.loads(raw) for raw in client.files.content(done.output_file_id).content.splitlines()]
    assert [item["custom_id"] for item in output] == [line["custom_id"] for line in lines]  # input order, each once
    capital_answers = []
    for line, item in zip(lines, output, strict=True):
        response = item["response"]
        assert item["error"] is None and response["status_code"] == 200, item
        body = response["body"]
        assert body["object"] == "chat.completion" and body["model"] == e2e_registry.model, body
        content = body["choices"][0]["message"]["content"]
        assert isinstance(content, str) and content.strip(), item
        usage = body["usage"]
        assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
        assert usage["completion_tokens"] <= line["body"]["max_tokens"]
        if line["body"]["messages"][0]["content"] == CAPITAL:
            capital_answers.append(content)
    assert len(capital_answers) == LINES // CAPITAL_EVERY
    assert all("paris" in answer.lower() for answer in capital_answers), capital_answers

    # and the key was charged exactly the output's usage: one usage record per line, with its tokens
    key = ApiKey.objects.get(key_hash=key_hash(secret))
    records = {r.request_id: r for r in UsageRecord.objects.filter(key=key)}
    assert sorted(records) == sorted(item["response"]["request_id"] for item in output)
    prompt = sum(item["response"]["body"]["usage"]["prompt_tokens"] for item in output)
    completion = sum(item["response"]["body"]["usage"]["completion_tokens"] for item in output)
    assert (sum(r.prompt_tokens for r in records.values()), sum(r.completion_tokens for r in records.values())) == (
        prompt,
        completion,
    )
    assert {r.status for r in records.values()} == {200}
    assert done.usage is not None and (done.usage.input_tokens, done.usage.output_tokens) == (prompt, completion)
    # and the SDK lists it, newest first
    assert client.batches.list(limit=5).data[0].id == batch.id


def test_a_cancelled_batch_stops_and_keeps_what_finished(
    batch_platform: tuple[PlatformProcess, Worker, str], e2e_registry: E2ERegistry
) -> None:
    platform, _, secret = batch_platform
    client = openai.OpenAI(base_url=f"{platform.url}/v1", api_key=secret, max_retries=0, timeout=60.0)
    lines = [_line(i, e2e_registry.model) for i in range(1, 40) if i % CAPITAL_EVERY]  # arithmetic only
    uploaded = client.files.create(file=("cancel.jsonl", io.BytesIO(_jsonl(lines))), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    # when it is cancelled right away
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in {"cancelling", "cancelled"}
    # then it ends cancelled within seconds, with what finished (if anything) in its output, nothing doubled
    done = _poll(client, batch.id, timeout_s=60)
    assert done.status == "cancelled", done
    assert done.request_counts is not None and done.request_counts.completed < len(lines)
    if done.output_file_id:
        ids = [orjson.loads(raw)["custom_id"] for raw in client.files.content(done.output_file_id).content.splitlines()]
        assert len(ids) == len(set(ids)) == done.request_counts.completed
