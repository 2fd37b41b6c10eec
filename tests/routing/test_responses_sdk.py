"""The Responses API with the official `openai` SDK against two live platform processes and two mock backends."""

from __future__ import annotations

import time
from collections.abc import Iterator

import openai
import pytest

from backends.mock_vllm import MockServer
from backends.models import Backend
from governance.services import api_key_create
from tests.conftest import MASTER_KEY
from tests.factories import backend_create, model_create, pool_create
from tests.live import PlatformProcess

CAPITAL = "In one word, can you provide me the capital of France?"

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def backends() -> Iterator[tuple[MockServer, MockServer]]:
    """Two mock vLLM servers on real ports, each with its own in-memory response store."""
    with (
        MockServer(models=["served-chat"], embed_models=["served-embed"]) as a,
        MockServer(models=["served-chat"], embed_models=["served-embed"]) as b,
    ):
        yield a, b


def _holder(backends: tuple[MockServer, MockServer]) -> MockServer:
    (holder,) = [m for m in backends if m.app.responses.store]
    return holder


def _eventually(predicate: object, timeout_s: float = 3.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_sdk_responses_across_two_processes_and_two_backends(backends: tuple[MockServer, MockServer]) -> None:
    # given a pool of two backends, a chat and an embedding model, and two keys
    pool = pool_create(name="resp-pool")
    rows = [backend_create(pool=pool, name=f"resp-{i}", base_url=m.url) for i, m in enumerate(backends)]
    model_create(pool=pool, name="chat-model", served_name="served-chat")
    model_create(pool=pool, name="embed-model", served_name="served-embed", kind="embedding")
    _, secret = api_key_create(name="resp-owner")
    _, other = api_key_create(name="resp-other")
    with PlatformProcess(master_key=MASTER_KEY) as one, PlatformProcess(master_key=MASTER_KEY) as two:
        first = openai.OpenAI(base_url=f"{one.url}/v1", api_key=secret, max_retries=0)
        second = openai.OpenAI(base_url=f"{two.url}/v1", api_key=secret, max_retries=0)

        # when the SDK creates a response in one process
        created = first.responses.create(model="chat-model", input=CAPITAL, temperature=0)
        # then it reads as OpenAI's, with the public model name and usage
        assert created.output_text == "Paris" and created.model == "chat-model" and created.status == "completed"
        assert created.usage is not None and created.usage.input_tokens > 0 and created.usage.output_tokens == 1
        holder = _holder(backends)
        assert created.id not in holder.app.responses.store  # the client's id is not vLLM's

        # and the other process retrieves it and continues the conversation on the backend that stores it
        retrieved = second.responses.retrieve(created.id)
        assert retrieved.id == created.id and retrieved.output_text == "Paris" and retrieved.model == "chat-model"
        served_before = holder.stats.total_requests
        follow = second.responses.create(model="chat-model", input="And of Italy?", previous_response_id=created.id)
        assert holder.stats.total_requests == served_before + 1
        assert follow.previous_response_id == created.id
        assert follow.usage is not None and follow.usage.input_tokens > created.usage.input_tokens

        # and a streamed response arrives as typed events, its id retrievable from the other process
        with first.responses.create(model="chat-model", input="Tell me a story", max_output_tokens=5, stream=True) as s:
            events = list(s)
        types = [e.type for e in events]
        assert types[0] == "response.created" and types[-1] == "response.completed"
        assert types.count("response.output_text.delta") == 5
        final = events[-1].response  # type: ignore[union-attr]
        assert final.model == "chat-model" and final.usage is not None and final.usage.output_tokens == 5
        assert second.responses.retrieve(final.id).status == "incomplete"

        # errors, each the SDK's own exception
        stranger = openai.OpenAI(base_url=f"{two.url}/v1", api_key=other, max_retries=0)
        with pytest.raises(openai.NotFoundError):
            stranger.responses.retrieve(created.id)
        with pytest.raises(openai.NotFoundError):
            second.responses.retrieve("resp_" + "f" * 40)
        with pytest.raises(openai.NotFoundError):
            first.responses.create(model="no-such-model", input="hi")
        with pytest.raises(openai.BadRequestError) as wrong_kind:
            first.responses.create(model="embed-model", input="hi")
        assert wrong_kind.value.code == "model_not_supported"
        with pytest.raises(openai.BadRequestError) as bad_input:
            first.responses.create(model="chat-model", input="hi", max_output_tokens=0)
        assert bad_input.value.param == "max_output_tokens"

        # and when the backend holding the response is disabled, both processes say it is gone
        row = Backend.objects.get(pk=rows[backends.index(holder)].pk)
        row.state = "disabled"
        row.save()

        def gone() -> bool:
            statuses = []
            for client in (first, second):
                try:
                    client.responses.retrieve(created.id)
                except openai.APIStatusError as exc:
                    statuses.append(exc.status_code)
            return statuses == [410, 410]

        assert _eventually(gone)
        with pytest.raises(openai.APIStatusError) as follow_up:
            second.responses.create(model="chat-model", input="more", previous_response_id=created.id)
        assert follow_up.value.status_code == 410
