"""Backend API keys must be valid header values (issue 14, item 4); models get the probe's `unavailable_reason`
(item 16). Stored keys lose the whitespace a secret file added around them (a trailing newline), and error texts
that quote a key (an earlier probe or check run wrote them) lose it; a key that is still not a header value is
left alone: the probe marks its backend unhealthy and the router skips it."""

from django.db import migrations, models

import backends.models


def strip_api_keys(apps, schema_editor):
    """Strip stored keys, and remove any key that an earlier probe or check run wrote into an error text."""
    Backend = apps.get_model("backends", "Backend")
    CheckResult = apps.get_model("backends", "CheckResult")
    for backend in Backend.objects.exclude(api_key=""):
        key = backends.models.normalize_api_key(backend.api_key)
        if key != backend.api_key:
            Backend.objects.filter(pk=backend.pk).update(api_key=key)
        if not key:
            continue
        if key in backend.last_error:
            Backend.objects.filter(pk=backend.pk).update(last_error=backend.last_error.replace(key, "***"))
        for result in CheckResult.objects.filter(backend_id=backend.pk, error__contains=key).only("pk", "error"):
            CheckResult.objects.filter(pk=result.pk).update(error=result.error.replace(key, "***"))


class Migration(migrations.Migration):
    dependencies = [
        ("backends", "0005_pool_strategy_prefix_aware"),
    ]

    operations = [
        migrations.AddField(
            model_name="model",
            name="unavailable_reason",
            field=models.CharField(
                blank=True,
                help_text="Set by the health probe when no backend of the pool lists the model at /v1/models; "
                "the router then neither lists nor routes it. Empty: served.",
                max_length=500,
            ),
        ),
        migrations.AlterField(
            model_name="backend",
            name="api_key",
            field=models.CharField(
                blank=True,
                help_text="Bearer key the backend expects, if any. Write-only. Surrounding whitespace is removed.",
                max_length=500,
                validators=[backends.models.validate_api_key],
            ),
        ),
        migrations.RunPython(strip_api_keys, migrations.RunPython.noop),
    ]
