"""Runs: what they check, how they run (parallel, bounded per backend), what they store, and routing effects."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, MutableMapping
from typing import Any
from unittest import mock

import httpx
import pytest

from backends.checks.models import CheckCase, CheckRun, RunStatus, RunTrigger
from backends.checks.runner import BackendTarget, CaseSpec, CheckTarget, run_checks
from backends.checks.selectors import CheckFilterError, check_targets_build
from backends.checks.services import check_backends_update, check_run_create, check_run_execute, check_run_now
from backends.mock_vllm import MockVLLM
from backends.models import Backend
from backends.selectors import registry_version_get
from tests.backends.checks.conftest import Fleet
from tests.factories import backend_create, model_create, pool_create

pytestmark = pytest.mark.django_db


def test_seeded_cases_exist_after_migrate() -> None:
    cases = {c.name: c for c in CheckCase.objects.all()}
    capital = cases["capital-of-france"]
    assert capital.messages == [{"role": "user", "content": "In one word, can you provide me the capital of France?"}]
    assert (capital.temperature, capital.max_tokens, capital.stream) == (0.1, 50, False)
    assert (capital.expectation, capital.expected_text, capital.case_sensitive) == ("contains", "Paris", False)
    assert capital.slow_threshold_s == 30.0 and capital.enabled and not capital.models.exists()
    assert cases["capital-of-france-stream"].stream
    assert cases["prompt-token-count"].expectation == "token_count"
    length = cases["finish-reason-length"]
    assert length.expectation == "finish_length" and length.max_tokens == 5


def test_seeded_cases_pass_on_the_mock(fleet: Fleet) -> None:
    fleet.add("b1")
    run = check_run_now(trigger=RunTrigger.COMMAND)
    assert (run.status, run.total, run.passed, run.failed) == ("passed", 5, 5, 0)  # no pooling model: no rerank
    assert run.started_at and run.finished_at and run.duration_s is not None


def test_targets_cover_chat_models_on_usable_backends_of_their_pools(only_cases: Callable[..., CheckCase]) -> None:
    pool, fallback, other = pool_create(name="p-main"), pool_create(name="p-fallback"), pool_create(name="p-other")
    chat = model_create(pool=pool, name="chat", served_name="served")
    model_create(pool=pool, name="embed", kind="embedding")
    other_chat = model_create(pool=other, name="other-chat")
    chat.fallbacks.create(pool=fallback, position=0)
    backend_create(pool=pool, name="main-1")
    backend_create(pool=pool, name="main-off", state="disabled")
    backend_create(pool=pool, name="main-draining", state="draining")
    backend_create(pool=fallback, name="fallback-1")
    backend_create(pool=other, name="other-1")
    every = only_cases(name="every")
    only_cases(name="only-other", models=[other_chat])
    targets = {(t.backend.name, t.model_name, t.case.name) for t in check_targets_build()}
    assert targets == {
        ("main-1", "chat", "every"),
        ("main-draining", "chat", "every"),
        ("fallback-1", "chat", "every"),
        ("other-1", "other-chat", "every"),
        ("other-1", "other-chat", "only-other"),
    }
    filtered = check_targets_build(model_names=["chat"], backend_names=["main-1"])
    assert [(t.backend.name, t.served_name, t.case.id) for t in filtered] == [("main-1", "served", every.pk)]
    with pytest.raises(CheckFilterError, match="unknown model\\(s\\): nope; unknown backend\\(s\\): nada"):
        check_targets_build(model_names=["nope"], backend_names=["nada"])


def test_run_with_nothing_to_check_is_an_error(only_cases: Callable[..., CheckCase]) -> None:
    only_cases()
    run = check_run_now(trigger=RunTrigger.COMMAND)
    assert run.status == RunStatus.ERROR and run.total == 0 and "Nothing to check" in run.error


def test_a_run_is_executed_once(fleet: Fleet, only_cases: Callable[..., CheckCase]) -> None:
    only_cases()
    fleet.add("b1")
    run = check_run_create(trigger=RunTrigger.API)
    assert check_run_execute(run=run).status == RunStatus.PASSED
    again = check_run_execute(run=run)  # a redelivered task message
    assert again.status == RunStatus.PASSED and again.results.count() == 1


class _ConcurrencyProbe:
    """An ASGI wrapper counting requests in flight per host (to observe the runner's parallelism)."""

    def __init__(self, app: MockVLLM) -> None:
        self.app = app
        self.in_flight: dict[str, int] = {}
        self.max_in_flight: dict[str, int] = {}
        self.total = 0
        self.max_total = 0

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        host = dict(scope["headers"]).get(b"host", b"").decode()
        self.in_flight[host] = self.in_flight.get(host, 0) + 1
        self.total += 1
        self.max_in_flight[host] = max(self.max_in_flight.get(host, 0), self.in_flight[host])
        self.max_total = max(self.max_total, self.total)
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight[host] -= 1
            self.total -= 1


async def test_backends_run_in_parallel_with_at_most_two_checks_each() -> None:
    probe = _ConcurrencyProbe(MockVLLM(models=["served"], latency_s=0.05))
    case = CaseSpec(
        id=None, name="c", messages=[{"role": "user", "content": "capital of France?"}], expected_text="Paris"
    )
    targets = [
        CheckTarget(BackendTarget(id=i, name=f"b{i}", base_url=f"http://b{i}"), None, "m", "served", case)
        for i in (1, 2, 3)
        for _ in range(6)
    ]
    outcomes = await run_checks(targets, transport=httpx.ASGITransport(app=probe))
    assert [o.passed for o in outcomes] == [True] * 18
    assert [o.target for o in outcomes] == targets  # outcomes come back in the targets' order
    assert probe.max_in_flight == {"b1": 2, "b2": 2, "b3": 2}
    assert probe.max_total == 6  # the three backends were checked at the same time


async def test_the_runner_does_not_block_the_event_loop() -> None:
    probe = _ConcurrencyProbe(MockVLLM(models=["served"], latency_s=0.5))  # ~50 ticks if the loop is free
    case = CaseSpec(
        id=None, name="c", messages=[{"role": "user", "content": "capital of France?"}], expected_text="Paris"
    )
    target = CheckTarget(BackendTarget(id=1, name="b1", base_url="http://b1"), None, "m", "served", case)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.ensure_future(ticker())
    await run_checks([target], transport=httpx.ASGITransport(app=probe))
    task.cancel()
    assert ticks >= 10  # a runner that blocked the loop would leave 0-1


def test_failing_backend_is_degraded_with_the_reason_and_restored_when_it_passes(
    fleet: Fleet, only_cases: Callable[..., CheckCase]
) -> None:
    only_cases(name="capital")
    good = fleet.add("good")
    bad = fleet.add("bad", error_message_override="CUDA out of memory. Tried to allocate 1 GiB")
    Backend.objects.update(status="healthy")
    before = registry_version_get()
    run = check_run_now(trigger=RunTrigger.COMMAND)
    assert run.status == RunStatus.FAILED and (run.passed, run.failed) == (1, 1)
    bad.refresh_from_db()
    good.refresh_from_db()
    assert good.status == "healthy" and bad.status == "degraded"
    assert bad.last_error.startswith(f"Checks failed (run #{run.pk}")
    assert "capital on chat-model: out of memory" in bad.last_error and "CUDA out of memory" in bad.last_error
    assert registry_version_get() > before  # the router reloads within 2 s and prefers healthy backends
    # the backend recovers: the next full run lifts the degradation
    fleet.mocks["bad"].config.error_message_override = None
    check_run_now(trigger=RunTrigger.COMMAND)
    bad.refresh_from_db()
    assert (bad.status, bad.last_error) == ("healthy", "")


def test_unhealthy_backends_stay_unhealthy_and_partial_runs_do_not_restore(
    fleet: Fleet, only_cases: Callable[..., CheckCase]
) -> None:
    only_cases()
    sick = fleet.add("sick", answer_override="Lyon")
    Backend.objects.filter(pk=sick.pk).update(status="unhealthy", last_error="/health answered HTTP 503")
    check_run_now(trigger=RunTrigger.COMMAND)
    sick.refresh_from_db()
    assert (sick.status, sick.last_error) == ("unhealthy", "/health answered HTTP 503")
    # degraded by checks, then a run limited to one model passes: it cannot vouch for the others
    Backend.objects.filter(pk=sick.pk).update(status="degraded", last_error="Checks failed (run #1): ...")
    fleet.mocks["sick"].config.answer_override = None
    check_run_now(trigger=RunTrigger.COMMAND, model_names=["chat-model"])
    sick.refresh_from_db()
    assert sick.status == "degraded"
    # a degradation that checks did not write is not lifted by them either
    Backend.objects.filter(pk=sick.pk).update(status="degraded", last_error="set by an operator")
    run = check_run_now(trigger=RunTrigger.COMMAND)
    assert check_backends_update(run=run) == []
    sick.refresh_from_db()
    assert sick.status == "degraded"


def test_start_enqueues_on_commit_and_records_broker_failures(
    fleet: Fleet, only_cases: Callable[..., CheckCase], django_capture_on_commit_callbacks: Any
) -> None:
    from backends.checks.services import check_run_start

    only_cases()
    fleet.add("b1")
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        run = check_run_start(trigger=RunTrigger.API, triggered_by="t")
        assert CheckRun.objects.get(pk=run.pk).status == RunStatus.QUEUED  # nothing ran in this process yet
    assert len(callbacks) == 1
    assert CheckRun.objects.get(pk=run.pk).status == RunStatus.PASSED  # the (eager) worker ran it
    with (
        mock.patch("backends.checks.tasks.run_checks_task.delay", side_effect=ConnectionRefusedError("no broker")),
        django_capture_on_commit_callbacks(execute=True),
    ):
        failed = check_run_start(trigger=RunTrigger.API)
    failed.refresh_from_db()
    assert failed.status == RunStatus.ERROR and "Could not reach the Celery broker: no broker" in failed.error


def test_a_passing_probe_keeps_a_check_degradation(fleet: Fleet, only_cases: Callable[..., CheckCase]) -> None:
    from backends.services import backend_probe

    only_cases()
    backend = fleet.add("b1", answer_override="Lyon")  # /health is fine, the answers are wrong
    check_run_now(trigger=RunTrigger.COMMAND)
    backend.refresh_from_db()
    assert backend.status == "degraded"
    backend_probe(backend=backend)  # the periodic health check, every 30 s
    backend.refresh_from_db()
    assert backend.status == "degraded" and backend.last_error.startswith("Checks failed")
