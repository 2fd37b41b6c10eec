"""Structural request limits (counts checked before validation) and validation kept off the event loop."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from rest_framework import serializers

from backends.mock_vllm import MockVLLM
from routing.fastcheck import fast_valid_chat
from routing.gateway import Gateway
from routing.serializers import OFFLOAD_BYTES, RequestLimits, validate_request_offloaded
from tests.conftest import AUTH, usage_events
from tests.factories import backend_snap, registry_snap
from tests.routing.conftest import assert_openai_error

SMALL = RequestLimits(max_messages=4, max_tools=3, max_stop=2, max_content_parts=2, max_inputs=3)


def user(content: Any = "hi") -> dict[str, Any]:
    return {"role": "user", "content": content}


def tool(name: str = "f") -> dict[str, Any]:
    return {"type": "function", "function": {"name": name}}


def chat(**body: Any) -> dict[str, Any]:
    return {"model": "chat-model", "messages": [user()], **body}


@pytest.fixture
async def small_client(make_gateway: Callable[..., Gateway], mock_vllm: MockVLLM) -> AsyncIterator[httpx.AsyncClient]:
    """A client of a gateway with tiny limits (SMALL) in front of the in-process mock."""
    gateway = make_gateway(
        registry=registry_snap(backends=[backend_snap("b1", base_url="http://mock-a")]),
        transport=httpx.ASGITransport(app=mock_vllm),
        limits=SMALL,
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="http://router") as client:
        yield client


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", chat(messages=[user()] * 5), "messages"),
        ("/v1/chat/completions", chat(tools=[tool(str(i)) for i in range(4)]), "tools"),
        ("/v1/chat/completions", chat(stop=["a", "b", "c"]), "stop"),
        ("/v1/completions", {"model": "text-model", "prompt": "x", "stop": ["a", "b", "c"]}, "stop"),
        (
            "/v1/chat/completions",
            chat(messages=[user(), user([{"type": "text", "text": "a"}] * 3)]),
            "messages[1].content",
        ),
        (
            "/v1/chat/completions",
            chat(
                messages=[
                    user(),
                    {"role": "assistant", "content": None, "tool_calls": [{"id": str(i)} for i in range(3)]},
                ]
            ),
            "messages[1].tool_calls",
        ),
        ("/v1/completions", {"model": "text-model", "prompt": ["a", "b", "c", "d"]}, "prompt"),
        ("/v1/completions", {"model": "text-model", "prompt": [[1], [2], [3], [4]]}, "prompt"),
        ("/v1/embeddings", {"model": "embed-model", "input": ["a", "b", "c", "d"]}, "input"),
    ],
)
async def test_over_a_limit_is_400_naming_the_field(
    small_client: httpx.AsyncClient, path: str, body: dict[str, Any], param: str
) -> None:
    # given a gateway with small limits; when a body has one list over its limit
    response = await small_client.post(path, headers=AUTH, json=body)
    # then 400 in OpenAI's shape, naming the field, with OpenAI's code for an array too long
    error = assert_openai_error(response, 400, type="invalid_request_error", param=param, code="array_above_max_length")
    assert f"Invalid '{param}': array too long" in error["message"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", chat(messages=[user()] * 4, stop=["a", "b"])),
        ("/v1/chat/completions", chat(tools=[tool(str(i)) for i in range(3)])),
        ("/v1/chat/completions", chat(messages=[user([{"type": "text", "text": "a"}] * 2)])),
        ("/v1/completions", {"model": "text-model", "prompt": ["a", "b", "c"]}),
        ("/v1/completions", {"model": "text-model", "prompt": list(range(50))}),  # one tokenized prompt, not a batch
        ("/v1/embeddings", {"model": "embed-model", "input": ["a", "b", "c"]}),
    ],
)
async def test_at_the_limits_is_served(small_client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> None:
    # given a gateway with small limits; when every list is at (not over) its limit
    response = await small_client.post(path, headers=AUTH, json=body)
    # then the request is served
    assert response.status_code == 200, response.text


async def test_default_limits_refuse_the_issue_bodies(gateway_client: tuple[httpx.AsyncClient, Gateway]) -> None:
    # given the default limits; when the bodies of the issue arrive (90,000 tools, 115,000 messages)
    client, gateway = gateway_client
    tools = await client.post("/v1/chat/completions", headers=AUTH, json=chat(tools=[tool()] * 90_000))
    messages = await client.post("/v1/chat/completions", headers=AUTH, json=chat(messages=[user()] * 115_000))
    # then both are refused by their counts, and a usage record says so
    assert_openai_error(tools, 400, type="invalid_request_error", param="tools", code="array_above_max_length")
    assert_openai_error(messages, 400, type="invalid_request_error", param="messages", code="array_above_max_length")
    assert [e.status for e in usage_events(gateway)] == [400, 400]


def test_default_limits_are_the_documented_ones() -> None:
    # the defaults (docs/security.md "Client limits", .env.example) are sized for real agent traffic
    limits = RequestLimits()
    assert (limits.max_messages, limits.max_tools, limits.max_stop, limits.max_content_parts, limits.max_inputs) == (
        4096,
        256,
        64,
        256,
        2048,
    )


def test_settings_configure_the_limits(settings: Any) -> None:
    # given the limits set in the environment (through settings); then the gateway's limits follow them
    settings.ROUTER_MAX_MESSAGES, settings.ROUTER_MAX_TOOLS, settings.ROUTER_MAX_STOP = 10, 11, 12
    settings.ROUTER_MAX_CONTENT_PARTS, settings.ROUTER_MAX_INPUTS = 13, 14
    assert RequestLimits.from_settings() == RequestLimits(10, 11, 12, 13, 14)


def test_fast_check_does_not_walk_a_large_pass_through_value() -> None:
    # given a body of the common shape with a pass-through (vLLM) parameter holding a huge list
    body = chat(guided_choice=["x"] * 100_000)
    # when the fast check looks at it; then it defers to the serializers (which do not walk unknown parameters)
    # instead of visiting 100,000 items on the event loop
    assert fast_valid_chat(body) is False
    assert fast_valid_chat(chat(guided_choice=["x"] * 10)) is True


class _ThreadRecorder(serializers.Serializer):
    """A serializer that records the thread it validates on."""

    threads: list[int] = []

    model = serializers.CharField()

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        self.threads.append(threading.get_ident())
        return attrs


async def test_large_bodies_are_validated_in_a_worker_thread() -> None:
    # given a small and a large body that the serializers must validate
    _ThreadRecorder.threads = []
    loop_thread = threading.get_ident()
    await validate_request_offloaded(_ThreadRecorder, {"model": "m"}, RequestLimits(), size=100)
    await validate_request_offloaded(_ThreadRecorder, {"model": "m"}, RequestLimits(), size=OFFLOAD_BYTES + 1)
    # then the small one ran on the loop's thread (no hop), the large one elsewhere (the loop kept serving)
    assert _ThreadRecorder.threads[0] == loop_thread
    assert _ThreadRecorder.threads[1] != loop_thread


async def test_offloaded_validation_errors_are_api_errors(gateway_client: tuple[httpx.AsyncClient, Gateway]) -> None:
    # given a large body (validated in a worker thread) whose last message is invalid
    client, _ = gateway_client
    messages = [{"role": "tool", "content": "x" * 100, "tool_call_id": "c"}] * 400 + [{"role": "nobody"}]
    response = await client.post("/v1/chat/completions", headers=AUTH, json=chat(messages=messages))
    # then the error names the parameter, as on the loop
    assert_openai_error(response, 400, type="invalid_request_error", param="messages[400].role", code=None)
