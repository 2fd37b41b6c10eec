"""Project package: settings, URLs, the ASGI application and the Celery app."""

from llm_platform.celery import app as celery_app

__all__ = ("celery_app",)
