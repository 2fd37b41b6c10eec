"""Management API of the checks (master key, or staff with the checkrun permissions): start a run, read results."""

from __future__ import annotations

from django.http import HttpResponse
from django.urls import reverse
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.serializers import BaseSerializer

from backends.checks.models import CheckRun, RunTrigger
from backends.checks.report import run_markdown
from backends.checks.serializers import CheckRunDetailSerializer, CheckRunSerializer, CheckRunStartSerializer
from backends.checks.services import check_run_start


def _who(request: Request) -> str:
    """The master key or the staff user's name (the key's Principal is duck-typed: backends sit below governance)."""
    key_name = getattr(request.auth, "name", None)
    if isinstance(key_name, str):
        return f"{key_name} key"
    return getattr(request.user, "get_username", lambda: "")() or "api"


class CheckRunViewSet(
    mixins.CreateModelMixin, mixins.RetrieveModelMixin, mixins.ListModelMixin, viewsets.GenericViewSet
):
    """POST starts a run (202, the worker executes it); GET lists runs or returns one with its results."""

    queryset = CheckRun.objects.all()

    def get_serializer_class(self) -> type[BaseSerializer]:
        """Start schema for POST, the run with its results for one run, the summary for lists."""
        if self.action == "create":
            return CheckRunStartSerializer
        if self.action == "retrieve":
            return CheckRunDetailSerializer
        return CheckRunSerializer

    def create(self, request: Request) -> Response:
        """Queue a run (optionally limited to `model` / `backend`) and return its id at once."""
        start = CheckRunStartSerializer(data=request.data)
        start.is_valid(raise_exception=True)
        run = check_run_start(
            trigger=RunTrigger.API,
            triggered_by=_who(request),
            model_names=start.validated_data["model"],
            backend_names=start.validated_data["backend"],
        )
        location = request.build_absolute_uri(reverse("check-run-detail", args=[run.pk]))
        return Response(CheckRunSerializer(run).data, status=status.HTTP_202_ACCEPTED, headers={"Location": location})

    @action(detail=True, methods=["get"])
    def report(self, request: Request, pk: str | None = None) -> HttpResponse:
        """The run's Markdown summary."""
        return HttpResponse(run_markdown(run=self.get_object()), content_type="text/markdown; charset=utf-8")
