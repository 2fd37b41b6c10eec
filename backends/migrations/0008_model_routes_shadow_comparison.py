"""Traffic splits and shadows between models (issue 17, items 3 and 4), and the shadow comparisons' hourly rollup."""

import django.core.validators
import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('backends', '0007_pool_priority_scheduling'),
    ]

    operations = [
        migrations.AddField(
            model_name='model',
            name='split_sticky_key',
            field=models.CharField(blank=True, default='', help_text='Traffic split stickiness: empty, each request is drawn at random by weight; "user" (the request\'s user field) or "header:<name>" (e.g. header:x-session-id): the same key always gets the same model. Requests without the key are drawn at random.', max_length=100),
        ),
        migrations.CreateModel(
            name='ShadowComparison',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('hour', models.DateTimeField()),
                ('primary', models.CharField(help_text='The model that answered the client.', max_length=200)),
                ('shadow', models.CharField(help_text='The model the request was mirrored to.', max_length=200)),
                ('mirrored', models.PositiveIntegerField(default=0, help_text='Shadow requests sent.')),
                ('errors', models.PositiveIntegerField(default=0, help_text='Shadow requests that failed (not 200).')),
                ('dropped', models.PositiveIntegerField(default=0, help_text='Mirrors dropped (queue full, no free slot).')),
                ('compared', models.PositiveIntegerField(default=0, help_text='Answers at temperature 0 whose texts were compared.')),
                ('matched', models.PositiveIntegerField(default=0, help_text='Of those, answers with the same text.')),
                ('primary_latency_ms_sum', models.FloatField(default=0.0)),
                ('shadow_latency_ms_sum', models.FloatField(default=0.0)),
                ('primary_completion_tokens', models.PositiveBigIntegerField(default=0)),
                ('shadow_completion_tokens', models.PositiveBigIntegerField(default=0)),
                ('prompt_tokens_delta', models.BigIntegerField(default=0, help_text='Sum of shadow minus primary prompt tokens.')),
            ],
            options={
                'ordering': ['-hour', 'primary', 'shadow'],
                'constraints': [models.UniqueConstraint(fields=('hour', 'primary', 'shadow'), name='unique_shadow_comparison_hour_pair')],
            },
        ),
        migrations.CreateModel(
            name='ModelRoute',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('kind', models.CharField(choices=[('split', 'Traffic split'), ('shadow', 'Shadow (mirror)')], max_length=8)),
                ('percent', models.FloatField(help_text="Share of the model's requests, in percent (0.01 to 100).", validators=[django.core.validators.MinValueValidator(0.01), django.core.validators.MaxValueValidator(100.0)])),
                ('model', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='routes', to='backends.model')),
                ('target', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='routed_from', to='backends.model')),
            ],
            options={
                'ordering': ['kind', 'target__name'],
                'constraints': [models.UniqueConstraint(fields=('model', 'kind', 'target'), name='unique_model_route')],
            },
        ),
    ]
