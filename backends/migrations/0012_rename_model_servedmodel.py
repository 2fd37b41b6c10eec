"""The model class `Model` becomes `ServedModel` (it shadowed Django's and DRF's `Model*` names in every file).

People still see "model"/"models" (admin, API paths, YAML): only the table (`backends_servedmodel`), the admin URL
(`/admin/backends/servedmodel/`) and the permission codenames (`add_servedmodel`, ...) follow the class. Django
renames the content type right after `RenameModel`; the step after it renames the content type's permissions, so
the groups and users that held `backends.change_model` hold `backends.change_servedmodel`, the same rows.
"""

from django.db import migrations

ACTIONS = ("add", "change", "delete", "view")
OLD, NEW = "model", "servedmodel"


def permissions_rename(apps, schema_editor, old, new):
    """Rename the `<action>_<old>` permissions of the model's content type (either name) to `<action>_<new>`."""
    ContentType = apps.get_model("contenttypes", "ContentType")
    Permission = apps.get_model("auth", "Permission")
    db = schema_editor.connection.alias
    content_types = ContentType.objects.using(db).filter(app_label="backends", model__in=(OLD, NEW))
    for action in ACTIONS:
        Permission.objects.using(db).filter(content_type__in=content_types, codename=f"{action}_{old}").update(
            codename=f"{action}_{new}"
        )


def forwards(apps, schema_editor):
    permissions_rename(apps, schema_editor, OLD, NEW)


def backwards(apps, schema_editor):
    permissions_rename(apps, schema_editor, NEW, OLD)


class Migration(migrations.Migration):
    dependencies = [
        ("auth", "0012_alter_user_first_name_max_length"),
        ("backends", "0011_checkcase_responses_seed"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [
        migrations.RenameModel(old_name="Model", new_name="ServedModel"),
        migrations.AlterModelOptions(
            name="servedmodel",
            options={"ordering": ["name"], "verbose_name": "model", "verbose_name_plural": "models"},
        ),
        migrations.RunPython(forwards, backwards),
    ]
