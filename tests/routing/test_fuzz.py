"""Property-based fuzzing of every /v1 endpoint (and vLLM's own the gateway serves): malformed and extreme requests
never make the gateway fail.

Property: the status is never a gateway 5xx (a 502/503/504 is allowed only as a backend's failure), and every
non-2xx answer is OpenAI-shaped JSON: `{"error": {"message": str, "type": str, "param": ..., "code": ...}}`.
The gateway runs in-process over the in-process mock vLLM, on one event loop for the whole module.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from backends.mock_vllm import MockConfig, MockVLLM
from routing.dispatch import Dispatcher
from routing.gateway import Gateway
from routing.registry import RegistryCache
from routing.usage import MemoryUsageSink
from tests.conftest import AUTH, MASTER_KEY
from tests.factories import backend_snap, registry_snap

CHAT, COMPLETIONS, EMBEDDINGS, MODELS = "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models"
RERANK, SCORE, TOKENIZE, DETOKENIZE = "/v1/rerank", "/v1/score", "/tokenize", "/detokenize"
POST_PATHS = (CHAT, COMPLETIONS, EMBEDDINGS, RERANK, SCORE, TOKENIZE, DETOKENIZE)
# Fields whose error may name the other one: a score pair's proportion, tokenize's `prompt` or `messages`.
PARTNERS = {"queries": "documents", "documents": "queries", "prompt": "messages", "messages": "prompt"}
ALL_PATHS = (*POST_PATHS, MODELS)
MAX_BODY = 1 << 20
JSON_HEADERS = {**AUTH, "content-type": "application/json"}
BACKEND_CODES = frozenset({"backend_error", "backend_timeout", "no_backend_available"})

# FUZZ_SCALE=50 runs fifty times more examples (a longer hunt); the default keeps the file at a few seconds.
SCALE = max(1, int(os.environ.get("FUZZ_SCALE", "1")))
FUZZ = settings(
    max_examples=60 * SCALE,
    deadline=None,
    database=None,  # nothing written to .hypothesis/
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --- harness -----------------------------------------------------------------------------------------------------


class Harness:
    """A gateway over one in-process mock vLLM, driven synchronously on a private event loop."""

    def __init__(self) -> None:
        # fill_to_max_tokens=False keeps answers short whatever max_tokens / n the fuzzer picks.
        self.mock = MockVLLM(
            MockConfig(models=["served-chat", "served-text"], embed_models=["served-embed"], fill_to_max_tokens=False)
        )
        self.gateway = Gateway(
            None,
            registry=RegistryCache.static(registry_snap(backends=[backend_snap("b1", base_url="http://mock-a")])),
            dispatcher=Dispatcher(transport=httpx.ASGITransport(app=self.mock)),
            master_key=MASTER_KEY,
            usage=MemoryUsageSink(maxlen=100),
            max_body_bytes=MAX_BODY,
        )
        # raise_app_exceptions (the default): an exception escaping the gateway fails the test loudly.
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.gateway), base_url="http://router")
        self.runner = asyncio.Runner()

    def request(
        self, method: str, path: str, *, content: bytes | None = None, headers: dict[str, Any] | None = None
    ) -> httpx.Response:
        """Send one request and return the response (its body read)."""
        return self.runner.run(self.client.request(method, path, content=content, headers=headers))

    def post(self, path: str, content: bytes, headers: dict[str, Any] | None = None) -> httpx.Response:
        """POST raw bytes as JSON with the master key."""
        return self.request("POST", path, content=content, headers=headers if headers is not None else JSON_HEADERS)

    def close(self) -> None:
        """Close the clients and the loop."""
        self.runner.run(self.client.aclose())
        self.runner.run(self.gateway.dispatcher.aclose())
        self.runner.close()


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    """One harness for the module (hypothesis runs many examples per test)."""
    h = Harness()
    yield h
    h.close()


def check(response: httpx.Response) -> None:
    """The fuzzing property: no gateway 5xx, and every error is OpenAI-shaped JSON."""
    status = response.status_code
    request = response.request
    where = f"{request.method} {request.url.path} -> {status}: {response.text[:300]}"
    event(f"status {status}")  # shown by --hypothesis-show-statistics
    if status < 300:
        content_type = response.headers["content-type"]
        if content_type.startswith("text/event-stream"):
            assert response.text.endswith("data: [DONE]\n\n"), where
        else:
            assert content_type == "application/json", where
            assert isinstance(response.json(), dict), where
        return
    if request.method == "HEAD":
        assert status < 500, where
        return
    assert response.headers["content-type"] == "application/json", where
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, where
    error = body["error"]
    assert isinstance(error, dict) and {"message", "type", "param", "code"} <= set(error), where
    assert isinstance(error["message"], str) and error["message"], where
    assert isinstance(error["type"], str) and error["type"], where
    assert error["param"] is None or isinstance(error["param"], str), where
    assert error["code"] is None or isinstance(error["code"], str | int), where
    if status >= 500:
        assert status in (502, 503, 504) and error["code"] in BACKEND_CODES, where


# --- strategies --------------------------------------------------------------------------------------------------

# Integers beyond 64 bits and non-finite floats: stdlib json writes them (NaN, Infinity, 10**30), orjson would not.
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([0, -1, 2**31, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1, 10**30, -(10**400)])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
# What orjson parses back exactly: 64-bit integers, finite floats.
sane_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
endpoints = st.sampled_from(POST_PATHS)


def encode(value: Any, ascii_only: bool = False) -> bytes:
    """JSON text of any value, with NaN/Infinity and big integers written as the stdlib does."""
    return json.dumps(value, ensure_ascii=ascii_only, allow_nan=True).encode("utf-8", "surrogatepass")


# Valid requests: every value accepted by the router's schemas and by the mock backend (short answers).
names = st.from_regex(r"[A-Za-z0-9_-]{1,20}", fullmatch=True)
free_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=30)  # CharFields refuse NUL
texts = st.text(max_size=30)
token_lists = st.lists(st.integers(0, 50_000), min_size=1, max_size=4)
text_parts = st.fixed_dictionaries({"type": st.just("text"), "text": texts})
image_parts = st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": texts})})
valid_messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["system", "developer", "user", "function"]),
            "content": texts | st.lists(text_parts | image_parts, max_size=3),
        },
        optional={"name": names},
    )
    | st.fixed_dictionaries(
        {"role": st.just("assistant")},
        optional={
            "content": texts | st.none(),
            "tool_calls": st.lists(st.dictionaries(names, sane_json, max_size=2), max_size=2) | st.none(),
        },
    )
    | st.fixed_dictionaries({"role": st.just("tool"), "content": texts, "tool_call_id": names}),
    min_size=1,
    max_size=4,
)
valid_tools = st.lists(
    st.fixed_dictionaries(
        {
            "type": st.just("function"),
            "function": st.fixed_dictionaries(
                {"name": names},
                optional={
                    "description": free_text,
                    "parameters": st.dictionaries(texts, sane_json, max_size=3),
                    "strict": st.booleans() | st.none(),
                },
            ),
        }
    ),
    max_size=3,
)
valid_response_formats = (
    st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])})
    | st.fixed_dictionaries(
        {
            "type": st.just("json_schema"),
            "json_schema": st.fixed_dictionaries(
                {"name": texts}, optional={"schema": st.dictionaries(texts, sane_json)}
            ),
        }
    )
    | st.none()
)
valid_tool_choices = st.sampled_from(["none", "auto", "required", None]) | st.fixed_dictionaries(
    {"type": st.just("function"), "function": st.fixed_dictionaries({"name": names})}
)
valid_prompts = (
    texts | st.lists(texts, min_size=1, max_size=3) | token_lists | st.lists(token_lists, min_size=1, max_size=3)
)
SAMPLING = {
    "temperature": st.floats(0, 2) | st.integers(0, 2) | st.none(),
    "top_p": st.floats(0, 1) | st.none(),
    "max_tokens": st.integers(1, 64) | st.none(),
    "n": st.integers(1, 4) | st.none(),
    "stop": texts | st.lists(texts, max_size=4) | st.none(),
    "seed": st.integers(-(2**63), 2**64 - 1) | st.none(),
    "stream": st.booleans() | st.none(),
    "presence_penalty": st.floats(-2, 2) | st.none(),
    "frequency_penalty": st.floats(-2, 2) | st.none(),
    "logit_bias": st.dictionaries(st.integers(0, 50_000).map(str), st.integers(-100, 100), max_size=3) | st.none(),
    "user": free_text,
    # vLLM extras, forwarded untouched
    "top_k": st.integers(-1, 100),
    "min_p": st.floats(0, 1),
    "repetition_penalty": st.floats(0.5, 2),
}
stream_options = st.fixed_dictionaries(
    {}, optional={"include_usage": st.booleans(), "continuous_usage_stats": st.booleans()}
)


POOLING_OPTIONS = {
    "truncate_prompt_tokens": st.integers(-1, 64) | st.none(),
    "max_tokens_per_doc": st.integers(0, 8),
    "use_activation": st.booleans() | st.none(),
    "user": free_text,
}


@st.composite
def pooling_requests(draw: st.DrawFn, path: str) -> dict[str, Any]:
    """A valid rerank, score, tokenize or detokenize request (texts only: the mock's models are text-only)."""
    if path == RERANK:
        documents = texts | st.lists(texts, min_size=1, max_size=3)
        optional = {**POOLING_OPTIONS, "top_n": st.integers(0, 4)}
        return draw(
            st.fixed_dictionaries(
                {"model": st.just("embed-model"), "query": texts, "documents": documents}, optional=optional
            )
        )
    if path == SCORE:
        size = draw(st.integers(1, 3))
        queries = texts | st.lists(texts, min_size=1, max_size=1) | st.lists(texts, min_size=size, max_size=size)
        documents = st.lists(texts, min_size=size, max_size=size)
        return draw(
            st.fixed_dictionaries(
                {"model": st.just("embed-model"), "queries": queries, "documents": documents}, optional=POOLING_OPTIONS
            )
        )
    models = st.sampled_from(["chat-model", "text-model", "embed-model"])
    if path == DETOKENIZE:
        return draw(st.fixed_dictionaries({"model": models, "tokens": st.lists(st.integers(0, 2**63 - 1), max_size=5)}))
    optional = {"add_special_tokens": st.booleans(), "return_token_strs": st.booleans() | st.none()}
    if draw(st.booleans()):
        return draw(st.fixed_dictionaries({"model": models, "prompt": free_text}, optional=optional))
    return draw(st.fixed_dictionaries({"model": models, "messages": valid_messages}, optional=optional))


@st.composite
def valid_requests(draw: st.DrawFn, path: str) -> dict[str, Any]:
    """A request the router must accept and the mock answers with 200."""
    if path in (RERANK, SCORE, TOKENIZE, DETOKENIZE):
        return draw(pooling_requests(path))
    if path == EMBEDDINGS:
        return draw(
            st.fixed_dictionaries(
                {"model": st.just("embed-model"), "input": valid_prompts},
                optional={
                    "encoding_format": st.sampled_from(["float", "base64"]),
                    "dimensions": st.integers(1, 4096) | st.none(),
                    "user": free_text,
                },
            )
        )
    required: dict[str, st.SearchStrategy[Any]]
    optional: dict[str, st.SearchStrategy[Any]]
    if path == CHAT:
        required = {"model": st.just("chat-model"), "messages": valid_messages}
        optional = {
            **SAMPLING,
            "max_completion_tokens": st.integers(1, 64) | st.none(),
            "response_format": valid_response_formats,
            "tools": valid_tools | st.none(),
            "tool_choice": valid_tool_choices,
            "parallel_tool_calls": st.booleans() | st.none(),
            "logprobs": st.booleans() | st.none(),
            "top_logprobs": st.integers(0, 20) | st.none(),
        }
    else:
        required = {"model": st.sampled_from(["text-model", "chat-model"]), "prompt": valid_prompts}
        optional = {
            **SAMPLING,
            "echo": st.booleans() | st.none(),
            "logprobs": st.integers(0, 20) | st.none(),
            "best_of": st.integers(1, 4) | st.none(),
            "suffix": free_text | st.none(),
        }
    body: dict[str, Any] = draw(st.fixed_dictionaries(required, optional=optional))
    if body.get("stream") is True and draw(st.booleans()):
        body["stream_options"] = draw(stream_options | st.none())
    return body


# Values that are wrong for most fields, or just out of range, or any JSON at all.
wrong_values = json_values | st.sampled_from(
    [-1, 0, 2.5, 129, 21, 10**6, 2**63, 2**64 - 1, -(2**63), 1e308, -0.1, 2.1, "", " ", "0.5", "yes", [], {}, [1], [""]]
)


VALID: dict[str, dict[str, Any]] = {
    CHAT: {"model": "chat-model", "messages": [{"role": "user", "content": "Hello"}]},
    COMPLETIONS: {"model": "text-model", "prompt": "Hello"},
    EMBEDDINGS: {"model": "embed-model", "input": "Hello"},
    RERANK: {"model": "embed-model", "query": "Hello", "documents": ["Hello", "world"]},
    SCORE: {"model": "embed-model", "queries": "Hello", "documents": ["Hello", "world"]},
    TOKENIZE: {"model": "chat-model", "prompt": "Hello"},
    DETOKENIZE: {"model": "chat-model", "tokens": [1, 2]},
}


def in_field(path: str, field: str, raw: bytes) -> bytes:
    """The valid request of the endpoint with one field's value replaced by raw JSON text (possibly invalid)."""
    return orjson.dumps({**VALID[path], field: "__FUZZ__"}).replace(b'"__FUZZ__"', raw)


# --- properties --------------------------------------------------------------------------------------------------


@FUZZ
@given(path=endpoints, value=json_values, ascii_only=st.booleans())
def test_any_json_value_as_body(harness: Harness, path: str, value: Any, ascii_only: bool) -> None:
    """Any JSON document (NaN, Infinity and >64-bit integers included) posted to any endpoint."""
    check(harness.post(path, encode(value, ascii_only)))


@FUZZ
@given(path=endpoints, raw=st.binary(max_size=200))
def test_random_bytes_as_body(harness: Harness, path: str, raw: bytes) -> None:
    """Arbitrary bytes (mostly not JSON, often not UTF-8)."""
    check(harness.post(path, raw))


NASTY_VALUES = [
    b"NaN",
    b"-Infinity",
    b"1e400",
    b"-1e400",
    b"1" * 400,
    b"123456789012345678901234567890",
    b"-0",
    b"0e0",
    b"18446744073709551616",
    b'"\\ud800"',
    b'"\\udfff"',
    b'"a\\udc00b"',
    b'"\\ud800\\ud800"',
    b'"\\ud83d\\ude00"',
    b'"\\u0000"',
    b'"\xff\xfe"',
    b'"\xed\xa0\x80"',
    b'"\xef\xbb\xbf"',
    b"\xef\xbb\xbf{}",
    b'"\\x41"',
    b"'single'",
    b"[1,]",
    b"{,}",
    b'{"a":1,}',
    b"tru",
    b"nul",
    b"01",
    b"1.",
    b".5",
    b"+1",
    b"0x10",
    b"[] []",
    b"{} x",
]


@FUZZ
@given(
    path=endpoints,
    raw=st.sampled_from(NASTY_VALUES),
    field=st.sampled_from(["model", "messages", "prompt", "input", "temperature", "max_tokens", "stop", "top_k", "x"]),
    whole=st.booleans(),
)
def test_nasty_json_tokens(harness: Harness, path: str, raw: bytes, field: str, whole: bool) -> None:
    """Tokens that are invalid or extreme JSON (non-finite, huge, lone surrogates, bad UTF-8), alone or in a field."""
    check(harness.post(path, raw if whole else in_field(path, field, raw)))


@FUZZ
@given(
    path=endpoints,
    escape=st.sampled_from(
        ["\\ud800", "\\udbff\\udbff", "\\udc00", "x\\ud800y", "\\ud83d\\ude00", "\\u0000", "\\ufffe"]
    ),
    field=st.sampled_from(["model", "content", "role", "stop", "user", "extra key", "extra value", "prompt", "input"]),
)
def test_surrogates_escaped_in_json(harness: Harness, path: str, escape: str, field: str) -> None:
    """Lone (invalid) and paired UTF-16 surrogates written as \\u escapes in any string of the body."""
    body = dict(VALID[path])
    marker = "__FUZZ__"
    if field in ("content", "role") and path == CHAT:
        body["messages"] = [{**body["messages"][0], field: marker}]
    elif field == "extra key":
        body[marker] = 1
    elif field == "extra value":
        body["x-extra"] = marker
    else:
        body[field] = marker
    check(harness.post(path, orjson.dumps(body).replace(marker.encode(), escape.encode())))


@FUZZ
@given(
    path=endpoints,
    depth=st.integers(1, 1100) | st.sampled_from([252, 253, 254, 255, 1022, 1023, 1024, 1025]),
    kind=st.sampled_from(["list", "object"]),
    field=st.sampled_from(
        ["messages", "prompt", "input", "tool_choice", "tools", "logit_bias", "top_k", "model", None]
    ),
)
def test_deeply_nested_structures(harness: Harness, path: str, depth: int, kind: str, field: str | None) -> None:
    """Containers nested up to and past the parser's limit, as the body or as one field."""
    opening, closing = (b"[", b"]") if kind == "list" else (b'{"a":', b"}")
    nested = opening * depth + b"1" + closing * depth
    check(harness.post(path, nested if field is None else in_field(path, field, nested)))


@FUZZ
@given(path=endpoints, extra=st.dictionaries(st.text(max_size=12), json_values, max_size=6), drop=st.booleans())
def test_random_fields_mixed_with_valid_ones(harness: Harness, path: str, extra: dict[str, Any], drop: bool) -> None:
    """A valid request plus random keys (which may overwrite valid ones), or with a required key missing."""
    body = {**VALID[path], **extra}
    if drop:
        body.pop("model", None)
    check(harness.post(path, encode(body)))


@settings(FUZZ, max_examples=60 * SCALE)
@given(data=st.data(), path=endpoints)
def test_valid_requests_succeed(harness: Harness, data: st.DataObject, path: str) -> None:
    """Every request the schemas allow is accepted and answered (the validation is not stricter than the API)."""
    body = data.draw(valid_requests(path), label="body")
    response = harness.post(path, encode(body))
    check(response)
    assert response.status_code == 200, response.text


@settings(FUZZ, max_examples=150 * SCALE)
@given(data=st.data(), path=endpoints, count=st.integers(1, 3))
def test_valid_requests_with_random_field_values(harness: Harness, data: st.DataObject, path: str, count: int) -> None:
    """Valid requests with 1-3 fields (known or new) set to random values; one bad field is the error's param."""
    body = data.draw(valid_requests(path), label="valid body")
    keys = st.sampled_from(sorted({*body, *SAMPLING, "model", "messages", "prompt", "input", "tools"})) | st.text(
        max_size=12
    )
    corrupted = data.draw(st.dictionaries(keys, wrong_values, min_size=count, max_size=count), label="corrupted")
    body.update(corrupted)
    response = harness.post(path, encode(body))
    check(response)
    error = response.json()["error"] if response.status_code >= 400 else None
    if (
        count == 1
        and error is not None
        and error["type"] == "invalid_request_error"
        and error["code"] != "invalid_json"
    ):
        # The router's own validation (not a backend's) names the field that was changed (numbers beyond a
        # double, written by the stdlib, make the whole body unparsable: that error names no field).
        (field,) = corrupted
        allowed = {field, "stream_options"} if field == "stream" else {field, PARTNERS.get(field, field)}
        param = error["param"]
        assert param is not None and (param in allowed or param.startswith((f"{field}.", f"{field}["))), (
            f"changed {field!r}, error names {param!r}: {error['message']}"
        )


@settings(FUZZ, max_examples=15 * SCALE)
@given(
    path=endpoints,
    field=st.sampled_from(["content", "model", "role", "stop", "extra", "key"]),
    unit=st.text(min_size=1, max_size=8),
    size=st.integers(1, MAX_BODY + 1024),
)
def test_huge_strings(harness: Harness, path: str, field: str, unit: str, size: int) -> None:
    """Strings up to (and past) the body limit in any position."""
    huge = (unit * (size // len(unit) + 1))[:size]
    body: dict[str, Any] = dict(VALID[path])
    if field == "content" and path == CHAT:
        body["messages"] = [{"role": "user", "content": huge}]
    elif field == "role" and path == CHAT:
        body["messages"] = [{"role": huge, "content": "x"}]
    elif field == "key":
        body[huge] = 1
    else:
        body[{"content": "prompt" if path == COMPLETIONS else "input", "extra": "x-extra"}.get(field, field)] = huge
    response = harness.post(path, orjson.dumps(body))
    check(response)
    if len(orjson.dumps(body)) > MAX_BODY:
        assert response.status_code == 413


@settings(FUZZ, max_examples=80 * SCALE)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]),
    path=st.sampled_from(ALL_PATHS) | st.text(max_size=20).map(lambda s: "/v1/" + quote(s, safe="/")),
    suffix=st.sampled_from(["", "/", "/chat-model", "/%ff%00", "//", "/../models"]),
    authorization=st.sampled_from([AUTH["Authorization"], None, "Bearer", "Bearer  ", "bearer " + MASTER_KEY])
    | st.binary(max_size=30),
    content_type=st.sampled_from(["application/json", "text/plain", None, "application/json; charset=latin-1"])
    | st.binary(max_size=30),
    content_length=st.none() | st.sampled_from([b"-1", b"0", b"abc", b"99999999999999999999", b" 5 ", b"1_0"]),
    body=st.binary(max_size=50) | json_values.map(encode),
)
def test_methods_paths_and_headers(
    harness: Harness,
    method: str,
    path: str,
    suffix: str,
    authorization: str | bytes | None,
    content_type: str | bytes | None,
    content_length: bytes | None,
    body: bytes,
) -> None:
    """Every method on every /v1 path (and random ones), with random credentials, content types and lengths."""
    headers: dict[str, Any] = {}
    if authorization is not None:
        headers["authorization"] = authorization
    if content_type is not None:
        headers["content-type"] = content_type
    if content_length is not None:
        headers["content-length"] = content_length
    check(harness.request(method, path + suffix, content=body, headers=headers))


@settings(FUZZ, max_examples=30 * SCALE)
@given(model=st.text(max_size=40) | st.sampled_from(["chat-model", "embed-model", "", "%00", "a/b", "\x00"]))
def test_models_endpoint_with_random_ids(harness: Harness, model: str) -> None:
    """GET /v1/models/<anything> is a model entry or an OpenAI 404."""
    response = harness.request("GET", f"{MODELS}/{quote(model, safe='')}", headers=AUTH)
    check(response)
    assert response.status_code in (200, 404)


def test_the_harness_reaches_the_backend(harness: Harness) -> None:
    """Sanity: valid requests succeed through the harness (so the properties above test something)."""
    for path, body in VALID.items():
        response = harness.post(path, orjson.dumps(body))
        assert response.status_code == 200, response.text
    assert math.isnan(json.loads(encode(float("nan"))))
