"""The class `Model` became `ServedModel` (migration backends.0012): groups keep their rights, people still see
"model" and "models" (admin, API schema), only the admin URL and the permission codenames follow the class."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
from django.apps import apps
from django.contrib.auth.models import Group, Permission, User
from django.contrib.contenttypes.models import ContentType
from django.db import connection
from django.test import Client
from drf_spectacular.generators import SchemaGenerator

from backends.models import ServedModel

rename = importlib.import_module("backends.migrations.0012_rename_model_servedmodel")

pytestmark = pytest.mark.django_db

ACTIONS = ("add", "change", "delete", "view")
EDITOR = SimpleNamespace(connection=connection)  # what RunPython hands over: its connection is all the step reads


def codenames(content_type: ContentType) -> set[str]:
    return set(Permission.objects.filter(content_type=content_type).values_list("codename", flat=True))


@pytest.fixture
def content_type() -> ContentType:
    """The model's content type, its permissions named as before the rename (`change_model`, ...)."""
    content_type = ContentType.objects.get_for_model(ServedModel)
    for action in ACTIONS:
        Permission.objects.filter(content_type=content_type, codename=f"{action}_servedmodel").update(
            codename=f"{action}_model"
        )
    return content_type


@pytest.fixture
def operator(content_type: ContentType) -> User:
    """A user whose group may view and change models (under the old codenames)."""
    group = Group.objects.create(name="operators")
    group.permissions.set(
        Permission.objects.filter(content_type=content_type, codename__in=["view_model", "change_model"])
    )
    user = User.objects.create_user("operator", password="unused-password")
    user.groups.add(group)
    return user


def test_the_rename_keeps_a_groups_rights(content_type: ContentType, operator: User) -> None:
    # given a group that held backends.view_model and backends.change_model
    # when the migration's permission step runs
    rename.forwards(apps, EDITOR)
    # then the same rows are now the new codenames, and the group holds them
    assert codenames(content_type) == {f"{action}_servedmodel" for action in ACTIONS}
    user = User.objects.get(pk=operator.pk)  # a fresh permission cache
    assert user.has_perm("backends.view_servedmodel") and user.has_perm("backends.change_servedmodel")
    assert not user.has_perm("backends.delete_servedmodel")
    assert Permission.objects.get(content_type=content_type, codename="change_servedmodel").name == "Can change model"


def test_the_permission_step_is_reversible(content_type: ContentType, operator: User) -> None:
    # given the rename applied
    rename.forwards(apps, EDITOR)
    # when it is reversed
    rename.backwards(apps, EDITOR)
    # then the codenames are the old ones again, still held by the group
    assert codenames(content_type) == {f"{action}_model" for action in ACTIONS}
    assert User.objects.get(pk=operator.pk).has_perm("backends.change_model")


def test_people_still_see_models(admin_client: Client) -> None:
    # the admin's index names the section "Models", at the URL that follows the class
    page = admin_client.get("/admin/").content.decode()
    assert '<a href="/admin/backends/servedmodel/">Models</a>' in page
    assert "Select model to change" in admin_client.get("/admin/backends/servedmodel/").content.decode()
    # the API schema keeps its component names
    schemas = SchemaGenerator().get_schema(request=None, public=True)["components"]["schemas"]
    assert {"Model", "PatchedModel"} <= set(schemas) and "ServedModel" not in schemas
