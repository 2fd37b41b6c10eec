"""Durability: a Celery worker killed (SIGKILL) mid-batch; the next worker resumes it, nothing doubled or lost."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import Any

import openai
import orjson
import pytest

from backends.mock_vllm import MockServer
from batches.models import Batch, BatchLine, LineState
from governance.models import UsageRecord
from governance.services import api_key_create
from tests.batches.conftest import Worker, chat_line, jsonl, wait_for
from tests.conftest import MASTER_KEY
from tests.live import PlatformProcess

pytestmark = pytest.mark.django_db(transaction=True)

LINES = 30
LEASE_S = 2.0


def test_killed_worker_is_resumed_with_each_line_run_exactly_once(
    mock_server: MockServer, chat_model: Any, batch_env: dict[str, str], start_worker: Callable[..., Worker]
) -> None:
    # given a slow backend (0.2 s a request) and a key's batch of 30 lines on a worker (2 at once, 2 s leases)
    mock_server.config.latency_s = 0.2
    knobs = {"BATCH_LINE_LEASE_S": str(LEASE_S), "BATCH_MAX_CONCURRENCY_PER_POOL": "2"}
    key, secret = api_key_create(name="team-kill")
    first = start_worker(**knobs)
    with PlatformProcess(master_key=MASTER_KEY, env=batch_env) as platform:
        client = openai.OpenAI(base_url=f"{platform.url}/v1", api_key=secret, max_retries=0)
        uploaded = client.files.create(
            file=("many.jsonl", io.BytesIO(jsonl([chat_line(f"line-{i:02d}") for i in range(LINES)]))),
            purpose="batch",
        )
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )

        # when the worker is killed outright while lines are in flight at the backend, a third of the way in
        def in_flight_after_some() -> bool:
            done = BatchLine.objects.filter(batch_id=batch.id, state=LineState.DONE).count()
            return done >= LINES // 3 and mock_server.stats.open_requests >= 1

        wait_for(in_flight_after_some, timeout_s=60, what="a third of the lines done, one in flight")
        first.kill()
        done_at_kill = BatchLine.objects.filter(batch_id=batch.id, state=LineState.DONE).count()
        assert done_at_kill < LINES
        # and a new worker starts once the dead one's leases ran out (beat's periodic resume does the same)
        time.sleep(LEASE_S + 0.5)
        start_worker(**knobs)
        finished = wait_for(
            lambda: Batch.objects.filter(pk=batch.id, status="completed").first(), timeout_s=90, what="completed"
        )

        # then the output has each line exactly once, all answered
        assert (finished.completed, finished.failed, finished.total) == (LINES, 0, LINES)
        output = [orjson.loads(line) for line in client.files.content(finished.output_file_id).content.splitlines()]
        custom_ids = [item["custom_id"] for item in output]
        assert sorted(custom_ids) == [f"line-{i:02d}" for i in range(LINES)]  # each exactly once
        assert all(item["response"]["status_code"] == 200 for item in output)
        # and only the lines the dead worker held unfinished ran again: the backend got each other line once, and
        # each of those at most twice (the first request cut by the kill, or answered just before the kill landed
        # and never recorded: the backend did that work twice, the output and the charge have it once)
        rerun = BatchLine.objects.filter(batch_id=batch.id, attempts__gt=1)
        assert 1 <= rerun.count() <= 4  # at most 2 x BATCH_MAX_CONCURRENCY_PER_POOL claimed at once
        stats = mock_server.stats
        assert stats.open_requests == 0 and stats.failed_requests == 0
        assert stats.completed_requests + stats.cancelled_requests == stats.total_requests
        assert LINES < stats.total_requests <= LINES + rerun.count()  # one was in flight at the kill
        assert LINES <= stats.completed_requests <= LINES + rerun.count()

        # and the key was charged exactly once per line, nothing lost and nothing doubled: one usage record for
        # each output line (the same request id), with the tokens the output reports, and the batch's sum
        records = UsageRecord.objects.filter(key_id=key.pk)
        assert sorted(records.values_list("request_id", flat=True)) == sorted(
            item["response"]["request_id"] for item in output
        )
        by_request = {r.request_id: r for r in records}
        for item in output:
            usage, record = item["response"]["body"]["usage"], by_request[item["response"]["request_id"]]
            assert (record.prompt_tokens, record.completion_tokens) == (
                usage["prompt_tokens"],
                usage["completion_tokens"],
            )
        seen = client.batches.retrieve(batch.id).usage
        assert seen is not None
        assert (seen.input_tokens, seen.output_tokens) == (
            sum(r.prompt_tokens for r in records),
            sum(r.completion_tokens for r in records),
        )
        assert seen.output_tokens == sum(item["response"]["body"]["usage"]["completion_tokens"] for item in output)
