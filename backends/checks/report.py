"""A run's report as Markdown (download from admin / the API) and as a Slack-compatible webhook payload."""

from __future__ import annotations

from typing import Any

from backends.checks.models import ENDPOINT_PATHS, CheckResult, CheckRun, RunStatus
from backends.checks.selectors import check_failures, check_run_results

_SLACK_SECTION_MAX = 2900  # Slack rejects section texts over 3000 characters
_SLACK_HEADER_MAX = 150
_WEBHOOK_FAILURES = 10
_STATUS_EMOJI = {RunStatus.PASSED: ":white_check_mark:", RunStatus.FAILED: ":x:", RunStatus.ERROR: ":warning:"}


def _cell(text: object) -> str:
    """A Markdown table cell: one line, pipes escaped."""
    return str(text if text is not None else "").replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").strip()


def _ms(value: float | None) -> str:
    """Milliseconds without decimals, or nothing."""
    return "" if value is None else f"{value:.0f}"


def _short(text: str, limit: int) -> str:
    """Cut text to limit characters with an ellipsis."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def run_headline(*, run: CheckRun) -> str:
    """One line: run number, status and counts."""
    if run.status == RunStatus.ERROR:
        return f"Check run #{run.pk}: ERROR ({run.error})" if run.error else f"Check run #{run.pk}: ERROR"
    if not run.is_finished:
        return f"Check run #{run.pk}: {run.status.upper()}"
    return f"Check run #{run.pk}: {run.status.upper()} ({run.passed}/{run.total} passed, {run.failed} failed)"


def _details(run: CheckRun) -> list[tuple[str, str]]:
    """Who, when, how long, which filters."""
    who = run.get_trigger_display() + (f" by {run.triggered_by}" if run.triggered_by else "")
    items = [("Started", f"{run.started_at or run.created_at:%Y-%m-%d %H:%M:%S} UTC"), ("Trigger", who)]
    if run.duration_s is not None:
        items.append(("Duration", f"{run.duration_s:.1f} s"))
    if run.model_names:
        items.append(("Models", ", ".join(run.model_names)))
    if run.backend_names:
        items.append(("Backends", ", ".join(run.backend_names)))
    return items


def _failure_line(result: CheckResult) -> str:
    """backend · model · case: cause — explanation."""
    return f"{result.backend_name} · {result.model_name} · {result.case_name}: {result.get_cause_display()}" + (
        f" — {result.error}" if result.error else ""
    )


def _case_endpoints(results: list[CheckResult]) -> dict[str, str]:
    """The endpoint each case of the results called (a deleted case: "?")."""
    endpoints: dict[str, str] = {}
    for result in results:
        if result.case_name not in endpoints:
            case = result.case
            endpoints[result.case_name] = ENDPOINT_PATHS.get(case.endpoint, "?") if case is not None else "?"
    return dict(sorted(endpoints.items()))


def run_markdown(*, run: CheckRun) -> str:
    """The run's full report in Markdown: summary, every result, then the failures explained."""
    results = list(check_run_results(run=run))
    lines = [f"# {run_headline(run=run)}", ""]
    lines += [f"- **{name}:** {value}" for name, value in _details(run)]
    lines.append("")
    if results:
        lines += [
            "| Backend | Model | Case | Outcome | Cause | Latency ms | TTFT ms | Tokens (prompt/completion) | Answer |",
            "|---|---|---|---|---|---:|---:|---|---|",
        ]
        for r in results:
            tokens = "" if r.prompt_tokens is None else f"{r.prompt_tokens}/{r.completion_tokens or 0}"
            outcome = "PASS" if r.passed else "**FAIL**"
            lines.append(
                "| "
                + " | ".join(
                    _cell(v)
                    for v in (
                        r.backend_name,
                        r.model_name,
                        r.case_name,
                        outcome,
                        r.get_cause_display() if r.cause else "",
                        _ms(r.latency_ms),
                        _ms(r.ttft_ms),
                        tokens,
                        _short(r.answer, 80),
                    )
                )
                + " |"
            )
        lines.append("")
        lines += ["## Cases", ""]
        lines += [f"- {_cell(name)}: `POST {path}`" for name, path in _case_endpoints(results).items()]
        lines.append("")
    failures = check_failures(results)
    if failures:
        lines += ["## Failures", ""]
        lines += [f"- {_cell(_failure_line(r))}" for r in failures]
        lines.append("")
    elif results:
        lines += ["All checks passed.", ""]
    return "\n".join(lines)


def run_webhook_payload(*, run: CheckRun) -> dict[str, Any]:
    """Slack-compatible JSON: `text` (the fallback notification) and `blocks` (header, summary, failures)."""
    results = list(check_run_results(run=run))
    failures = check_failures(results)
    headline = run_headline(run=run)
    emoji = _STATUS_EMOJI.get(RunStatus(run.status), "")
    summary = " · ".join(f"*{name}:* {value}" for name, value in _details(run))
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": _short(headline, _SLACK_HEADER_MAX)}},
        {
            "type": "section",
            "text": {"type": "mrkdwn", "text": _short(f"{emoji} {headline}\n{summary}".strip(), _SLACK_SECTION_MAX)},
        },
    ]
    if failures:
        listed = "\n".join(f"• {_failure_line(r)}" for r in failures[:_WEBHOOK_FAILURES])
        if len(failures) > _WEBHOOK_FAILURES:
            listed += f"\n… and {len(failures) - _WEBHOOK_FAILURES} more"
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": _short(listed, _SLACK_SECTION_MAX)}})
    backends = sorted({r.backend_name for r in results})
    if backends:
        per_backend = []
        for name in backends:
            own = [r for r in results if r.backend_name == name]
            per_backend.append(f"{name}: {sum(r.passed for r in own)}/{len(own)}")
        blocks.append(
            {"type": "context", "elements": [{"type": "mrkdwn", "text": _short(" · ".join(per_backend), 2900)}]}
        )
    text = headline
    if failures:
        text += " — " + "; ".join(_failure_line(r) for r in failures[:3])
    return {"text": _short(text, 3000), "blocks": blocks}


def run_text_table(*, run: CheckRun, width: int = 60) -> str:
    """The run as a plain-text table for terminals (the `run_checks` command), headline last."""
    header = ("BACKEND", "MODEL", "CASE", "RESULT", "CAUSE", "LATENCY", "TTFT", "TOKENS", "ANSWER / ERROR")
    rows = [header]
    for r in check_run_results(run=run):
        detail = r.error if not r.passed and r.error else repr(r.answer) if r.answer else ""
        rows.append(
            (
                r.backend_name,
                r.model_name,
                r.case_name,
                "PASS" if r.passed else "FAIL",
                r.get_cause_display() if r.cause else "",
                f"{r.latency_ms:.0f} ms" if r.latency_ms is not None else "",
                f"{r.ttft_ms:.0f} ms" if r.ttft_ms is not None else "",
                "" if r.prompt_tokens is None else f"{r.prompt_tokens}/{r.completion_tokens or 0}",
                _short(" ".join(detail.split()), width),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]
    if len(rows) > 1:
        lines.insert(1, "  ".join("-" * w for w in widths))
    else:
        lines = []
    lines.append(run_headline(run=run))
    return "\n".join(lines)
