"""App config of the registry: pools, backends, models and their health."""

from django.apps import AppConfig


class BackendsConfig(AppConfig):
    """Wires the registry's change signal to saves and deletes."""

    default_auto_field = "django.db.models.BigAutoField"
    name = "backends"
    verbose_name = "GPU pools and backends"

    def ready(self) -> None:
        """Connect the signals that bump the registry version on every change."""
        from backends import signals  # noqa: F401
