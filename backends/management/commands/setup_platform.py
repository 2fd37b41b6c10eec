"""Prepare a fresh platform: demo or real-vLLM registry, and the admin user."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from backends.services import registry_demo_create, registry_version_bump, registry_vllm_register


class Command(BaseCommand):
    """Load the demo registry on first start (or register VLLM_BACKEND_URL) and ensure an admin user exists."""

    help = __doc__

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--mock-url",
            action="append",
            help="URL of a bundled mock vLLM (repeat for a pool of several); default http://127.0.0.1:8101.",
        )
        parser.add_argument("--admin-user", default=os.environ.get("DJANGO_SUPERUSER_USERNAME", "admin"))

    def handle(self, *args: Any, **options: Any) -> None:
        vllm_urls = [u.strip() for u in os.environ.get("VLLM_BACKEND_URL", "").split(",") if u.strip()]
        if vllm_urls:
            try:
                model, names = registry_vllm_register(urls=vllm_urls, model_name=os.environ.get("VLLM_MODEL_NAME"))
            except Exception as exc:
                raise CommandError(f"Cannot register VLLM_BACKEND_URL {vllm_urls}: {exc}") from exc
            self.stdout.write(f"registry: model {model!r} on {', '.join(names)} (from VLLM_BACKEND_URL)")
        elif registry_demo_create(mock_urls=options["mock_url"] or ["http://127.0.0.1:8101"]):
            urls = ", ".join(options["mock_url"] or ["http://127.0.0.1:8101"])
            self.stdout.write(f"registry: demo loaded (mock-chat, mock-embed on {urls})")
        else:
            self.stdout.write("registry: kept as it is")
        registry_version_bump()
        self._ensure_admin(options["admin_user"])

    def _ensure_admin(self, username: str) -> None:
        user_model = get_user_model()
        password = os.environ.get("DJANGO_SUPERUSER_PASSWORD", "")
        password_file = Path(settings.LOCAL_DIR) / "admin_password"
        user = user_model.objects.filter(username=username).first()
        if user is None:
            if not password:
                password = secrets.token_urlsafe(12)
                password_file.parent.mkdir(parents=True, exist_ok=True)
                password_file.write_text(password + "\n")
                password_file.chmod(0o600)
            user_model.objects.create_superuser(username=username, email="", password=password)
            self.stdout.write(f"admin: created user {username!r}")
        elif password and not user.check_password(password):
            user.set_password(password)
            user.save(update_fields=["password"])
            self.stdout.write(f"admin: password of {username!r} set from DJANGO_SUPERUSER_PASSWORD")
