"""App config of the registry: pools, backends, models and their health."""

from django.apps import AppConfig


class BackendsConfig(AppConfig):
    """Wires the registry's change signal to saves and deletes."""

    default_auto_field = "django.db.models.BigAutoField"
    name = "backends"
    verbose_name = "GPU pools and backends"

    def ready(self) -> None:
        """Connect the signals that bump the registry version on every change; register the checks' admin pages.

        The checks' admin extends the registry's (backends.admin) and is loaded from here, not from backends.admin,
        so that the two modules do not import each other (docs/architecture.md).
        """
        from backends import (
            signals,  # noqa: F401
            tasks,  # noqa: F401 - registers the Celery tasks that checks.services queues by name
        )
        from backends.metrics import BackendStateCollector
        from core.metrics import scrape_collector_register

        scrape_collector_register(name="backends", factory=BackendStateCollector)
        from backends.checks import admin as checks_admin  # noqa: F401
