"""The fast pre-check never accepts a body the DRF serializers reject, and does accept the common bodies."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routing.errors import APIError
from routing.fastcheck import fast_valid_chat, fast_valid_completion, fast_valid_embedding
from routing.serializers import (
    ChatCompletionRequestSerializer,
    CompletionRequestSerializer,
    EmbeddingRequestSerializer,
    validate_request,
)
from tests.routing.test_fuzz import CHAT, COMPLETIONS, EMBEDDINGS, valid_requests, wrong_values

CHECKS = {
    CHAT: (fast_valid_chat, ChatCompletionRequestSerializer),
    COMPLETIONS: (fast_valid_completion, CompletionRequestSerializer),
    EMBEDDINGS: (fast_valid_embedding, EmbeddingRequestSerializer),
}
PARITY = settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))


def _drf_accepts(path: str, body: dict[str, Any]) -> bool:
    try:
        validate_request(CHECKS[path][1], body)
    except APIError:
        return False
    return True


def _assert_parity(path: str, body: dict[str, Any]) -> None:
    body = orjson.loads(orjson.dumps(body))  # exactly what the gateway sees after parsing
    if CHECKS[path][0](body):
        assert _drf_accepts(path, body), f"fast check accepted a body DRF rejects: {body!r}"


@PARITY
@given(data=st.data(), path=st.sampled_from(sorted(CHECKS)))
def test_valid_bodies(data: st.DataObject, path: str) -> None:
    _assert_parity(path, data.draw(valid_requests(path)))


@PARITY
@given(data=st.data(), path=st.sampled_from(sorted(CHECKS)), count=st.integers(1, 3))
def test_corrupted_bodies(data: st.DataObject, path: str, count: int) -> None:
    body = data.draw(valid_requests(path))
    keys = st.sampled_from(
        sorted(
            {
                *body,
                "model",
                "messages",
                "prompt",
                "input",
                "temperature",
                "top_p",
                "max_tokens",
                "n",
                "stop",
                "seed",
                "stream",
                "stream_options",
                "user",
                "presence_penalty",
                "frequency_penalty",
                "max_completion_tokens",
            }
        )
    )
    try:
        body.update(data.draw(st.dictionaries(keys, wrong_values, min_size=count, max_size=count)))
        orjson.dumps(body)
    except (TypeError, orjson.JSONEncodeError):
        return  # not something the gateway could receive
    _assert_parity(path, body)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (CHAT, {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}),
        (
            CHAT,
            {
                "model": "m",
                "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
                "stream": True,
                "stream_options": {"include_usage": True},
                "top_k": 5,
                "user": "u1",
            },
        ),
        (COMPLETIONS, {"model": "m", "prompt": "Hello", "max_tokens": 8, "stop": ["\n"]}),
        (EMBEDDINGS, {"model": "m", "input": ["a", "b"]}),
    ],
)
def test_common_bodies_take_the_fast_path(path: str, body: dict[str, Any]) -> None:
    assert CHECKS[path][0](body) and _drf_accepts(path, body)
