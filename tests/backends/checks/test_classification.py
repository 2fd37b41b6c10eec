"""Every failure cause is classified precisely against a mock vLLM made to misbehave (real sockets)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from backends.checks.models import CheckCase, CheckResult, RunTrigger
from backends.checks.runner import CaseSpec, answer_matches, classify_backend_error, judge
from backends.checks.services import check_run_now
from core.errors import error_message_from
from tests.backends.checks.conftest import Fleet

pytestmark = pytest.mark.django_db


def _run_one(fleet: Fleet) -> CheckResult:
    run = check_run_now(trigger=RunTrigger.COMMAND, triggered_by="test")
    results = list(run.results.all())
    assert len(results) == 1, [r.error for r in results]
    return results[0]


def test_correct_answer_passes_with_measurements(fleet: Fleet, only_cases: Callable[..., CheckCase]) -> None:
    only_cases()
    fleet.add("b1")
    result = _run_one(fleet)
    assert (result.outcome, result.cause, result.error) == ("pass", "", "")
    assert result.answer == "Paris" and result.finish_reason == "stop" and result.http_status == 200
    assert result.prompt_tokens and result.completion_tokens == 1 and result.latency_ms is not None
    assert result.ttft_ms is None  # only streamed cases measure time to first token
    sent = fleet.mocks["b1"].stats.last_request
    assert sent["temperature"] == 0.1 and sent["max_tokens"] == 50 and sent["model"] == "served-chat"


def test_streamed_answer_passes_with_time_to_first_token(fleet: Fleet, only_cases: Callable[..., CheckCase]) -> None:
    only_cases(stream=True)
    fleet.add("b1", latency_s=0.05)
    result = _run_one(fleet)
    assert result.outcome == "pass" and result.answer == "Paris"
    assert result.ttft_ms is not None and result.latency_ms is not None and 40 <= result.ttft_ms <= result.latency_ms
    assert result.prompt_tokens is not None  # usage requested with stream_options.include_usage
    assert fleet.mocks["b1"].stats.last_request["stream_options"] == {"include_usage": True}


# (case fields, mock knobs, backend fields, expected cause, text expected in the error)
CAUSES: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any], str, str]] = {
    "wrong answer": ({}, {"answer_override": "Lyon"}, {}, "wrong_answer", "does not contain 'Paris'"),
    "wrong answer (stream)": ({"stream": True}, {"answer_override": "Lyon"}, {}, "wrong_answer", "'Paris'"),
    "slow": ({"slow_threshold_s": 0.05}, {"latency_s": 0.1}, {}, "slow", "over the slow threshold of 0.05 s"),
    "timeout (read timeout)": ({}, {"hang": True}, {"read_timeout_s": 0.2}, "timeout", "read timeout"),
    "timeout (latency budget)": ({"latency_budget_s": 0.2}, {"hang": True}, {}, "timeout", "latency budget of 0.2 s"),
    "timeout (stream)": ({"stream": True}, {"hang": True}, {"read_timeout_s": 0.2}, "timeout", "read timeout"),
    "HTTP 500": ({}, {"fail_status": 500}, {}, "backend_error", "HTTP 500"),
    "HTTP 503 (stream)": ({"stream": True}, {"fail_status": 503}, {}, "backend_error", "HTTP 503"),
    "out of memory": (
        {},
        {"error_message_override": "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.15 GiB total)"},
        {},
        "out_of_memory",
        "HTTP 500 from chat completion: CUDA out of memory. Tried to allocate 2.00 GiB",
    ),
    "out of memory (stream)": (
        {"stream": True},
        {"error_message_override": "torch.OutOfMemoryError: CUDA error", "fail_status": 500},
        {},
        "out_of_memory",
        "OutOfMemoryError",
    ),
    "model not served (404)": ({}, {"models": ["other-model"]}, {}, "backend_error", "HTTP 404"),
    "stream broken mid-answer": (
        {"stream": True, "expected_text": "deterministic", "messages": [{"role": "user", "content": "Hi"}]},
        {"die_after_tokens": 2},
        {},
        "backend_error",
        "connection broke",
    ),
    "token count mismatch": (
        {"expectation": "token_count", "expected_text": ""},
        {"usage_prompt_tokens_offset": 3},
        {},
        "token_mismatch",
        "/tokenize counts",
    ),
    "truncated": (
        {"max_tokens": 3},
        {"answer_override": "The capital of France is Paris."},
        {},
        "truncated",
        'finish_reason "length"',
    ),
    "max_tokens not honoured": (
        {"expectation": "finish_length", "expected_text": "", "max_tokens": 50},
        {"fill_to_max_tokens": False},
        {},
        "wrong_answer",
        'expected "length"',
    ),
}


@pytest.mark.parametrize("name", list(CAUSES))
def test_failure_cause_is_classified(name: str, fleet: Fleet, only_cases: Callable[..., CheckCase]) -> None:
    case_fields, knobs, backend_fields, cause, text = CAUSES[name]
    only_cases(**case_fields)
    fleet.add("b1", backend=backend_fields, **knobs)
    result = _run_one(fleet)
    assert result.outcome == "fail"
    assert result.cause == cause, result.error
    assert text in result.error, result.error


def test_unreachable_backend(fleet: Fleet, only_cases: Callable[..., CheckCase]) -> None:
    only_cases()
    fleet.add_dead("dead")
    result = _run_one(fleet)
    assert (result.outcome, result.cause) == ("fail", "unreachable")
    assert "cannot connect to http://127.0.0.1:9" in result.error and result.http_status is None


def test_error_bodies_and_oom_wordings() -> None:
    assert error_message_from(b'{"error":{"message":"boom","type":"X","code":500}}') == "boom"
    assert error_message_from(b'{"detail":"Not Found"}') == "Not Found"
    assert error_message_from(b"Internal Server Error\n") == "Internal Server Error"
    for message in (
        "CUDA out of memory. Tried to allocate 20.00 MiB",
        "torch.OutOfMemoryError: CUDA out of memory",
        "RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED",
        "OOM while allocating KV cache blocks",
    ):
        assert classify_backend_error(500, message) == "out_of_memory", message
    assert classify_backend_error(500, "EngineCore died unexpectedly") == "backend_error"
    assert classify_backend_error(400, "prompt too long; room for boom") == "backend_error"


def test_expectations_and_judging_order() -> None:
    contains = CaseSpec(id=1, name="c", messages=[], expected_text="PARIS")
    assert answer_matches(contains, "The capital is paris.")
    assert not answer_matches(
        CaseSpec(id=1, name="c", messages=[], expected_text="PARIS", case_sensitive=True), "paris"
    )
    regex = CaseSpec(id=1, name="r", messages=[], expectation="regex", expected_text=r"^\s*paris\W*$")
    assert answer_matches(regex, " Paris.") and not answer_matches(regex, "It is Paris")
    equals = CaseSpec(id=1, name="e", messages=[], expectation="equals", expected_text="Paris")
    assert answer_matches(equals, " paris \n") and not answer_matches(equals, "Paris.")
    # a wrong answer is reported as such even when it was also slow
    slow_and_wrong = judge(
        CaseSpec(id=1, name="c", messages=[], expected_text="Paris", slow_threshold_s=0.01),
        answer="Lyon",
        finish_reason="stop",
        latency_s=1.0,
        prompt_tokens=3,
    )
    assert slow_and_wrong[0] == "wrong_answer"
    missing_usage = judge(
        CaseSpec(id=1, name="t", messages=[], expectation="token_count"),
        answer="",
        finish_reason="stop",
        latency_s=0.1,
        prompt_tokens=None,
        tokenize_count=10,
    )
    assert missing_usage[0] == "token_mismatch" and "no usage" in missing_usage[1]
