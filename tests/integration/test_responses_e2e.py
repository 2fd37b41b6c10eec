"""The Responses API through the platform against a real vLLM: plain, streamed, stored and continued.

Storing needs the backends started with VLLM_ENABLE_RESPONSES_API_STORE=1 (scripts/real_backend.sh sets it);
vLLM otherwise ignores `store` and answers 404 for every retrieval.
"""

from __future__ import annotations

import openai
import pytest
from openai.types.responses import ResponseCompletedEvent, ResponseCreatedEvent, ResponseTextDeltaEvent

from tests.conftest import MASTER_KEY
from tests.integration.conftest import E2ERegistry, LatencyLog
from tests.live import PlatformProcess

pytestmark = pytest.mark.e2e

CAPITAL = "In one word, can you provide me the capital of France?"
SEED = 1234


def test_responses_plain_answers_paris(client: openai.OpenAI, e2e_registry: E2ERegistry, latency: LatencyLog) -> None:
    with latency.measure("responses json"):
        response = client.responses.create(
            model=e2e_registry.model, input=CAPITAL, temperature=0, max_output_tokens=50, store=False
        )
    assert "Paris" in response.output_text, response.output_text
    assert response.model == e2e_registry.model and response.id.startswith("resp_")
    usage = response.usage
    assert usage is not None and usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


def test_responses_streamed_events(client: openai.OpenAI, e2e_registry: E2ERegistry, latency: LatencyLog) -> None:
    with latency.measure("responses stream") as timing:
        events = []
        stream = client.responses.create(
            model=e2e_registry.model, input=CAPITAL, temperature=0, max_output_tokens=50, stream=True, store=False
        )
        for event in stream:
            if event.type == "response.output_text.delta":
                timing.first_token()
            events.append(event)
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    text = "".join(e.delta for e in events if isinstance(e, ResponseTextDeltaEvent))
    completed = events[-1]
    assert isinstance(completed, ResponseCompletedEvent)
    final = completed.response
    assert "Paris" in text and final.output_text == text
    models = {e.response.model for e in events if isinstance(e, ResponseCreatedEvent | ResponseCompletedEvent)}
    assert models == {e2e_registry.model}
    assert final.usage is not None and final.usage.output_tokens > 0


def test_responses_stored_retrieved_and_continued_from_another_process(
    client: openai.OpenAI, e2e_registry: E2ERegistry, platform: PlatformProcess
) -> None:
    created = client.responses.create(
        model=e2e_registry.model, input=CAPITAL, temperature=0, max_output_tokens=50, extra_body={"seed": SEED}
    )
    with PlatformProcess(master_key=MASTER_KEY) as other:
        sdk = openai.OpenAI(base_url=f"{other.url}/v1", api_key=MASTER_KEY, max_retries=0, timeout=120.0)
        try:
            retrieved = sdk.responses.retrieve(created.id)
        except openai.NotFoundError:
            pytest.fail(
                "the vLLM backends did not store the response: start them with VLLM_ENABLE_RESPONSES_API_STORE=1 "
                "(scripts/real_backend.sh does; restart a pool started before that)",
                pytrace=False,
            )
        assert retrieved.id == created.id and retrieved.output_text == created.output_text
        assert retrieved.model == e2e_registry.model
        follow = sdk.responses.create(
            model=e2e_registry.model,
            input="Repeat the name of that city.",
            previous_response_id=created.id,
            temperature=0,
            max_output_tokens=30,
        )
        assert follow.previous_response_id == created.id
        assert follow.usage is not None and created.usage is not None
        assert follow.usage.input_tokens > created.usage.input_tokens  # the first turn is part of the prompt
        with pytest.raises(openai.NotFoundError):
            sdk.responses.retrieve(created.id[:-5] + ("A" if created.id[-5] != "A" else "B") + created.id[-4:])
