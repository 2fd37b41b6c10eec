"""Create an API key; the secret is printed alone on the last line (for scripts) and never again."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from governance.priority import Priority
from governance.services import api_key_create


def _expiry(value: str) -> datetime:
    """An ISO date-time, or a duration like 30d / 12h."""
    if value[-1:] in {"d", "h"} and value[:-1].isdigit():
        amount = int(value[:-1])
        return timezone.now() + (timedelta(days=amount) if value.endswith("d") else timedelta(hours=amount))
    parsed = parse_datetime(value)
    if parsed is None:
        raise CommandError(f"--expires: {value!r} is neither an ISO date-time nor a duration like 30d or 12h.")
    return parsed if timezone.is_aware(parsed) else timezone.make_aware(parsed, UTC)


class Command(BaseCommand):
    """manage.py create_api_key --name N [--models M ...] [--rpm N] [--tpm N] [--daily-tokens N] [--expires ...]
    [--priority CLASS] [--max-priority CLASS] [--weight N]"""

    help = __doc__

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--name", required=True)
        parser.add_argument("--owner", help="Username of the key's owner.")
        parser.add_argument("--models", nargs="*", default=[], help="Allowed models (default: all).")
        parser.add_argument("--rpm", type=int, help="Requests per minute.")
        parser.add_argument("--tpm", type=int, help="Tokens per minute.")
        parser.add_argument("--daily-tokens", type=int, help="Token budget per UTC day.")
        parser.add_argument("--expires", type=str, help="ISO date-time or a duration such as 30d or 12h.")
        classes = [p.value for p in Priority]
        parser.add_argument(
            "--priority", choices=classes, default=Priority.STANDARD.value, help="Class of requests that name none."
        )
        parser.add_argument(
            "--max-priority",
            choices=classes,
            help="Highest class its requests may ask for (default: the --priority class).",
        )
        parser.add_argument("--weight", type=int, default=1, help="Share of a full pool against keys of its class.")

    def handle(self, *args: Any, **options: Any) -> None:
        owner = None
        if options["owner"]:
            owner = get_user_model().objects.filter(username=options["owner"]).first()
            if owner is None:
                raise CommandError(f"--owner: no user {options['owner']!r}.")
        models = [m for item in options["models"] for m in item.split(",") if m.strip()]
        try:
            key, secret = api_key_create(
                name=options["name"],
                owner=owner,
                allowed_models=[m.strip() for m in models],
                rpm_limit=options["rpm"],
                tpm_limit=options["tpm"],
                daily_token_budget=options["daily_tokens"],
                expires_at=_expiry(options["expires"]) if options["expires"] else None,
                priority_default=options["priority"],
                priority_max=options["max_priority"] or options["priority"],
                queue_weight=options["weight"],
            )
        except ValidationError as exc:
            raise CommandError("; ".join(f"{f}: {', '.join(m)}" for f, m in exc.message_dict.items())) from exc
        self.stderr.write(f"Created key {key.name!r} ({key.prefix}…); the secret below is shown only once.")
        self.stdout.write(secret)
