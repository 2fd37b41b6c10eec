"""Every error the /v1 gateway answers, in-process: status, OpenAI error shape (type, param, code), JSON only."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
import pytest

from backends.mock_vllm import MockServer, MockVLLM
from routing.gateway import Gateway
from tests.conftest import AUTH
from tests.factories import backend_snap, registry_snap
from tests.routing.conftest import HostRouter, assert_openai_error

Client = tuple[httpx.AsyncClient, Gateway]
CHAT = "/v1/chat/completions"
REFUSED = "http://127.0.0.1:9"  # the discard port: nothing listens there, connecting is refused at once


def chat_body(**fields: Any) -> dict[str, Any]:
    """A valid chat request with some fields changed (a value of `...` removes the field)."""
    body: dict[str, Any] = {"model": "chat-model", "messages": [{"role": "user", "content": "Hello"}]}
    body.update(fields)
    return {k: v for k, v in body.items() if v is not ...}


@asynccontextmanager
async def client_for(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client talking in-process to the gateway."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="http://router") as client:
        yield client
    await gateway.dispatcher.aclose()


def two_backends(make_gateway: Callable[..., Gateway], apps: dict[str, Any], **options: Any) -> Gateway:
    """A gateway whose pool holds b1 at http://host-a and b2 at http://host-b, routed by host to `apps`."""
    registry = registry_snap(
        backends=[backend_snap("b1", base_url="http://host-a"), backend_snap("b2", base_url="http://host-b")]
    )
    return make_gateway(registry=registry, transport=HostRouter(apps), **options)


# --- body parsing ------------------------------------------------------------------------------------------------


async def test_invalid_json_is_400(gateway_client: Client) -> None:
    """A body that is not JSON at all."""
    client, _ = gateway_client
    response = await client.post(CHAT, headers={**AUTH, "content-type": "application/json"}, content=b'{"model": ')
    assert_openai_error(response, 400, type="invalid_request_error", param=None, code="invalid_json")


@pytest.mark.parametrize("raw", [b"[]", b'[{"model": "chat-model"}]', b'"chat-model"', b"42", b"1.5", b"null", b"true"])
async def test_json_that_is_not_an_object_is_400(gateway_client: Client, raw: bytes) -> None:
    """JSON arrays, strings, numbers, null and booleans are not request bodies."""
    client, _ = gateway_client
    response = await client.post(CHAT, headers={**AUTH, "content-type": "application/json"}, content=raw)
    assert_openai_error(response, 400, type="invalid_request_error", param=None, code="invalid_body")


async def test_empty_body_is_invalid_json(gateway_client: Client) -> None:
    """An empty body is not JSON."""
    client, _ = gateway_client
    response = await client.post(CHAT, headers={**AUTH, "content-type": "application/json"}, content=b"")
    assert_openai_error(response, 400, type="invalid_request_error", param=None, code="invalid_json")


# --- field validation --------------------------------------------------------------------------------------------

BAD_CHAT_FIELDS: list[tuple[str, dict[str, Any], str]] = [
    ("missing model", {"model": ...}, "model"),
    ("model not a string", {"model": 42}, "model"),
    ("blank model", {"model": ""}, "model"),
    ("missing messages", {"messages": ...}, "messages"),
    ("empty messages", {"messages": []}, "messages"),
    ("messages not a list", {"messages": {"role": "user", "content": "x"}}, "messages"),
    ("message not an object", {"messages": ["Hello"]}, "messages[0]"),
    ("bad role", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ("missing role", {"messages": [{"content": "x"}]}, "messages[0].role"),
    (
        "bad role in second message",
        {"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]},
        "messages[1].role",
    ),
    ("content a number", {"messages": [{"role": "user", "content": 42}]}, "messages[0].content"),
    ("content an object", {"messages": [{"role": "user", "content": {"text": "x"}}]}, "messages[0].content"),
    ("content part without type", {"messages": [{"role": "user", "content": [{"text": "x"}]}]}, "messages[0].content"),
    ("user content null", {"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    ("tool message without id", {"messages": [{"role": "tool", "content": "42"}]}, "messages[0].tool_call_id"),
    ("temperature -0.1", {"temperature": -0.1}, "temperature"),
    ("temperature 2.1", {"temperature": 2.1}, "temperature"),
    ("temperature a string", {"temperature": "0.5"}, "temperature"),
    ("temperature a boolean", {"temperature": True}, "temperature"),
    ("top_p 1.5", {"top_p": 1.5}, "top_p"),
    ("max_tokens 0", {"max_tokens": 0}, "max_tokens"),
    ("max_tokens a float", {"max_tokens": 10.5}, "max_tokens"),
    ("max_completion_tokens 0", {"max_completion_tokens": 0}, "max_completion_tokens"),
    ("n 0", {"n": 0}, "n"),
    ("stop a number", {"stop": 42}, "stop"),
    ("stop a list of numbers", {"stop": ["ok", 1]}, "stop"),
    ("seed a string", {"seed": "42"}, "seed"),
    ("presence_penalty 3", {"presence_penalty": 3}, "presence_penalty"),
    ("logit_bias a list", {"logit_bias": [1, 2]}, "logit_bias"),
    ("response_format not an object", {"response_format": "json"}, "response_format"),
    ("response_format type unknown", {"response_format": {"type": "xml"}}, "response_format.type"),
    ("json_schema without schema", {"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    (
        "json_schema without name",
        {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
        "response_format.json_schema",
    ),
    ("tools not a list", {"tools": {"type": "function"}}, "tools"),
    ("tool not an object", {"tools": ["f"]}, "tools[0]"),
    ("tool type unknown", {"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools[0].type"),
    ("tool without function", {"tools": [{"type": "function"}]}, "tools[0].function"),
    ("function without name", {"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name"),
    ("function name a number", {"tools": [{"type": "function", "function": {"name": 7}}]}, "tools[0].function.name"),
    (
        "function parameters a list",
        {
            "tools": [
                {"type": "function", "function": {"name": "f"}},
                {"type": "function", "function": {"name": "g", "parameters": []}},
            ]
        },
        "tools[1].function.parameters",
    ),
    ("tool_choice unknown", {"tool_choice": "sometimes"}, "tool_choice"),
    ("stream a string", {"stream": "yes"}, "stream"),
    ("stream a number", {"stream": 1}, "stream"),
    ("stream_options without stream", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("stream_options with stream false", {"stream": False, "stream_options": {}}, "stream_options"),
    (
        "include_usage a string",
        {"stream": True, "stream_options": {"include_usage": "yes"}},
        "stream_options.include_usage",
    ),
    ("top_logprobs 21", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
]


@pytest.mark.parametrize(("fields", "param"), [c[1:] for c in BAD_CHAT_FIELDS], ids=[c[0] for c in BAD_CHAT_FIELDS])
async def test_bad_chat_field_is_400_naming_the_param(
    gateway_client: Client, mock_vllm: MockVLLM, fields: dict[str, Any], param: str
) -> None:
    """Each invalid chat parameter is rejected before any backend sees it, with its OpenAI param path."""
    client, _ = gateway_client
    response = await client.post(CHAT, headers=AUTH, json=chat_body(**fields))
    error = assert_openai_error(response, 400, type="invalid_request_error", param=param, code=None)
    assert f"'{param}'" in error["message"]
    assert mock_vllm.stats.total_requests == 0


BAD_OTHER_FIELDS: list[tuple[str, str, dict[str, Any], str]] = [
    ("completion without prompt", "/v1/completions", {"model": "text-model"}, "prompt"),
    ("completion prompt a number", "/v1/completions", {"model": "text-model", "prompt": 42}, "prompt"),
    ("completion prompt empty list", "/v1/completions", {"model": "text-model", "prompt": []}, "prompt"),
    ("completion logprobs 21", "/v1/completions", {"model": "text-model", "prompt": "x", "logprobs": 21}, "logprobs"),
    ("completion best_of 0", "/v1/completions", {"model": "text-model", "prompt": "x", "best_of": 0}, "best_of"),
    ("embedding without input", "/v1/embeddings", {"model": "embed-model"}, "input"),
    ("embedding mixed input", "/v1/embeddings", {"model": "embed-model", "input": ["a", 1]}, "input"),
    (
        "embedding encoding unknown",
        "/v1/embeddings",
        {"model": "embed-model", "input": "x", "encoding_format": "hex"},
        "encoding_format",
    ),
    ("embedding dimensions 0", "/v1/embeddings", {"model": "embed-model", "input": "x", "dimensions": 0}, "dimensions"),
]


@pytest.mark.parametrize(
    ("path", "body", "param"), [c[1:] for c in BAD_OTHER_FIELDS], ids=[c[0] for c in BAD_OTHER_FIELDS]
)
async def test_bad_completion_and_embedding_field_is_400(
    gateway_client: Client, path: str, body: dict[str, Any], param: str
) -> None:
    """Completions and embeddings validate their own schemas."""
    client, _ = gateway_client
    response = await client.post(path, headers=AUTH, json=body)
    assert_openai_error(response, 400, type="invalid_request_error", param=param, code=None)


async def test_deeply_nested_extra_field_is_400_not_500(gateway_client: Client, mock_vllm: MockVLLM) -> None:
    """A value nested deeper than the router can re-encode (orjson stops at 254 levels) is a 400 naming it."""
    client, _ = gateway_client
    raw = b'{"model":"chat-model","messages":[{"role":"user","content":"x"}],"top_k":' + b"[" * 300 + b"]" * 300 + b"}"
    response = await client.post(CHAT, headers={**AUTH, "content-type": "application/json"}, content=raw)
    assert_openai_error(response, 400, type="invalid_request_error", param="top_k", code="invalid_body")
    assert mock_vllm.stats.total_requests == 0


@pytest.mark.parametrize(("levels", "status"), [(253, 200), (254, 400)])
async def test_nesting_limit_boundary(gateway_client: Client, levels: int, status: int) -> None:
    """254 levels in all (the body object included) are forwarded; one more is refused."""
    client, _ = gateway_client
    raw = (
        b'{"model":"chat-model","messages":[{"role":"user","content":"x"}],"x":' + b"[" * levels + b"]" * levels + b"}"
    )
    response = await client.post(CHAT, headers={**AUTH, "content-type": "application/json"}, content=raw)
    assert response.status_code == status, response.text


async def test_deeply_nested_tool_choice_is_400_not_500(gateway_client: Client) -> None:
    """A tool_choice nested close to the JSON parser's limit (1024) is rejected, not a RecursionError."""
    client, _ = gateway_client
    raw = b'{"model":"chat-model","messages":[{"role":"user","content":"x"}],"tool_choice":'
    raw += b"[" * 1000 + b"]" * 1000 + b"}"
    response = await client.post(CHAT, headers={**AUTH, "content-type": "application/json"}, content=raw)
    assert_openai_error(response, 400, type="invalid_request_error", param="tool_choice", code="invalid_body")


async def test_vllm_extra_parameters_pass_through_unchanged(gateway_client: Client, mock_vllm: MockVLLM) -> None:
    """Parameters the OpenAI schema lacks but vLLM knows are forwarded as sent."""
    client, _ = gateway_client
    extras = {"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1, "guided_choice": ["a", "b"]}
    response = await client.post(CHAT, headers=AUTH, json=chat_body(**extras))
    assert response.status_code == 200, response.text
    sent = mock_vllm.stats.last_request
    assert {k: sent[k] for k in extras} == extras
    assert sent["model"] == "served-chat"


# --- authentication ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-key"},
        {"Authorization": f"Basic {AUTH['Authorization'][7:]}"},
        {"Authorization": "Bearer "},
        {"Authorization": AUTH["Authorization"][7:]},
    ],
    ids=["missing", "wrong key", "basic scheme", "empty bearer", "no scheme"],
)
async def test_bad_credentials_are_401(gateway_client: Client, mock_vllm: MockVLLM, headers: dict[str, str]) -> None:
    """No key, a wrong key, or a key outside a Bearer scheme."""
    client, _ = gateway_client
    response = await client.post(CHAT, headers=headers, json=chat_body())
    assert_openai_error(response, 401, type="authentication_error", param=None, code="invalid_api_key")
    assert response.headers["www-authenticate"] == "Bearer"
    assert mock_vllm.stats.total_requests == 0


async def test_models_needs_a_key(gateway_client: Client) -> None:
    """GET /v1/models is authenticated too."""
    client, _ = gateway_client
    response = await client.get("/v1/models")
    assert_openai_error(response, 401, type="authentication_error", param=None, code="invalid_api_key")


# --- unknown models and paths, methods ---------------------------------------------------------------------------


async def test_unknown_model_is_404(gateway_client: Client, mock_vllm: MockVLLM) -> None:
    """A model the registry does not know."""
    client, _ = gateway_client
    response = await client.post(CHAT, headers=AUTH, json=chat_body(model="gpt-17"))
    error = assert_openai_error(response, 404, type="invalid_request_error", param="model", code="model_not_found")
    assert "gpt-17" in error["message"]
    assert mock_vllm.stats.total_requests == 0


async def test_unknown_model_on_models_endpoint_is_404(gateway_client: Client) -> None:
    """GET /v1/models/<unknown>."""
    client, _ = gateway_client
    response = await client.get("/v1/models/gpt-17", headers=AUTH)
    assert_openai_error(response, 404, type="invalid_request_error", param="model", code="model_not_found")


@pytest.mark.parametrize("path", ["/v1/nope", "/v1", "/v1/chat", "/v1/chat/completions/extra", "/v1/responsez"])
async def test_unknown_v1_path_is_404(gateway_client: Client, path: str) -> None:
    """Unknown /v1 URLs answer an OpenAI-shaped 404 (with or without a key)."""
    client, _ = gateway_client
    for headers in (AUTH, {}):
        response = await client.post(path, headers=headers, json=chat_body())
        assert_openai_error(response, 404, type="invalid_request_error", param=None, code="unknown_url")


async def test_get_on_chat_completions_is_405(gateway_client: Client) -> None:
    """Completion endpoints take POST only, and say so in Allow."""
    client, _ = gateway_client
    response = await client.get(CHAT, headers=AUTH)
    assert_openai_error(response, 405, type="invalid_request_error", param=None, code="method_not_allowed")
    assert response.headers["allow"] == "POST"


async def test_post_on_models_is_405(gateway_client: Client) -> None:
    """The models list takes GET only, and says so in Allow."""
    client, _ = gateway_client
    response = await client.post("/v1/models", headers=AUTH, json={})
    assert_openai_error(response, 405, type="invalid_request_error", param=None, code="method_not_allowed")
    assert response.headers["allow"] == "GET"


async def test_embedding_model_on_chat_endpoint_is_400(gateway_client: Client, mock_vllm: MockVLLM) -> None:
    """A known model of the wrong kind for the endpoint."""
    client, _ = gateway_client
    response = await client.post(CHAT, headers=AUTH, json=chat_body(model="embed-model"))
    assert_openai_error(response, 400, type="invalid_request_error", param="model", code="model_not_supported")
    assert mock_vllm.stats.total_requests == 0


# --- body size and content type ----------------------------------------------------------------------------------


async def test_body_over_limit_by_content_length_is_413(
    make_gateway: Callable[..., Gateway], mock_vllm: MockVLLM
) -> None:
    """A declared Content-Length above max_body_bytes is refused before reading."""
    gateway = make_gateway(transport=httpx.ASGITransport(app=mock_vllm), max_body_bytes=100)
    async with client_for(gateway) as client:
        small = await client.post(CHAT, headers=AUTH, json={"model": "chat-model", "messages": []})
        assert small.status_code == 400  # under the limit: parsed and validated
        response = await client.post(
            CHAT, headers=AUTH, json=chat_body(messages=[{"role": "user", "content": "x" * 200}])
        )
    error = assert_openai_error(response, 413, type="invalid_request_error", param=None, code="request_too_large")
    assert "100 bytes" in error["message"]
    assert mock_vllm.stats.total_requests == 0


async def test_streamed_body_over_limit_is_413(make_gateway: Callable[..., Gateway], mock_vllm: MockVLLM) -> None:
    """A chunked body without Content-Length is cut off once it passes max_body_bytes."""
    gateway = make_gateway(transport=httpx.ASGITransport(app=mock_vllm), max_body_bytes=100)

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"model":"chat-model","messages":[{"role":"user","content":"'
        for _ in range(10):
            yield b"x" * 20
        yield b'"}]}'

    async with client_for(gateway) as client:
        request = client.build_request(
            "POST", CHAT, headers={**AUTH, "content-type": "application/json"}, content=chunks()
        )
        assert "content-length" not in request.headers
        assert request.headers["transfer-encoding"] == "chunked"
        response = await client.send(request)
    assert_openai_error(response, 413, type="invalid_request_error", param=None, code="request_too_large")
    assert mock_vllm.stats.total_requests == 0


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/jsonx", None],
)
async def test_wrong_content_type_is_415(gateway_client: Client, mock_vllm: MockVLLM, content_type: str | None) -> None:
    """Only application/json bodies are accepted (a missing Content-Type too is refused)."""
    client, _ = gateway_client
    headers = dict(AUTH)
    if content_type is not None:
        headers["content-type"] = content_type
    request = client.build_request("POST", CHAT, headers=headers, content=b'{"model":"chat-model","messages":[]}')
    if content_type is None:
        request.headers.pop("content-type", None)
    response = await client.send(request)
    assert_openai_error(response, 415, type="invalid_request_error", param=None, code="unsupported_media_type")
    assert mock_vllm.stats.total_requests == 0


@pytest.mark.parametrize(
    "content_type", ["application/json; charset=utf-8", "Application/JSON", "application/json ;x=1"]
)
async def test_json_content_type_with_parameters_is_accepted(gateway_client: Client, content_type: str) -> None:
    """Media-type parameters and case do not matter."""
    client, _ = gateway_client
    response = await client.post(
        CHAT,
        headers={**AUTH, "content-type": content_type},
        content=orjson.dumps(chat_body()),
    )
    assert response.status_code == 200, response.text


# --- backend failures --------------------------------------------------------------------------------------------


async def test_backend_500_is_502_with_its_message(gateway_client: Client, mock_vllm: MockVLLM) -> None:
    """A backend 5xx other than 502/503 is reported as 502 naming the backend and quoting its message."""
    client, _ = gateway_client
    mock_vllm.config.fail_next = 1
    mock_vllm.config.fail_status = 500
    mock_vllm.config.error_message_override = "CUDA out of memory (mock)"
    response = await client.post(CHAT, headers=AUTH, json=chat_body())
    error = assert_openai_error(response, 502, type="server_error", param=None, code="backend_error")
    assert "b1" in error["message"]
    assert "HTTP 500" in error["message"]
    assert "CUDA out of memory (mock)" in error["message"]


async def test_backend_500_on_a_stream_is_502_json(gateway_client: Client, mock_vllm: MockVLLM) -> None:
    """Before the first byte a streaming request fails like a plain one: JSON, not SSE."""
    client, _ = gateway_client
    mock_vllm.config.fail_next = 1
    mock_vllm.config.fail_status = 500
    response = await client.post(CHAT, headers=AUTH, json=chat_body(stream=True))
    error = assert_openai_error(response, 502, type="server_error", param=None, code="backend_error")
    assert "Mock vLLM injected failure" in error["message"]


async def test_no_retry_on_backend_500(
    make_gateway: Callable[..., Gateway], mock_vllm: MockVLLM, mock_b: MockVLLM
) -> None:
    """A 500 may have done work: it is not retried on the other backend."""
    mock_vllm.config.fail_next = 1
    mock_vllm.config.fail_status = 500
    gateway = two_backends(make_gateway, {"host-a": mock_vllm, "host-b": mock_b})
    async with client_for(gateway) as client:
        response = await client.post(CHAT, headers=AUTH, json=chat_body())
    assert_openai_error(response, 502, type="server_error", param=None, code="backend_error")
    assert (mock_vllm.stats.total_requests, mock_b.stats.total_requests) == (1, 0)


async def test_connection_refused_on_all_backends_is_502(make_gateway: Callable[..., Gateway]) -> None:
    """Real sockets: every backend refuses the connection; both are tried, the last failure is reported."""
    registry = registry_snap(
        backends=[
            backend_snap("b1", base_url=REFUSED),
            backend_snap("b2", base_url=REFUSED.replace("127.0.0.1", "localhost")),
        ]
    )
    gateway = make_gateway(registry=registry, transport=None)
    async with client_for(gateway) as client:
        response = await client.post(CHAT, headers=AUTH, json=chat_body())
    error = assert_openai_error(response, 502, type="server_error", param=None, code="backend_error")
    assert "cannot connect" in error["message"]
    assert "b2" in error["message"]


@pytest.mark.parametrize(
    ("state", "status"), [("draining", "healthy"), ("disabled", "healthy"), ("enabled", "unhealthy")]
)
async def test_no_usable_backend_is_503_with_retry_after(
    make_gateway: Callable[..., Gateway], mock_vllm: MockVLLM, state: str, status: str
) -> None:
    """When the pool has no backend taking requests, nothing is sent and the client is told to retry later."""
    registry = registry_snap(
        backends=[backend_snap("b1", state=state, status=status), backend_snap("b2", state=state, status=status)]
    )
    gateway = make_gateway(registry=registry, transport=httpx.ASGITransport(app=mock_vllm))
    async with client_for(gateway) as client:
        response = await client.post(CHAT, headers=AUTH, json=chat_body())
    error = assert_openai_error(response, 503, type="server_error", param=None, code="no_backend_available")
    assert "chat-model" in error["message"]
    assert int(response.headers["retry-after"]) > 0
    assert mock_vllm.stats.total_requests == 0


async def test_backend_503_on_all_backends_is_503(
    make_gateway: Callable[..., Gateway], mock_vllm: MockVLLM, mock_b: MockVLLM
) -> None:
    """A 503 from every backend is passed on as 503 (after one retry), still as an OpenAI error."""
    for mock in (mock_vllm, mock_b):
        mock.config.fail_status = 503
    gateway = two_backends(make_gateway, {"host-a": mock_vllm, "host-b": mock_b})
    async with client_for(gateway) as client:
        response = await client.post(CHAT, headers=AUTH, json=chat_body())
    error = assert_openai_error(response, 503, type="server_error", param=None, code="backend_error")
    assert "b2" in error["message"]
    assert (mock_vllm.stats.total_requests, mock_b.stats.total_requests) == (1, 1)


async def test_backend_read_timeout_is_504(make_gateway: Callable[..., Gateway], mock_vllm: MockVLLM) -> None:
    """In-process: a backend that never answers within read_timeout_s is a 504 (not retried)."""
    mock_vllm.config.hang = True
    registry = registry_snap(
        backends=[
            backend_snap("b1", base_url="http://host-a", read_timeout_s=0.2),
            backend_snap("b2", base_url="http://host-b"),
        ]
    )
    router = HostRouter({"host-a": mock_vllm, "host-b": mock_vllm})
    gateway = make_gateway(registry=registry, transport=router)
    async with client_for(gateway) as client:
        response = await client.post(CHAT, headers=AUTH, json=chat_body())
    error = assert_openai_error(response, 504, type="server_error", param=None, code="backend_timeout")
    assert "b1" in error["message"]
    assert "0.2 s" in error["message"]
    assert router.requests == ["host-a"]
    assert mock_vllm.stats.cancelled_requests == 1


async def test_backend_read_timeout_on_a_real_socket_is_504(make_gateway: Callable[..., Gateway]) -> None:
    """Real sockets: the mock server accepts the request and hangs; httpx's read timeout becomes a 504."""
    async with MockServer(models=["served-chat"], hang=True) as server:
        registry = registry_snap(backends=[backend_snap("b1", base_url=server.url, read_timeout_s=0.2)])
        gateway = make_gateway(registry=registry, transport=None)
        async with client_for(gateway) as client:
            response = await client.post(CHAT, headers=AUTH, json=chat_body())
    assert_openai_error(response, 504, type="server_error", param=None, code="backend_timeout")


async def test_retry_after_backend_503_goes_to_the_other_backend(
    make_gateway: Callable[..., Gateway], mock_vllm: MockVLLM, mock_b: MockVLLM
) -> None:
    """The first backend answers 503; the request is replayed on the second, which answers."""
    mock_vllm.config.fail_next = 1
    mock_vllm.config.fail_status = 503
    gateway = two_backends(make_gateway, {"host-a": mock_vllm, "host-b": mock_b})
    async with client_for(gateway) as client:
        response = await client.post(CHAT, headers=AUTH, json=chat_body())
    assert response.status_code == 200, response.text
    assert response.headers["x-router-backend"] == "b2"
    assert response.json()["model"] == "chat-model"
    assert (mock_vllm.stats.total_requests, mock_b.stats.total_requests) == (1, 1)


async def test_retry_after_connection_refused_goes_to_the_other_backend(
    make_gateway: Callable[..., Gateway], mock_b: MockVLLM
) -> None:
    """The first backend refuses the connection (nothing listens on host-a); the second answers."""
    gateway = two_backends(make_gateway, {"host-b": mock_b})
    async with client_for(gateway) as client:
        response = await client.post(CHAT, headers=AUTH, json=chat_body(stream=True))
    assert response.status_code == 200, response.text
    assert response.headers["x-router-backend"] == "b2"
    assert response.text.endswith("data: [DONE]\n\n")
    assert mock_b.stats.total_requests == 1


async def test_backend_400_prompt_too_long_passes_through(gateway_client: Client, mock_vllm: MockVLLM) -> None:
    """vLLM's own 400 (context length exceeded) reaches the client with its status and body, not retried."""
    client, _ = gateway_client
    mock_vllm.config.max_model_len = 16
    response = await client.post(
        CHAT, headers=AUTH, json=chat_body(messages=[{"role": "user", "content": "word " * 50}])
    )
    error = assert_openai_error(response, 400, type="BadRequestError", param="input_tokens", code=400)
    assert "maximum context length is 16 tokens" in error["message"]
    assert mock_vllm.stats.total_requests == 1


async def test_backend_400_on_a_stream_passes_through_as_json(gateway_client: Client, mock_vllm: MockVLLM) -> None:
    """The same 400 on a streaming request is answered as JSON before any SSE starts."""
    client, _ = gateway_client
    mock_vllm.config.max_model_len = 16
    body = chat_body(messages=[{"role": "user", "content": "word " * 50}], stream=True)
    response = await client.post(CHAT, headers=AUTH, json=body)
    error = assert_openai_error(response, 400, type="BadRequestError", param="input_tokens", code=400)
    assert "maximum context length" in error["message"]


async def test_backend_4xx_without_openai_shape_is_wrapped(make_gateway: Callable[..., Gateway]) -> None:
    """A backend 4xx whose body is not an OpenAI error is wrapped into one, keeping its status."""

    async def plain_422(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 422, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"unprocessable, says the backend"})

    gateway = make_gateway(transport=httpx.ASGITransport(app=plain_422))
    async with client_for(gateway) as client:
        response = await client.post(CHAT, headers=AUTH, json=chat_body())
    error = assert_openai_error(response, 422, type="invalid_request_error", param=None, code=422)
    assert error["message"] == "unprocessable, says the backend"
