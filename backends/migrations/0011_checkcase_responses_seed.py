"""The seeded Responses API case: the capital of France through /v1/responses (the bundled mock serves it too)."""

from django.db import migrations

CAPITAL_QUESTION = [{"role": "user", "content": "In one word, can you provide me the capital of France?"}]
SEEDED_CASES = [
    {
        "name": "capital-of-france-responses",
        "description": "The seed's critical question through the Responses API (/v1/responses, not stored).",
        "endpoint": "responses",
        "messages": CAPITAL_QUESTION,
        "temperature": 0.1,
        "max_tokens": 50,
        "stream": False,
        "extra_params": {"seed": 1},
        "expectation": "contains",
        "expected_text": "Paris",
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
        ("backends", "0010_checkcase_endpoints"),
    ]

    operations = [migrations.RunPython(seed, unseed)]
