"""Management API (DRF) for the registry: the master key, or a staff session holding the model permission of the
action (llm_platform/api.py); same validation as admin."""

from __future__ import annotations

from django.db import transaction
from rest_framework import viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from backends.models import Backend, BackendState, GpuPool, ServedModel
from backends.serializers import BackendSerializer, GpuPoolSerializer, ServedModelSerializer
from backends.services import backend_probe_many, backend_state_set, model_routes_replace


class GpuPoolViewSet(viewsets.ModelViewSet):
    """CRUD for GPU pools."""

    queryset = GpuPool.objects.prefetch_related("backends")
    serializer_class = GpuPoolSerializer
    lookup_field = "name"


class BackendViewSet(viewsets.ModelViewSet):
    """CRUD for backends, plus probe and drain actions."""

    queryset = Backend.objects.select_related("pool")
    serializer_class = BackendSerializer
    lookup_field = "name"

    @action(detail=True, methods=["post"])
    def probe(self, request: Request, name: str | None = None) -> Response:
        """Probe the backend now and return the stored result."""
        backend = self.get_object()
        backend_probe_many(backends=[backend])
        return Response(self.get_serializer(backend).data)

    @action(detail=True, methods=["post"])
    def drain(self, request: Request, name: str | None = None) -> Response:
        """Take no new requests on this backend."""
        backend = self.get_object()
        backend_state_set(backends=[backend], state=BackendState.DRAINING)
        backend.refresh_from_db()
        return Response(self.get_serializer(backend).data)

    @action(detail=True, methods=["post"])
    def undrain(self, request: Request, name: str | None = None) -> Response:
        """Put the backend back in rotation."""
        backend = self.get_object()
        backend_state_set(backends=[backend], state=BackendState.ENABLED)
        backend.refresh_from_db()
        return Response(self.get_serializer(backend).data)


class ServedModelViewSet(viewsets.ModelViewSet):
    """CRUD for models."""

    queryset = ServedModel.objects.select_related("pool").prefetch_related("fallbacks__pool", "routes__target")
    serializer_class = ServedModelSerializer
    lookup_field = "name"
    lookup_value_regex = "[^/]+"

    def perform_create(self, serializer: ServedModelSerializer) -> None:  # type: ignore[override]
        with transaction.atomic():
            model = serializer.save()
            self._routes_apply(model, serializer)

    def perform_update(self, serializer: ServedModelSerializer) -> None:  # type: ignore[override]
        with transaction.atomic():
            model = serializer.save()
            self._routes_apply(model, serializer)

    @staticmethod
    def _routes_apply(model: ServedModel, serializer: ServedModelSerializer) -> None:
        """Replace the traffic split and shadows the request gave (the others are left as they are)."""
        for kind, entries in serializer.routes_given.items():
            model_routes_replace(model=model, kind=kind, entries=entries)
