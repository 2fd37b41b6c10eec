"""Embeddings through the platform against a real vLLM pooling server."""

from __future__ import annotations

import math

import openai
import pytest

from tests.integration.conftest import E2ERegistry, LatencyLog

pytestmark = pytest.mark.e2e


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_similar_sentences_are_closer_than_unrelated_ones(
    client: openai.OpenAI, e2e_registry: E2ERegistry, latency: LatencyLog
) -> None:
    if e2e_registry.embed_model is None:
        pytest.skip("VLLM_EMBED_URL is not set: no embedding model to test")
    texts = [
        "The cat is sleeping on the sofa.",
        "A kitten naps on the couch.",
        "Quarterly revenue grew by eight percent.",
    ]
    # when three sentences are embedded in one call through the platform
    with latency.measure("embeddings x3"):
        response = client.embeddings.create(model=e2e_registry.embed_model, input=texts)
    vectors = [d.embedding for d in sorted(response.data, key=lambda d: d.index)]
    # then the answer is complete, under the public model name
    assert response.model == e2e_registry.embed_model
    assert len(vectors) == 3 and len({len(v) for v in vectors}) == 1 and len(vectors[0]) > 0
    # and the two sentences about a cat on a sofa are closer to each other than either is to the revenue one
    similar = _cosine(vectors[0], vectors[1])
    assert similar > _cosine(vectors[0], vectors[2])
    assert similar > _cosine(vectors[1], vectors[2])
