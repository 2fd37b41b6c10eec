"""Models get the `rerank` kind (cross-encoders serving /v1/rerank and /v1/score; issue 16, item 2)."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("backends", "0008_model_routes_shadow_comparison"),
    ]

    operations = [
        migrations.AlterField(
            model_name="model",
            name="kind",
            field=models.CharField(
                choices=[
                    ("chat", "Chat"),
                    ("completion", "Completion"),
                    ("embedding", "Embedding (also rerank/score as a bi-encoder)"),
                    ("rerank", "Rerank / score (cross-encoder)"),
                ],
                default="chat",
                help_text="Which endpoints the model serves: chat (chat and text completions), completion, embedding "
                "(embeddings, rerank, score) or rerank (a cross-encoder: rerank and score). Every kind serves "
                "/tokenize and /detokenize.",
                max_length=16,
            ),
        ),
    ]
