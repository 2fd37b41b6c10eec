"""Admin: run report page with colours and causes, charts on backend/model pages, Markdown download, run now."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from backends.checks.charts import latency_svg, pass_rate_svg, trend_charts_html
from backends.checks.models import CheckCase, CheckRun, RunTrigger
from backends.checks.selectors import TrendPoint, check_trend_for_backend, check_trend_for_model
from backends.checks.services import check_run_now
from tests.backends.checks.conftest import Fleet

pytestmark = pytest.mark.django_db


@pytest.fixture
def failed_run(fleet: Fleet, only_cases: Callable[..., CheckCase]) -> CheckRun:
    """A stored run: `good` passes both cases, `oom` fails with out of memory, `slowpoke` is slow."""
    only_cases(name="capital")
    only_cases(name="capital-stream", stream=True)
    fleet.add("good")
    fleet.add("oom", error_message_override="CUDA out of memory. Tried to allocate 2.00 GiB")
    # a wide margin: `good` must answer "quick" within the threshold even on a loaded CI machine
    only_cases(name="quick", slow_threshold_s=0.4)
    fleet.add("slowpoke", latency_s=0.41)
    return check_run_now(trigger=RunTrigger.ADMIN, triggered_by="admin")


def test_run_page_shows_the_backend_by_case_table_with_colours_and_causes(
    admin_client: Client, failed_run: CheckRun
) -> None:
    page = admin_client.get(reverse("admin:backends_checkrun_change", args=[failed_run.pk]))
    assert page.status_code == 200
    html = page.content.decode()
    for name in ("good", "oom", "slowpoke", "capital", "capital-stream", "quick", "chat-model"):
        assert f">{name}<" in html, name
    assert "FAIL · out of memory" in html and "FAIL · slow" in html and "PASS" in html
    assert "#cf222e" in html and "#1a7f37" in html and "#b35900" in html  # red, green, orange
    assert "HTTP 500 from chat completion: CUDA out of memory" in html  # why it failed
    assert "<svg" in html and "Latency of each check" in html  # the run's latency chart
    assert f"Check run #{failed_run.pk}: FAILED (5/9 passed, 4 failed)" in html
    assert 'http-equiv="refresh"' not in html  # finished runs do not refresh
    assert reverse("admin:backends_checkrun_markdown", args=[failed_run.pk]) in html


def test_queued_run_page_refreshes_itself(admin_client: Client) -> None:
    run = CheckRun.objects.create(trigger=RunTrigger.API)
    html = admin_client.get(reverse("admin:backends_checkrun_change", args=[run.pk])).content.decode()
    assert 'http-equiv="refresh"' in html and "No results yet." in html


def test_changelists_render_with_run_now_button(admin_client: Client, failed_run: CheckRun) -> None:
    runs = admin_client.get(reverse("admin:backends_checkrun_changelist")).content.decode()
    assert "Run checks now" in runs and reverse("admin:backends_checkrun_run_now") in runs
    assert "5/9" in runs and "report.md" in runs
    results = admin_client.get(reverse("admin:backends_checkresult_changelist") + "?cause=out_of_memory")
    assert results.status_code == 200 and results.content.decode().count("FAIL · out of memory") == 3
    for name in ("admin:backends_checkcase_changelist", "admin:backends_checkcase_add"):
        assert admin_client.get(reverse(name)).status_code == 200


def test_markdown_download(admin_client: Client, failed_run: CheckRun) -> None:
    response = admin_client.get(reverse("admin:backends_checkrun_markdown", args=[failed_run.pk]))
    assert response.status_code == 200 and response["Content-Type"].startswith("text/markdown")
    assert f'filename="check-run-{failed_run.pk}.md"' in response["Content-Disposition"]
    text = response.content.decode()
    assert text.startswith(f"# Check run #{failed_run.pk}: FAILED (5/9 passed, 4 failed)")
    assert "| oom | chat-model | capital | **FAIL** | out of memory |" in text


def test_run_checks_now_button_queues_a_run_that_the_worker_executes(
    admin_client: Client, fleet: Fleet, only_cases: Callable[..., CheckCase], django_capture_on_commit_callbacks: Any
) -> None:
    only_cases()
    fleet.add("b1")
    assert admin_client.get(reverse("admin:backends_checkrun_run_now")).status_code == 405
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(reverse("admin:backends_checkrun_run_now"))
    run = CheckRun.objects.get()
    assert response.status_code == 302 and response["Location"] == reverse(
        "admin:backends_checkrun_change", args=[run.pk]
    )
    # eager Celery in the tests; in `make run` the worker picks it up from the embedded broker
    assert (run.trigger, run.triggered_by, run.status, run.total) == ("admin", "admin", "passed", 1)


def test_run_checks_now_action_on_backends_and_models(
    admin_client: Client, fleet: Fleet, only_cases: Callable[..., CheckCase], django_capture_on_commit_callbacks: Any
) -> None:
    only_cases()
    b1, _ = fleet.add("b1"), fleet.add("b2")
    with django_capture_on_commit_callbacks(execute=True):
        page = admin_client.post(
            reverse("admin:backends_backend_changelist"),
            {"action": "run_checks_now", "_selected_action": [b1.pk]},
            follow=True,
        )
    run = CheckRun.objects.get()
    assert f'Check run <a href="{reverse("admin:backends_checkrun_change", args=[run.pk])}">#{run.pk}</a> queued' in (
        page.content.decode()
    )
    assert run.backend_names == ["b1"] and run.total == 1 and run.status == "passed"
    with django_capture_on_commit_callbacks(execute=True):
        admin_client.post(
            reverse("admin:backends_servedmodel_changelist"),
            {"action": "run_checks_now", "_selected_action": [fleet.model.pk]},
        )
    latest = CheckRun.objects.first()
    assert latest is not None and latest.model_names == ["chat-model"] and latest.total == 2


def test_backend_and_model_pages_show_trend_charts(
    admin_client: Client, fleet: Fleet, only_cases: Callable[..., CheckCase]
) -> None:
    only_cases()
    backend = fleet.add("b1")
    for answer in (None, "Lyon", None):
        fleet.mocks["b1"].config.answer_override = answer
        check_run_now(trigger=RunTrigger.COMMAND)
    points = check_trend_for_backend(backend=backend)
    assert [p.passed for p in points] == [1, 0, 1] and [p.total for p in points] == [1, 1, 1]
    assert check_trend_for_model(model=fleet.model) == points
    for url in (
        reverse("admin:backends_backend_change", args=[backend.pk]),
        reverse("admin:backends_servedmodel_change", args=[fleet.model.pk]),
    ):
        html = admin_client.get(url).content.decode()
        assert "Checks (last 30 runs)" in html
        assert html.count('role="img"') == 2 and "Pass rate per run" in html and "Latency per run (ms)" in html
        assert "1/1 passed (100%)" in html and "0/1 passed (0%)" in html
        assert "<script" not in html.split("Checks (last 30 runs)")[1].split("</fieldset>")[0]
    assert admin_client.get(reverse("admin:backends_backend_add")).status_code == 200
    assert admin_client.get(reverse("admin:backends_servedmodel_add")).status_code == 200


def test_charts_are_plain_svg_with_escaped_labels() -> None:
    points = [
        TrendPoint(
            run_id=i,
            label=f"#{i} <b>",
            total=4,
            passed=p,
            latency_p50_ms=100.0 * i,
            latency_max_ms=150.0 * i,
            ttft_p50_ms=None if i % 2 else 20.0,
        )
        for i, p in zip(range(1, 31), [4, 3, 1] * 10, strict=True)
    ]
    rate = pass_rate_svg(points)
    assert rate.count("<rect") == 30 and "#1a7f37" in rate and "#b35900" in rate and "#cf222e" in rate
    assert "&lt;b&gt;" in rate and "<b>" not in rate
    latency = latency_svg(points)
    assert latency.count("<polyline") == 3 and re.search(r">5000<", latency)  # the axis is rounded up to 5000
    assert "<script" not in rate + latency
    assert "No check run" in trend_charts_html([])


def test_case_admin_validates(admin_client: Client) -> None:
    data: dict[str, Any] = {
        "name": "bad case",
        "endpoint": "chat",
        "messages": '{"not": "a list"}',
        "query": "",
        "documents": "",  # a browser posts the empty textareas of the other endpoint's fields
        "temperature": "0",
        "expectation": "regex",
        "expected_text": "(unclosed",
        "extra_params": '{"model": "x"}',
        "latency_budget_s": "10",
        "slow_threshold_s": "5",
        "enabled": "on",
    }
    page = admin_client.post(reverse("admin:backends_checkcase_add"), data).content.decode()
    assert "Not a valid regular expression" in page and "A non-empty list" in page
    assert "Set model with the case&#x27;s own fields" in page and "Use letters, digits" in page
    data.update(
        name="good-case", messages='[{"role": "user", "content": "Hi"}]', expected_text="^Hi", extra_params="{}"
    )
    assert admin_client.post(reverse("admin:backends_checkcase_add"), data).status_code == 302
    assert CheckCase.objects.get(name="good-case").expectation == "regex"
    assert CheckCase.objects.get(name="good-case").documents == []
