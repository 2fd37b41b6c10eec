"""Admin for API keys: the secret is shown once, on the page right after creation or rotation."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse

from governance.models import ApiKey
from governance.services import api_key_generate, api_key_revoke, api_key_rotate, key_secret_set


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    """Keys: hashed at rest; name, owner, allowed models, expiry, limits."""

    list_display = (
        "name",
        "prefix_display",
        "owner",
        "enabled",
        "models_display",
        "rpm_limit",
        "tpm_limit",
        "daily_token_budget",
        "priority_default",
        "priority_max",
        "queue_weight",
        "expires_at",
        "created_at",
    )
    list_filter = ("enabled", "priority_max")
    search_fields = ("name", "prefix", "owner__username")
    readonly_fields = ("prefix_display", "created_at", "updated_at")
    fields = (
        "name",
        "owner",
        "enabled",
        "allowed_models",
        "rpm_limit",
        "tpm_limit",
        "daily_token_budget",
        "priority_default",
        "priority_max",
        "queue_weight",
        "expires_at",
        "prefix_display",
        "created_at",
        "updated_at",
    )
    actions = ["revoke", "rotate"]

    @admin.display(description="key")
    def prefix_display(self, obj: ApiKey) -> str:
        return f"{obj.prefix}…" if obj.prefix else "–"

    @admin.display(description="models")
    def models_display(self, obj: ApiKey) -> str:
        return ", ".join(obj.allowed_models) if obj.allowed_models else "all"

    def save_model(self, request: HttpRequest, obj: ApiKey, form: Any, change: bool) -> None:
        """A new key gets its secret here; it is kept on the request only to be shown once."""
        if not change:
            secret = api_key_generate()
            key_secret_set(key=obj, secret=secret)
            request._api_key_secret = secret  # type: ignore[attr-defined]
        super().save_model(request, obj, form, change)

    def response_add(self, request: HttpRequest, obj: ApiKey, post_url_continue: str | None = None) -> HttpResponse:
        """Show the new secret on its own page (never in a message, which could sit in a cookie)."""
        secret = getattr(request, "_api_key_secret", None)
        if secret is None:
            return super().response_add(request, obj, post_url_continue)
        return _secret_page(request, obj, secret, self)

    @admin.action(description="Revoke (disable) selected keys")
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        for key in queryset:
            api_key_revoke(key=key)
        self.message_user(request, f"{queryset.count()} key(s) revoked; they stop working within 2 s.")

    @admin.action(description="Rotate the secret of one key")
    def rotate(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> HttpResponse | None:
        if queryset.count() != 1:
            self.message_user(request, "Rotate one key at a time.", level=messages.WARNING)
            return None
        key = queryset.get()
        return _secret_page(request, key, api_key_rotate(key=key), self)


def _secret_page(request: HttpRequest, key: ApiKey, secret: str, model_admin: admin.ModelAdmin) -> HttpResponse:
    context = {
        **model_admin.admin_site.each_context(request),
        "title": f"API key {key.name}",
        "key": key,
        "secret": secret,
        "opts": model_admin.model._meta,
    }
    response = TemplateResponse(request, "admin/governance/apikey/secret.html", context)
    response["Cache-Control"] = "no-store"
    return response
