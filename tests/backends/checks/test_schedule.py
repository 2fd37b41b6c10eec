"""The nightly schedule: created by the migration, editable in admin, and a beat tick enqueues a run."""

from __future__ import annotations

import datetime
from typing import Any
from unittest import mock

import pytest
from django.test import Client
from django.urls import reverse
from django_celery_beat.models import CrontabSchedule, PeriodicTask
from django_celery_beat.schedulers import DatabaseScheduler

from backends.checks.models import CheckRun
from backends.checks.tasks import TASK_NAME, run_checks_task
from llm_platform.celery import app as celery_app
from tests.backends.checks.conftest import Fleet

pytestmark = pytest.mark.django_db

NIGHTLY = "Nightly end-to-end checks"


def test_nightly_schedule_exists_after_migrate() -> None:
    task = PeriodicTask.objects.select_related("crontab").get(name=NIGHTLY)
    assert task.task == TASK_NAME == "backends.run_checks" and task.enabled
    assert task.interval is None and task.args == "[]" and task.kwargs == "{}"
    cron = task.crontab
    assert (cron.minute, cron.hour, cron.day_of_week, cron.day_of_month, cron.month_of_year) == (
        "0",
        "0",
        "*",
        "*",
        "*",
    )
    assert str(cron.timezone) == "UTC"
    assert TASK_NAME in celery_app.tasks  # registered through backends.tasks (autodiscovery)


def test_schedule_is_editable_in_admin(admin_client: Client) -> None:
    task = PeriodicTask.objects.get(name=NIGHTLY)
    page = admin_client.get(reverse("admin:django_celery_beat_periodictask_change", args=[task.pk]))
    assert page.status_code == 200 and b"backends.run_checks" in page.content
    url = reverse("admin:django_celery_beat_crontabschedule_change", args=[task.crontab_id])
    form = {
        "minute": "30",
        "hour": "2",
        "day_of_month": "*",
        "month_of_year": "*",
        "day_of_week": "1-5",
        "timezone": "UTC",
        # the page lists the schedule's periodic tasks inline; posting no inline form leaves them as they are
        "periodictask_set-TOTAL_FORMS": "0",
        "periodictask_set-INITIAL_FORMS": "0",
    }
    response = admin_client.post(url, form)
    assert response.status_code == 302, [line for line in response.content.decode().splitlines() if "error" in line]
    cron = CrontabSchedule.objects.get(pk=task.crontab_id)
    assert (cron.minute, cron.hour, cron.day_of_week) == ("30", "2", "1-5")
    changelist = reverse("admin:django_celery_beat_periodictask_changelist")
    admin_client.post(changelist, {"action": "disable_tasks", "_selected_action": [task.pk]})
    assert not PeriodicTask.objects.get(pk=task.pk).enabled


def _due_scheduler() -> DatabaseScheduler:
    """A beat scheduler whose only enabled entry is the nightly run, last run two days ago (so it is due)."""
    PeriodicTask.objects.exclude(name=NIGHTLY).update(enabled=False)
    PeriodicTask.objects.filter(name=NIGHTLY).update(
        last_run_at=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=2)
    )
    return DatabaseScheduler(app=celery_app)


@pytest.fixture
def just_after_midnight() -> Any:
    """Beat only loads crontab entries within two hours of the current hour: let it be 00:00:30 UTC.

    Beat also closes "old" database connections between ticks, which would close the test's transaction.
    """
    midnight = datetime.datetime.now(datetime.UTC).replace(hour=0, minute=0, second=30, microsecond=0)
    with (
        mock.patch("django_celery_beat.schedulers.aware_now", return_value=midnight),
        mock.patch("django_celery_beat.schedulers.close_old_connections"),
    ):
        yield


def test_beat_tick_sends_the_nightly_task(just_after_midnight: None) -> None:
    scheduler = _due_scheduler()
    assert NIGHTLY in scheduler.schedule
    with (
        mock.patch.object(type(scheduler), "producer", new=mock.PropertyMock(return_value=None)),
        mock.patch.object(run_checks_task, "apply_async") as apply_async,
    ):
        for _ in range(3):
            scheduler.tick()
            if apply_async.called:
                break
    apply_async.assert_called_once()
    args, kwargs = apply_async.call_args
    # beat sends backends.run_checks with no arguments: the task creates a run with trigger "schedule"
    assert args == ([], {})
    assert kwargs["headers"]["periodic_task_name"] == NIGHTLY
    scheduler.sync()
    task = PeriodicTask.objects.get(name=NIGHTLY)
    assert task.total_run_count == 1 and task.last_run_at.date() == datetime.datetime.now(datetime.UTC).date()


def test_beat_tick_runs_the_checks_in_the_worker(just_after_midnight: None, fleet: Fleet) -> None:
    fleet.add("b1")
    scheduler = _due_scheduler()
    with mock.patch.object(type(scheduler), "producer", new=mock.PropertyMock(return_value=None)):
        for _ in range(3):
            scheduler.tick()  # eager: the task runs inline, as the worker would run it
            if CheckRun.objects.exists():
                break
    run = CheckRun.objects.get()
    assert (run.trigger, run.triggered_by, run.status) == ("schedule", "celery beat", "passed")
    assert run.total == 5
