"""The Markdown summary and the Slack-compatible webhook (posted to a local HTTP server that captures it)."""

from __future__ import annotations

import json
from collections.abc import Callable, MutableMapping
from typing import Any

import pytest

from backends.checks.models import CheckCase, CheckRun, RunTrigger
from backends.checks.report import run_markdown, run_text_table, run_webhook_payload
from backends.checks.services import check_report_post, check_run_now
from tests.backends.checks.conftest import Fleet
from tests.live import serve_in_thread

pytestmark = pytest.mark.django_db


class WebhookCapture:
    """An ASGI app recording every POST body (JSON) and answering a chosen status."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.posts: list[tuple[dict[str, str], Any]] = []

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.posts.append((headers, json.loads(body)))
        await send(
            {"type": "http.response.start", "status": self.status, "headers": [(b"content-type", b"text/plain")]}
        )
        await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def mixed_run(fleet: Fleet, only_cases: Callable[..., CheckCase]) -> CheckRun:
    """b1 passes; b2 answers "Lyon | Marseille" (a pipe, to check Markdown escaping)."""
    only_cases(name="capital")
    fleet.add("b1")
    fleet.add("b2", answer_override="Lyon | Marseille")
    return check_run_now(trigger=RunTrigger.COMMAND, triggered_by="ci")


def test_markdown_summary(mixed_run: CheckRun) -> None:
    text = run_markdown(run=mixed_run)
    lines = text.splitlines()
    assert lines[0] == f"# Check run #{mixed_run.pk}: FAILED (1/2 passed, 1 failed)"
    assert "- **Trigger:** manage.py run_checks by ci" in lines
    assert any(line.startswith("- **Duration:** ") for line in lines)
    header = "| Backend | Model | Case | Outcome | Cause | Latency ms | TTFT ms | Tokens (prompt/completion) | Answer |"
    assert header in lines
    b1 = next(line for line in lines if line.startswith("| b1 |"))
    assert b1.startswith("| b1 | chat-model | capital | PASS |  | ") and b1.endswith("| Paris |")
    b2 = next(line for line in lines if line.startswith("| b2 |"))
    assert "| **FAIL** | wrong answer |" in b2 and b2.endswith("| Lyon \\| Marseille |")
    assert "## Failures" in lines
    assert "- b2 · chat-model · capital: wrong answer — the answer does not contain 'Paris'" in lines
    table = run_text_table(run=mixed_run)
    assert table.splitlines()[-1] == f"Check run #{mixed_run.pk}: FAILED (1/2 passed, 1 failed)"
    assert "FAIL    wrong answer" in table


def test_markdown_of_a_passing_run(fleet: Fleet, only_cases: Callable[..., CheckCase]) -> None:
    only_cases()
    fleet.add("b1")
    run = check_run_now(trigger=RunTrigger.COMMAND)
    text = run_markdown(run=run)
    assert "PASSED (1/1 passed, 0 failed)" in text and "All checks passed." in text and "## Failures" not in text


def test_webhook_payload_is_slack_compatible(mixed_run: CheckRun) -> None:
    payload = run_webhook_payload(run=mixed_run)
    assert set(payload) == {"text", "blocks"}
    headline = f"Check run #{mixed_run.pk}: FAILED (1/2 passed, 1 failed)"
    assert payload["text"].startswith(headline + " — b2 · chat-model · capital: wrong answer")
    header, summary, failures, context = payload["blocks"]
    assert header == {"type": "header", "text": {"type": "plain_text", "text": headline}}
    assert summary["type"] == "section" and summary["text"]["type"] == "mrkdwn"
    assert (
        summary["text"]["text"].startswith(":x: " + headline)
        and "*Trigger:* manage.py run_checks by ci" in (summary["text"]["text"])
    )
    assert failures["text"]["text"] == "• b2 · chat-model · capital: wrong answer — the answer does not contain 'Paris'"
    assert context == {"type": "context", "elements": [{"type": "mrkdwn", "text": "b1: 1/1 · b2: 0/1"}]}
    assert len(header["text"]["text"]) <= 150 and all(
        len(b.get("text", {}).get("text", "")) <= 3000 for b in payload["blocks"]
    )


def test_webhook_is_posted_when_configured(fleet: Fleet, only_cases: Callable[..., CheckCase], settings: Any) -> None:
    only_cases()
    fleet.add("b1", answer_override="Lyon")
    capture = WebhookCapture()
    with serve_in_thread(capture) as server:
        settings.CHECKS_WEBHOOK_URL = f"{server.url}/hooks/checks"
        run = check_run_now(trigger=RunTrigger.COMMAND)
    [(headers, body)] = capture.posts
    assert headers["content-type"] == "application/json"
    assert body == run_webhook_payload(run=run)
    run.refresh_from_db()
    assert run.webhook_status == "posted: HTTP 200"


def test_webhook_failures_are_recorded_not_raised(mixed_run: CheckRun, settings: Any) -> None:
    settings.CHECKS_WEBHOOK_URL = ""
    assert check_report_post(run=mixed_run) == ""  # not configured: nothing posted
    capture = WebhookCapture(status=500)
    with serve_in_thread(capture) as server:
        assert check_report_post(run=mixed_run, url=server.url).startswith("failed: HTTP 500")
    assert check_report_post(run=mixed_run, url="http://127.0.0.1:9/hook").startswith("failed: ConnectError")
    mixed_run.refresh_from_db()
    assert mixed_run.webhook_status.startswith("failed: ConnectError")
