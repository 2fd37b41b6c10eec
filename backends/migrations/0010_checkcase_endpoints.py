"""Check cases learn the endpoint they call (chat, Responses API, rerank) and rerank's query and documents; a seeded
rerank case for pooling models, where the relevant document must come first.

Schema written for Django 5.2 (as makemigrations writes it); the data part is written by hand.
"""

from django.db import migrations, models

CAPITAL_DOCUMENT = "Paris is the capital and largest city of France."
SEEDED_CASES = [
    {
        "name": "rerank-capital-of-france",
        "description": "Pooling models: /v1/rerank must rank the document that answers the query first.",
        "endpoint": "rerank",
        "messages": [],
        "query": "What is the capital of France?",
        "documents": [
            "Bananas are a good source of potassium.",
            CAPITAL_DOCUMENT,
            "The Great Wall of China is thousands of kilometres long.",
            "Berlin is the capital of Germany.",
        ],
        "temperature": None,
        "max_tokens": None,
        "stream": False,
        "extra_params": {},
        "expectation": "equals",
        "expected_text": CAPITAL_DOCUMENT,
        "case_sensitive": True,
    },
]


def seed(apps, schema_editor):
    CheckCase = apps.get_model("backends", "CheckCase")
    for fields in SEEDED_CASES:
        CheckCase.objects.get_or_create(name=fields["name"], defaults={k: v for k, v in fields.items() if k != "name"})


def unseed(apps, schema_editor):
    apps.get_model("backends", "CheckCase").objects.filter(name__in=[c["name"] for c in SEEDED_CASES]).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("backends", "0009_model_kind_rerank"),
    ]

    operations = [
        migrations.AddField(
            model_name="checkcase",
            name="endpoint",
            field=models.CharField(
                choices=[
                    ("chat", "/v1/chat/completions (chat models)"),
                    ("responses", "/v1/responses (chat models)"),
                    ("rerank", "/v1/rerank (pooling models)"),
                ],
                default="chat",
                help_text="Chat and Responses cases apply to chat models, rerank cases to pooling (embedding) models.",
                max_length=16,
            ),
        ),
        migrations.AddField(
            model_name="checkcase",
            name="query",
            field=models.TextField(blank=True, help_text="Rerank: the query."),
        ),
        migrations.AddField(
            model_name="checkcase",
            name="documents",
            field=models.JSONField(
                blank=True,
                default=list,
                help_text="Rerank: the documents to rank (a list of at most 100 strings); the answer judged is the "
                "text of the document ranked first.",
            ),
        ),
        migrations.AlterField(
            model_name="checkcase",
            name="messages",
            field=models.JSONField(
                blank=True,
                default=list,
                help_text='Chat / Responses: OpenAI chat messages, e.g. [{"role": "user", "content": "..."}] (the '
                "Responses API's `input`).",
            ),
        ),
        migrations.AlterField(
            model_name="checkcase",
            name="models",
            field=models.ManyToManyField(
                blank=True,
                help_text="Models this case applies to; none selected: every enabled model its endpoint serves (chat "
                "models for chat and Responses cases, pooling models for rerank cases).",
                related_name="check_cases",
                to="backends.model",
            ),
        ),
        migrations.RunPython(seed, unseed),
    ]
