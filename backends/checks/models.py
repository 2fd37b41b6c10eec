"""Check cases (prompt + expectation), check runs and their per backend x model x case results."""

from __future__ import annotations

import re

from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models

from backends.validators import validate_name

ANSWER_MAX_CHARS = 500
"""Stored answers are cut to this many characters."""
MAX_DOCUMENTS = 100
"""Documents of a rerank case."""

# Request fields a case may not set through `extra_params` (the runner sets them itself).
RESERVED_PARAMS = frozenset(
    {
        "model",
        "messages",
        "stream",
        "stream_options",
        "temperature",
        "max_tokens",
        "input",
        "max_output_tokens",
        "query",
        "documents",
    }
)


class Expectation(models.TextChoices):
    """What makes a check pass."""

    CONTAINS = "contains", "answer contains the expected text"
    REGEX = "regex", "answer matches the regular expression"
    EQUALS = "equals", "answer equals the expected text"
    TOKEN_COUNT = "token_count", "reported prompt tokens equal the backend's /tokenize count"
    FINISH_LENGTH = "finish_length", 'finish_reason is "length" (max_tokens honoured)'


class CaseEndpoint(models.TextChoices):
    """The vLLM endpoint a case calls, and so the models it applies to."""

    CHAT = "chat", "/v1/chat/completions (chat models)"
    RESPONSES = "responses", "/v1/responses (chat models)"
    RERANK = "rerank", "/v1/rerank (pooling models)"


ENDPOINT_PATHS: dict[str, str] = {
    CaseEndpoint.CHAT: "/v1/chat/completions",
    CaseEndpoint.RESPONSES: "/v1/responses",
    CaseEndpoint.RERANK: "/v1/rerank",
}
TEXT_EXPECTATIONS = frozenset({Expectation.CONTAINS, Expectation.EQUALS, Expectation.REGEX})
ENDPOINT_EXPECTATIONS: dict[str, frozenset[str]] = {
    CaseEndpoint.CHAT: frozenset(Expectation.values),
    CaseEndpoint.RESPONSES: TEXT_EXPECTATIONS | {Expectation.FINISH_LENGTH},
    CaseEndpoint.RERANK: TEXT_EXPECTATIONS,
}
"""What each endpoint's answer can be judged on (a rerank's answer is the text of the top-ranked document)."""


class CheckCause(models.TextChoices):
    """Why a check failed."""

    WRONG_ANSWER = "wrong_answer", "wrong answer"
    TRUNCATED = "truncated", "truncated"
    TIMEOUT = "timeout", "timeout"
    BACKEND_ERROR = "backend_error", "backend error"
    OUT_OF_MEMORY = "out_of_memory", "out of memory"
    UNREACHABLE = "unreachable", "unreachable"
    TOKEN_MISMATCH = "token_mismatch", "token count mismatch"
    SLOW = "slow", "slow"


class Outcome(models.TextChoices):
    """Result of one check."""

    PASS = "pass", "pass"
    FAIL = "fail", "fail"


class RunTrigger(models.TextChoices):
    """What started a run."""

    SCHEDULE = "schedule", "schedule (Celery beat)"
    ADMIN = "admin", "admin"
    COMMAND = "command", "manage.py run_checks"
    API = "api", "API"


class RunStatus(models.TextChoices):
    """Where a run is."""

    QUEUED = "queued", "queued"
    RUNNING = "running", "running"
    PASSED = "passed", "passed"
    FAILED = "failed", "failed"
    ERROR = "error", "error"


class CheckCase(models.Model):
    """A prompt sent to every (backend, model) it applies to, with the result it must produce."""

    name = models.CharField(max_length=100, unique=True, validators=[validate_name])
    description = models.TextField(blank=True)
    endpoint = models.CharField(
        max_length=16,
        choices=CaseEndpoint.choices,
        default=CaseEndpoint.CHAT,
        help_text="Chat and Responses cases apply to chat models, rerank cases to pooling (embedding) models.",
    )
    messages = models.JSONField(
        default=list,
        blank=True,
        help_text='Chat / Responses: OpenAI chat messages, e.g. [{"role": "user", "content": "..."}] '
        "(the Responses API's `input`).",
    )
    query = models.TextField(blank=True, help_text="Rerank: the query.")
    documents = models.JSONField(
        default=list,
        blank=True,
        help_text=f"Rerank: the documents to rank (a list of at most {MAX_DOCUMENTS} strings); the answer judged is "
        "the text of the document ranked first.",
    )
    temperature = models.FloatField(null=True, blank=True, default=0.0, help_text="Empty: the backend's default.")
    max_tokens = models.PositiveIntegerField(null=True, blank=True, help_text="Empty: the backend's default.")
    stream = models.BooleanField(default=False, help_text="Stream the answer (SSE); time to first token is measured.")
    extra_params = models.JSONField(
        default=dict, blank=True, help_text='Other request fields sent as they are, e.g. {"seed": 1}.'
    )
    expectation = models.CharField(max_length=16, choices=Expectation.choices, default=Expectation.CONTAINS)
    expected_text = models.CharField(
        max_length=1000, blank=True, help_text="Text (or regular expression) for contains / equals / regex."
    )
    case_sensitive = models.BooleanField(default=False)
    latency_budget_s = models.FloatField(
        default=120.0,
        validators=[MinValueValidator(0.01)],
        help_text="Longest wait for the whole answer; past it the check fails with cause 'timeout'.",
    )
    slow_threshold_s = models.FloatField(
        default=30.0,
        validators=[MinValueValidator(0.001)],
        help_text="A correct answer slower than this fails with cause 'slow'.",
    )
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    # Last: from here on the name `models` is this field, not the django.db.models module.
    models = models.ManyToManyField(
        "backends.ServedModel",
        blank=True,
        related_name="check_cases",
        help_text="Models this case applies to; none selected: every enabled model its endpoint serves (chat models "
        "for chat and Responses cases, pooling models for rerank cases).",
    )

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        """Check the messages' shape, the expectation's text or pattern, and the extra parameters."""
        errors: dict[str, str] = {}
        if self.messages is None:  # an empty textarea in admin (the other endpoint's field)
            self.messages = []
        if self.documents is None:
            self.documents = []
        msgs = self.messages
        if self.endpoint == CaseEndpoint.RERANK:
            docs = self.documents
            if not self.query.strip():
                errors["query"] = "Required for a rerank case."
            if (
                not isinstance(docs, list)
                or not 2 <= len(docs) <= MAX_DOCUMENTS
                or not all(isinstance(d, str) and d for d in docs)
            ):
                errors["documents"] = f"A list of 2 to {MAX_DOCUMENTS} non-empty strings."
            if self.stream:
                errors["stream"] = "A rerank answer is not streamed."
        elif (
            not isinstance(msgs, list)
            or not msgs
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in msgs)
        ):
            errors["messages"] = 'A non-empty list of {"role": ..., "content": ...} objects.'
        if self.endpoint == CaseEndpoint.RESPONSES and self.stream:
            errors["stream"] = "Responses cases are not streamed (yet); use a chat case to check streaming."
        allowed = ENDPOINT_EXPECTATIONS.get(self.endpoint, frozenset())
        if self.expectation not in allowed:
            labels = ", ".join(sorted(allowed))
            errors["expectation"] = f"A {self.get_endpoint_display()} case can expect: {labels}."
        needs_text = self.expectation in {Expectation.CONTAINS, Expectation.EQUALS, Expectation.REGEX}
        if needs_text and not self.expected_text:
            errors["expected_text"] = "Required for this expectation."
        if self.expectation == Expectation.REGEX and self.expected_text:
            try:
                re.compile(self.expected_text)
            except re.error as exc:
                errors["expected_text"] = f"Not a valid regular expression: {exc}."
        if not isinstance(self.extra_params, dict):
            errors["extra_params"] = "A JSON object."
        elif reserved := sorted(RESERVED_PARAMS & set(self.extra_params)):
            errors["extra_params"] = f"Set {', '.join(reserved)} with the case's own fields."
        if errors:
            raise ValidationError(errors)


class CheckRun(models.Model):
    """One execution of the enabled cases against the backends (optionally filtered by model and backend)."""

    trigger = models.CharField(max_length=16, choices=RunTrigger.choices)
    triggered_by = models.CharField(max_length=150, blank=True, help_text="User, key or scheduler that started it.")
    model_names = models.JSONField(default=list, blank=True, help_text="Only these models (empty: all).")
    backend_names = models.JSONField(default=list, blank=True, help_text="Only these backends (empty: all).")
    status = models.CharField(max_length=16, choices=RunStatus.choices, default=RunStatus.QUEUED)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    total = models.PositiveIntegerField(default=0)
    passed = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    error = models.TextField(blank=True, help_text="Why the run itself could not complete.")
    webhook_status = models.CharField(max_length=300, blank=True)

    class Meta:
        ordering = ["-id"]
        verbose_name = "check run"

    def __str__(self) -> str:
        return f"check run #{self.pk}"

    @property
    def duration_s(self) -> float | None:
        """Seconds from start to finish (None until finished)."""
        if self.started_at and self.finished_at:
            return round((self.finished_at - self.started_at).total_seconds(), 2)
        return None

    @property
    def is_finished(self) -> bool:
        """Whether the run reached a final status."""
        return self.status in {RunStatus.PASSED, RunStatus.FAILED, RunStatus.ERROR}


class CheckResult(models.Model):
    """The outcome of one case on one model of one backend in a run."""

    run = models.ForeignKey(CheckRun, on_delete=models.CASCADE, related_name="results")
    # Names are copied so that history survives renamed or deleted rows.
    backend = models.ForeignKey(
        "backends.Backend", on_delete=models.SET_NULL, null=True, blank=True, related_name="check_results"
    )
    backend_name = models.CharField(max_length=100)
    model = models.ForeignKey(
        "backends.ServedModel", on_delete=models.SET_NULL, null=True, blank=True, related_name="check_results"
    )
    model_name = models.CharField(max_length=200)
    case = models.ForeignKey(CheckCase, on_delete=models.SET_NULL, null=True, blank=True, related_name="results")
    case_name = models.CharField(max_length=100)
    outcome = models.CharField(max_length=8, choices=Outcome.choices)
    cause = models.CharField(max_length=16, choices=CheckCause.choices, blank=True)
    answer = models.TextField(blank=True, help_text=f"First {ANSWER_MAX_CHARS} characters.")
    finish_reason = models.CharField(max_length=32, blank=True)
    latency_ms = models.FloatField(null=True, blank=True)
    ttft_ms = models.FloatField(null=True, blank=True, help_text="Time to first token (streamed cases).")
    prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    completion_tokens = models.PositiveIntegerField(null=True, blank=True)
    http_status = models.PositiveSmallIntegerField(null=True, blank=True)
    error = models.TextField(blank=True, help_text="Why it failed (the backend's message when it sent one).")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["run_id", "backend_name", "model_name", "case_name"]
        verbose_name = "check result"
        indexes = [
            models.Index(fields=["backend", "run"], name="checkresult_backend_run"),
            models.Index(fields=["model", "run"], name="checkresult_model_run"),
        ]

    def __str__(self) -> str:
        return f"{self.backend_name} · {self.model_name} · {self.case_name}: {self.outcome}"

    @property
    def passed(self) -> bool:
        """Whether the check passed."""
        return self.outcome == Outcome.PASS
