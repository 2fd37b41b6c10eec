"""URLs of the Batch API (mounted at /v1/ by llm_platform.urls; the gateway hands /v1/files and /v1/batches to
Django)."""

from django.urls import re_path

from batches import api

urlpatterns = [
    re_path(r"^files/?$", api.FilesView.as_view(), name="batch-files"),
    re_path(r"^files/(?P<file_id>[^/]+)/content/?$", api.FileContentView.as_view(), name="batch-file-content"),
    re_path(r"^files/(?P<file_id>[^/]+)/?$", api.FileView.as_view(), name="batch-file"),
    re_path(r"^batches/?$", api.BatchesView.as_view(), name="batches"),
    re_path(r"^batches/(?P<batch_id>[^/]+)/cancel/?$", api.BatchCancelView.as_view(), name="batch-cancel"),
    re_path(r"^batches/(?P<batch_id>[^/]+)/?$", api.BatchView.as_view(), name="batch"),
]
