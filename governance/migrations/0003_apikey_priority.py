"""Priority classes and fair queuing (issue 17): each key's default class, highest class and queue weight."""

import django.core.validators
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("governance", "0002_usage_rollup_schedule"),
    ]

    operations = [
        migrations.AddField(
            model_name="apikey",
            name="priority_default",
            field=models.CharField(
                choices=[("critical", "critical"), ("standard", "standard"), ("batch", "batch")],
                default="standard",
                help_text="Priority class of the key's requests that name none (x-priority header or the body's "
                "priority).",
                max_length=16,
            ),
        ),
        migrations.AddField(
            model_name="apikey",
            name="priority_max",
            field=models.CharField(
                choices=[("critical", "critical"), ("standard", "standard"), ("batch", "batch")],
                default="standard",
                help_text="Highest class the key's requests may ask for; a request asking for more runs in this one.",
                max_length=16,
            ),
        ),
        migrations.AddField(
            model_name="apikey",
            name="queue_weight",
            field=models.PositiveIntegerField(
                default=1,
                help_text="Share of a full pool's slots against other keys waiting in the same class (2: twice a key "
                "of 1).",
                validators=[
                    django.core.validators.MinValueValidator(1),
                    django.core.validators.MaxValueValidator(1000),
                ],
            ),
        ),
    ]
