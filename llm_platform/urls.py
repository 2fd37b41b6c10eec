"""URLs served by Django: admin and the management API (the /v1 API is served by routing.gateway)."""

from django.contrib import admin
from django.http import HttpRequest, JsonResponse
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.routers import DefaultRouter

from backends.api import BackendViewSet, GpuPoolViewSet, ServedModelViewSet
from backends.checks.api import CheckRunViewSet
from governance.api import UsageView
from governance.api_keys import ApiKeyViewSet

router = DefaultRouter(trailing_slash="/?")  # type: ignore[arg-type]  # a regex DRF accepts; the stubs say bool
router.register("pools", GpuPoolViewSet, basename="pool")
router.register("backends", BackendViewSet, basename="backend")
router.register("models", ServedModelViewSet, basename="model")
router.register("check-runs", CheckRunViewSet, basename="check-run")
router.register("keys", ApiKeyViewSet, basename="api-key")

urlpatterns = [
    path("admin/", admin.site.urls),
    # governance: usage report, OpenAPI schema and Swagger UI (self-hosted assets)
    re_path(r"^api/usage/?$", UsageView.as_view(), name="usage"),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="swagger-ui"),
    path("api/", include(router.urls)),
    # the Batch API: /v1/files and /v1/batches (the gateway hands these to Django)
    path("v1/", include("batches.urls")),
]

admin.site.site_header = "LLM routing platform"
admin.site.site_title = "LLM routing platform"
admin.site.index_title = "Registry and operations"


def _json_error(status: int, message: str, code: str) -> JsonResponse:
    return JsonResponse(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error" if status < 500 else "server_error",
                "param": None,
                "code": code,
            }
        },
        status=status,
    )


def handler404(request: HttpRequest, exception: Exception) -> JsonResponse:
    """Unknown URL outside admin pages: an OpenAI-shaped JSON 404, never an HTML page."""
    return _json_error(404, f"Unknown request URL: {request.method} {request.path}.", "unknown_url")


def handler500(request: HttpRequest) -> JsonResponse:
    """Unexpected error: JSON, never a traceback page (the traceback goes to the log)."""
    return _json_error(500, "Internal error.", "internal_error")
