"""Admin of the Batch API: batches with progress and usage (and a cancel action), files, lines (read-only)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html

from batches import services
from batches.models import Batch, BatchFile, BatchLine


class _ReadOnly(admin.ModelAdmin):
    """Rows written by the platform: viewable, never added or changed here."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Batch)
class BatchAdmin(_ReadOnly):
    list_display = ("id", "owner", "endpoint", "status", "progress", "failed", "tokens", "created_at", "expires_at")
    list_filter = ("status", "endpoint")
    search_fields = ("id", "owner", "input_file__id", "input_file__filename")
    actions = ["cancel"]
    readonly_fields = (
        "id",
        "owner",
        "key",
        "endpoint",
        "status",
        "progress",
        "total",
        "completed",
        "failed",
        "prompt_tokens",
        "completion_tokens",
        "input_file",
        "output_file",
        "error_file",
        "completion_window",
        "metadata",
        "errors",
        "created_at",
        "in_progress_at",
        "finalizing_at",
        "completed_at",
        "failed_at",
        "expired_at",
        "cancelling_at",
        "cancelled_at",
        "expires_at",
        "runner_lease_until",
    )
    fields = readonly_fields

    @admin.display(description="progress")
    def progress(self, batch: Batch) -> str:
        done = batch.completed + batch.failed
        percent = 100 * done // batch.total if batch.total else 0
        return format_html(
            '<progress max="{}" value="{}" style="width:8em"></progress> {}/{} ({}%)',
            batch.total or 1,
            done,
            done,
            batch.total,
            percent,
        )

    @admin.display(description="tokens (in / out)")
    def tokens(self, batch: Batch) -> str:
        return f"{batch.prompt_tokens} / {batch.completion_tokens}"

    @admin.action(description="Cancel selected batches")
    def cancel(self, request: HttpRequest, queryset: QuerySet[Batch]) -> None:
        cancelled = 0
        for batch in queryset:
            if batch.status in ("validating", "in_progress"):
                services.batch_cancel(batch=batch)
                cancelled += 1
        self.message_user(request, f"{cancelled} batch(es) cancelling.", messages.SUCCESS)


@admin.register(BatchFile)
class BatchFileAdmin(_ReadOnly):
    list_display = ("id", "filename", "purpose", "owner", "bytes", "lines", "created_at")
    list_filter = ("purpose",)
    search_fields = ("id", "filename", "owner")
    readonly_fields = ("id", "filename", "purpose", "owner", "key", "bytes", "lines", "storage_name", "created_at")
    fields = readonly_fields

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(BatchLine)
class BatchLineAdmin(_ReadOnly):
    list_display = (
        "batch",
        "index",
        "custom_id",
        "state",
        "status_code",
        "attempts",
        "prompt_tokens",
        "completion_tokens",
        "finished_at",
    )
    list_filter = ("state", "status_code")
    search_fields = ("batch__id", "custom_id")
    list_select_related = ("batch",)
    readonly_fields = (
        "batch",
        "index",
        "custom_id",
        "body",
        "state",
        "lease_until",
        "attempts",
        "request_id",
        "status_code",
        "response",
        "error",
        "prompt_tokens",
        "completion_tokens",
        "finished_at",
    )
    fields = readonly_fields

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
