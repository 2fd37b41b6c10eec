"""POST/GET /api/check-runs/ (master key or staff) and `manage.py run_checks` (report, exit status)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.test import Client
from rest_framework.test import APIClient

from backends.checks.models import CheckCase, CheckRun
from tests import live
from tests.backends.checks.conftest import Fleet
from tests.conftest import MASTER_KEY

pytestmark = pytest.mark.django_db


@pytest.fixture
def api() -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {MASTER_KEY}")
    return client


def test_post_starts_a_run_and_get_returns_its_results(
    api: APIClient, fleet: Fleet, only_cases: Callable[..., CheckCase], django_capture_on_commit_callbacks: Any
) -> None:
    only_cases(name="capital")
    fleet.add("b1")
    fleet.add("b2", answer_override="Lyon")
    with django_capture_on_commit_callbacks(execute=True):
        response = api.post("/api/check-runs/", {"backend": "b2"}, format="json")
    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "queued" and body["trigger"] == "api" and body["triggered_by"] == "master key"
    assert body["backend_names"] == ["b2"] and response["Location"].endswith(f"/api/check-runs/{body['id']}/")
    detail = api.get(f"/api/check-runs/{body['id']}/").json()
    assert (detail["status"], detail["total"], detail["passed"], detail["failed"]) == ("failed", 1, 0, 1)
    [result] = detail["results"]
    assert result["backend"] == "b2" and result["model"] == "chat-model" and result["case"] == "capital"
    assert (result["outcome"], result["cause"], result["answer"]) == ("fail", "wrong_answer", "Lyon")
    assert result["latency_ms"] is not None and result["http_status"] == 200
    listing = api.get("/api/check-runs/").json()
    assert [r["id"] for r in listing] == [body["id"]] and "results" not in listing[0]
    report = api.get(f"/api/check-runs/{body['id']}/report/")
    assert report.status_code == 200 and report.content.decode().startswith(f"# Check run #{body['id']}: FAILED")


def test_post_validates_names_and_needs_a_key_or_staff(
    api: APIClient, admin_client: Client, fleet: Fleet, django_capture_on_commit_callbacks: Any
) -> None:
    fleet.add("b1")
    bad = api.post("/api/check-runs/", {"model": ["chat-model", "nope"]}, format="json")
    assert bad.status_code == 400 and "unknown model(s): nope" in bad.content.decode()
    assert not CheckRun.objects.exists()
    anonymous = APIClient().post("/api/check-runs/", {}, format="json")
    assert anonymous.status_code == 401
    wrong = APIClient()
    wrong.credentials(HTTP_AUTHORIZATION="Bearer nope")
    assert wrong.get("/api/check-runs/").status_code == 401
    with django_capture_on_commit_callbacks(execute=True):
        staff = admin_client.post("/api/check-runs/", {"model": "chat-model"}, content_type="application/json")
    assert staff.status_code == 202 and staff.json()["triggered_by"] == "admin"
    assert CheckRun.objects.get().status == "passed"


def test_command_prints_the_report_and_exits_zero_when_all_pass(fleet: Fleet) -> None:
    fleet.add("b1")
    out = io.StringIO()
    call_command("run_checks", stdout=out)
    text = out.getvalue()
    assert text.splitlines()[0].split() == [
        "BACKEND", "MODEL", "CASE", "RESULT", "CAUSE", "LATENCY", "TTFT", "TOKENS", "ANSWER", "/", "ERROR"
    ]  # fmt: skip
    assert "capital-of-france-stream" in text and "finish-reason-length" in text and "prompt-token-count" in text
    assert text.rstrip().endswith("PASSED (5/5 passed, 0 failed)")
    run = CheckRun.objects.get()
    assert run.trigger == "command"


def test_command_fails_on_any_failed_check_and_on_bad_names(fleet: Fleet, only_cases: Callable[..., CheckCase]) -> None:
    only_cases()
    fleet.add("b1")
    fleet.add_dead("dead")
    out = io.StringIO()
    with pytest.raises(CommandError) as failed:
        call_command("run_checks", "--markdown", stdout=out)
    assert failed.value.returncode == 1 and "1 of 2 checks failed" in str(failed.value)
    assert "| dead | chat-model | case-" in out.getvalue() and "unreachable" in out.getvalue()
    call_command("run_checks", "--backend", "b1", stdout=io.StringIO())  # gating on one backend passes
    with pytest.raises(CommandError, match="unknown backend"):
        call_command("run_checks", "--backend", "nope", stdout=io.StringIO())
    CheckCase.objects.update(enabled=False)
    with pytest.raises(CommandError) as nothing:
        call_command("run_checks", stdout=io.StringIO())
    assert nothing.value.returncode == 2 and "Nothing to check" in str(nothing.value)


@pytest.mark.django_db(transaction=True)
def test_command_exit_status_in_a_shell(fleet: Fleet, only_cases: Callable[..., CheckCase]) -> None:
    only_cases()
    fleet.add("b1", answer_override="Lyon")
    env = {**os.environ, "DATABASE_URL": live.test_database_url(), "LOG_LEVEL": "WARNING"}
    done = subprocess.run(
        [sys.executable, "manage.py", "run_checks"], cwd=live.ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1, done.stderr
    assert "wrong answer" in done.stdout and "1 of 1 checks failed" in done.stderr
