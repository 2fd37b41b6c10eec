"""A real Celery worker (Redis broker, PostgreSQL database) runs check runs end to end.

Needs the services `.ci/run` provides; run with
`DATABASE_URL=postgres://postgres@127.0.0.1:5432/test REDIS_URL=redis://127.0.0.1:6379/0 pytest -m services`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest
from rest_framework.test import APIClient

from backends.checks.models import CheckRun, RunStatus
from backends.checks.tasks import run_checks_task
from llm_platform.celery import app as celery_app
from tests import live
from tests.backends.checks.conftest import Fleet
from tests.conftest import MASTER_KEY

_POSTGRES = os.environ.get("DATABASE_URL", "").startswith(("postgres://", "postgresql://"))
_REDIS = bool(os.environ.get("REDIS_URL"))

pytestmark = [
    pytest.mark.services,
    pytest.mark.skipif(
        not (_POSTGRES and _REDIS),
        reason="needs DATABASE_URL=postgres://... and REDIS_URL=redis://... (real PostgreSQL and Redis, as in .ci/run)",
    ),
    pytest.mark.django_db(transaction=True),
]


@pytest.fixture(autouse=True)
def celery_eager() -> Iterator[None]:
    """Not eager here: tasks go through Redis to the worker process."""
    saved = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = False
    yield
    celery_app.conf.task_always_eager = saved


@pytest.fixture
def worker_queue() -> Iterator[str]:
    """A Celery worker process on the test database, consuming a queue of its own (no other worker interferes)."""
    queue = f"checks-test-{uuid.uuid4().hex[:10]}"
    env = {
        **os.environ,
        "DATABASE_URL": live.test_database_url(),
        "DJANGO_SETTINGS_MODULE": "llm_platform.settings",
        "LOG_LEVEL": "WARNING",
    }
    argv = [
        sys.executable, "-m", "celery", "-A", "llm_platform", "worker", "--queues", queue, "--pool", "solo",
        "--hostname", f"{queue}@%h", "--without-gossip", "--without-mingle", "--without-heartbeat",
        "--loglevel", "warning",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=live.ROOT, env=env)
    try:
        yield queue
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_finished(run_id: int | None = None, *, timeout_s: float = 60.0, **filters: Any) -> CheckRun:
    """Poll the database until the run (or the first run matching filters) reaches a final status."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = CheckRun.objects.filter(pk=run_id).first() if run_id else CheckRun.objects.filter(**filters).first()
        if run is not None and run.is_finished:
            return run
        time.sleep(0.1)
    raise AssertionError(f"no finished check run within {timeout_s} s: {list(CheckRun.objects.values())}")


def test_worker_runs_checks_started_through_the_api_and_by_beat(fleet: Fleet, worker_queue: str) -> None:
    fleet.add("good")
    fleet.add("oom", error_message_override="CUDA out of memory. Tried to allocate 1.00 GiB")

    def delay_on_test_queue(*args: Any) -> Any:
        return run_checks_task.apply_async(args, queue=worker_queue)

    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {MASTER_KEY}")
    with mock.patch.object(run_checks_task, "delay", side_effect=delay_on_test_queue):
        response = api.post("/api/check-runs/", {}, format="json")
    assert response.status_code == 202 and response.json()["status"] == "queued"
    run = _wait_finished(response.json()["id"])
    assert run.status == RunStatus.FAILED, run.error
    assert (run.total, run.passed, run.failed) == (10, 5, 5)
    causes = {(r.backend_name, r.case_name): (r.outcome, r.cause) for r in run.results.all()}
    assert causes[("good", "capital-of-france-stream")] == ("pass", "")
    assert causes[("oom", "capital-of-france")] == ("fail", "out_of_memory")
    assert api.get(f"/api/check-runs/{run.pk}/").json()["results"][0]["backend"] == "good"
    assert fleet.pool.backends.get(name="oom").status == "degraded"
    # what beat sends at 00:00 UTC: the task name with no arguments; the worker creates and runs a scheduled run
    run_checks_task.apply_async((), queue=worker_queue)
    scheduled = _wait_finished(trigger="schedule")
    assert (scheduled.triggered_by, scheduled.total) == ("celery beat", 10)
