"""The management API's common policy (`/api/`): who may do what, and how refused deletions are answered.

Permissions follow Django admin: the master key (`ROUTER_MASTER_KEY` as a bearer token) may do everything; a
session user must be active staff *and* hold the model permission of the action, as admin requires:

| action                                   | permission          |
|------------------------------------------|---------------------|
| list, retrieve, any GET (`report`, usage)| `view_<model>`      |
| create                                   | `add_<model>`       |
| update, partial_update                   | `change_<model>`    |
| destroy                                  | `delete_<model>`    |
| custom write actions (`probe`, `drain`, `undrain`, `rotate`, `revoke`) | `change_<model>` |

Superusers hold every permission. A view names its model by its queryset, or by `permission_model` when it has
none (the usage report: `governance.UsageRecord`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.db.models import Model, ProtectedError, RestrictedError
from rest_framework import status
from rest_framework.permissions import SAFE_METHODS, BasePermission
from rest_framework.request import Request
from rest_framework.response import Response

from governance.auth import Principal

if TYPE_CHECKING:  # rest_framework.views imports this module while it loads its settings
    from rest_framework.views import APIView

_ACTION_PERMS = {
    "list": "view",
    "retrieve": "view",
    "create": "add",
    "update": "change",
    "partial_update": "change",
    "destroy": "delete",
}


def required_permission(view: APIView, request: Request) -> str | None:
    """The `<app_label>.<action>_<model>` permission the request needs, or None when the view names no model."""
    model: type[Model] | None = getattr(view, "permission_model", None)
    if model is None:
        queryset = getattr(view, "queryset", None)
        model = queryset.model if queryset is not None else None
    if model is None:
        return None
    action = getattr(view, "action", None)
    kind = _ACTION_PERMS.get(action or "") or ("view" if request.method in SAFE_METHODS else "change")
    return f"{model._meta.app_label}.{kind}_{model._meta.model_name}"


class ManagementPermission(BasePermission):
    """The master key; or an active staff session with the action's model permission (see the module's table)."""

    message = "You do not have permission to perform this action (it needs the model permission, as in admin)."

    def has_permission(self, request: Request, view: APIView) -> bool:
        """Master key: yes. Session: active staff holding the required permission; a view without a model: no."""
        if isinstance(request.auth, Principal) and request.auth.is_master:
            return True
        user = request.user
        if not (user and user.is_authenticated and user.is_active and user.is_staff):
            return False
        perm = required_permission(view, request)
        return perm is not None and user.has_perm(perm)


def api_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's handler, plus: a deletion that other rows prevent (PROTECT/RESTRICT) answers 409 with the reason."""
    from rest_framework.views import exception_handler

    if isinstance(exc, ProtectedError | RestrictedError):
        blocking = exc.protected_objects if isinstance(exc, ProtectedError) else exc.restricted_objects
        names = sorted({str(obj) for obj in blocking})
        kinds = sorted({str(obj._meta.verbose_name_plural) for obj in blocking})
        shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
        return Response(
            {
                "detail": f"Cannot delete it: {' and '.join(kinds)} still use it ({shown}). Remove or move them first.",
                "code": "protected",
                "protected": names[:100],
            },
            status=status.HTTP_409_CONFLICT,
        )
    return exception_handler(exc, context)
