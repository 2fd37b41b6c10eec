"""Batch API: uploaded files, batches and their lines (one row per input line, the durable unit of work)."""

from __future__ import annotations

import secrets

from django.db import models

from governance.models import ApiKey


def file_id_new() -> str:
    """An OpenAI-style file id."""
    return "file-" + secrets.token_hex(12)


def batch_id_new() -> str:
    """An OpenAI-style batch id."""
    return "batch_" + secrets.token_hex(12)


class FilePurpose(models.TextChoices):
    BATCH = "batch"
    BATCH_OUTPUT = "batch_output"


class BatchFile(models.Model):
    """A file uploaded by a key (purpose `batch`) or written by a batch (`batch_output`), stored through Django's
    storage API (STORAGES["batches"])."""

    id = models.CharField(primary_key=True, max_length=40, default=file_id_new, editable=False)
    key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.CASCADE, related_name="batch_files")
    owner = models.CharField(max_length=100, help_text="Key name, or 'master'.")
    purpose = models.CharField(max_length=20, choices=FilePurpose.choices)
    filename = models.CharField(max_length=255)
    bytes = models.PositiveBigIntegerField(default=0)
    lines = models.PositiveIntegerField(default=0)
    storage_name = models.CharField(max_length=300, help_text="Name of the content in the batches storage.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "batch file"

    def __str__(self) -> str:
        return f"{self.id} ({self.filename})"


class BatchStatus(models.TextChoices):
    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


FINAL_STATUSES = frozenset({BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.CANCELLED})


class Batch(models.Model):
    """One batch: an input file of requests, run line by line by the workers; OpenAI's status lifecycle."""

    id = models.CharField(primary_key=True, max_length=40, default=batch_id_new, editable=False)
    key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.CASCADE, related_name="batches")
    owner = models.CharField(max_length=100, help_text="Key name, or 'master'.")
    endpoint = models.CharField(max_length=40)
    input_file = models.ForeignKey(BatchFile, on_delete=models.PROTECT, related_name="batches_in")
    output_file = models.ForeignKey(
        BatchFile, null=True, blank=True, on_delete=models.SET_NULL, related_name="batches_out"
    )
    error_file = models.ForeignKey(
        BatchFile, null=True, blank=True, on_delete=models.SET_NULL, related_name="batches_err"
    )
    completion_window = models.CharField(max_length=10, default="24h")
    status = models.CharField(max_length=20, choices=BatchStatus.choices, default=BatchStatus.VALIDATING)
    metadata = models.JSONField(null=True, blank=True)
    errors = models.JSONField(null=True, blank=True, help_text="Batch-level errors (OpenAI's `errors.data`).")
    total = models.PositiveIntegerField(default=0)
    completed = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    in_progress_at = models.DateTimeField(null=True, blank=True)
    finalizing_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    failed_at = models.DateTimeField(null=True, blank=True)
    expired_at = models.DateTimeField(null=True, blank=True)
    cancelling_at = models.DateTimeField(null=True, blank=True)
    cancelled_at = models.DateTimeField(null=True, blank=True)
    runner_lease_until = models.DateTimeField(
        null=True, blank=True, help_text="A worker runs the batch until then (renewed while it runs)."
    )

    class Meta:
        ordering = ["-created_at"]
        verbose_name_plural = "batches"
        indexes = [models.Index(fields=["status", "created_at"])]

    def __str__(self) -> str:
        return f"{self.id} ({self.status})"

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES


class LineState(models.TextChoices):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"


class BatchLine(models.Model):
    """One request of a batch. Its result is written here before the worker moves on; a line `running` whose lease
    has expired (its worker died) is run again, a `done` line never is."""

    batch = models.ForeignKey(Batch, on_delete=models.CASCADE, related_name="lines")
    index = models.PositiveIntegerField(help_text="Line number in the input file, from 1.")
    custom_id = models.CharField(max_length=512)
    body = models.JSONField()
    state = models.CharField(max_length=10, choices=LineState.choices, default=LineState.PENDING)
    lease_until = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    request_id = models.CharField(max_length=64, blank=True)
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    response = models.JSONField(null=True, blank=True)
    error = models.JSONField(null=True, blank=True)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["batch", "index"]
        constraints = [
            models.UniqueConstraint(fields=["batch", "custom_id"], name="unique_batch_line_custom_id"),
            models.UniqueConstraint(fields=["batch", "index"], name="unique_batch_line_index"),
        ]
        indexes = [models.Index(fields=["batch", "state"])]

    def __str__(self) -> str:
        return f"{self.batch_id}:{self.custom_id}"
