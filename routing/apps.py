"""App config of the OpenAI-compatible API: dispatch, strategies, streaming."""

from django.apps import AppConfig


class RoutingConfig(AppConfig):
    """The router's hot path lives outside Django views (see routing.gateway)."""

    default_auto_field = "django.db.models.BigAutoField"
    name = "routing"
    verbose_name = "Routing"
