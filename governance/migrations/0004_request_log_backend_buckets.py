"""The request log (trace id, queue wait, attempts and retry history on usage records) and the per-backend
5-minute traffic buckets read by the operations dashboard."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("governance", "0003_apikey_priority"),
    ]

    operations = [
        migrations.AlterField(
            model_name="usagerecord",
            name="ttft_ms",
            field=models.FloatField(blank=True, help_text="Time to first token (streams), ms.", null=True),
        ),
        migrations.AddField(
            model_name="usagerecord",
            name="trace_id",
            field=models.CharField(
                blank=True,
                help_text="OpenTelemetry trace id (32 hex digits) when tracing is on.",
                max_length=32,
                null=True,
            ),
        ),
        migrations.AddField(
            model_name="usagerecord",
            name="queue_wait_ms",
            field=models.FloatField(
                blank=True, help_text="Time waited for a free backend slot, ms (empty: never dispatched).", null=True
            ),
        ),
        migrations.AddField(
            model_name="usagerecord",
            name="attempts",
            field=models.PositiveSmallIntegerField(default=0, help_text="Backends tried (1: no retry)."),
        ),
        migrations.AddField(
            model_name="usagerecord",
            name="retry_history",
            field=models.JSONField(
                blank=True, default=list, help_text="[backend, reason] of each failed attempt, in order."
            ),
        ),
        migrations.CreateModel(
            name="UsageBackendBucket",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("bucket", models.DateTimeField(help_text="Start of the 5-minute bucket (UTC).")),
                ("backend", models.CharField(blank=True, max_length=100)),
                ("requests", models.PositiveIntegerField(default=0, help_text="Requests answered through this backend.")),
                ("errors", models.PositiveIntegerField(default=0, help_text="Of which ended with a 5xx.")),
                ("client_errors", models.PositiveIntegerField(default=0, help_text="Of which ended with a 4xx.")),
                (
                    "failed_attempts",
                    models.PositiveIntegerField(default=0, help_text="Attempts on it that failed and were retried."),
                ),
                ("prompt_tokens", models.PositiveBigIntegerField(default=0)),
                ("completion_tokens", models.PositiveBigIntegerField(default=0)),
                ("latency_ms_sum", models.FloatField(default=0.0)),
                ("queue_wait_ms_sum", models.FloatField(default=0.0)),
                ("ttft_count", models.PositiveIntegerField(default=0)),
                ("ttft_ms_sum", models.FloatField(default=0.0)),
                ("ttft_h0", models.PositiveIntegerField(default=0, help_text="TTFT ≤ 50 ms.")),
                ("ttft_h1", models.PositiveIntegerField(default=0, help_text="TTFT ≤ 100 ms.")),
                ("ttft_h2", models.PositiveIntegerField(default=0, help_text="TTFT ≤ 200 ms.")),
                ("ttft_h3", models.PositiveIntegerField(default=0, help_text="TTFT ≤ 350 ms.")),
                ("ttft_h4", models.PositiveIntegerField(default=0, help_text="TTFT ≤ 500 ms.")),
                ("ttft_h5", models.PositiveIntegerField(default=0, help_text="TTFT ≤ 750 ms.")),
                ("ttft_h6", models.PositiveIntegerField(default=0, help_text="TTFT ≤ 1000 ms.")),
                ("ttft_h7", models.PositiveIntegerField(default=0, help_text="TTFT ≤ 1500 ms.")),
                ("ttft_h8", models.PositiveIntegerField(default=0, help_text="TTFT ≤ 2500 ms.")),
                ("ttft_h9", models.PositiveIntegerField(default=0, help_text="TTFT ≤ 5000 ms.")),
                ("ttft_h10", models.PositiveIntegerField(default=0, help_text="TTFT ≤ 10000 ms.")),
                ("ttft_h11", models.PositiveIntegerField(default=0, help_text="TTFT > 10000 ms.")),
            ],
            options={
                "verbose_name": "backend traffic (5 min)",
                "verbose_name_plural": "backend traffic (5 min)",
                "ordering": ["-bucket", "backend"],
                "constraints": [
                    models.UniqueConstraint(fields=("bucket", "backend"), name="unique_usage_bucket_backend")
                ],
            },
        ),
    ]
