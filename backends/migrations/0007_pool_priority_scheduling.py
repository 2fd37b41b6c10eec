"""Pools whose vLLM servers run the priority scheduler receive each request's class as vLLM's `priority` (issue 17)."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("backends", "0006_backend_api_key_model_unavailable_reason"),
    ]

    operations = [
        migrations.AddField(
            model_name="gpupool",
            name="priority_scheduling",
            field=models.BooleanField(
                default=False,
                help_text="The pool's vLLM servers run with --scheduling-policy priority: each request's priority "
                "class is sent as vLLM's `priority` (critical -10, standard 0, batch 10). Off: the field is removed "
                "from requests.",
            ),
        ),
    ]
