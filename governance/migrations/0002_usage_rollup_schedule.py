"""Schedule the hourly usage rollup every 10 minutes, editable in admin through django-celery-beat."""

from django.db import migrations

TASK_NAME = "Roll up usage per hour"


def create_schedule(apps, schema_editor):
    IntervalSchedule = apps.get_model("django_celery_beat", "IntervalSchedule")
    PeriodicTask = apps.get_model("django_celery_beat", "PeriodicTask")
    interval, _ = IntervalSchedule.objects.get_or_create(every=10, period="minutes")
    PeriodicTask.objects.get_or_create(
        name=TASK_NAME,
        defaults={
            "task": "governance.usage_rollup",
            "interval": interval,
            "enabled": True,
            "description": "Rebuilds the hourly usage rows of the last hours (USAGE_ROLLUP_LOOKBACK_H) from the records.",
        },
    )


def remove_schedule(apps, schema_editor):
    apps.get_model("django_celery_beat", "PeriodicTask").objects.filter(name=TASK_NAME).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("governance", "0001_initial"),
        ("django_celery_beat", "0019_alter_periodictasks_options"),
    ]

    operations = [migrations.RunPython(create_schedule, remove_schedule)]
