"""App config of governance: API keys, rate limits, usage accounting, metrics."""

from django.apps import AppConfig


class GovernanceConfig(AppConfig):
    """Connects the key change signal."""

    default_auto_field = "django.db.models.BigAutoField"
    name = "governance"
    verbose_name = "Keys and usage"

    def ready(self) -> None:
        """Bump the key registry version on every key change."""
        from governance import signals  # noqa: F401
