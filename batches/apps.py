from django.apps import AppConfig


class BatchesConfig(AppConfig):
    """The Batch API: uploaded JSONL files and batches run by Celery workers through the router's dispatcher."""

    default_auto_field = "django.db.models.BigAutoField"
    name = "batches"
    verbose_name = "Batches"
