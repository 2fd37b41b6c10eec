"""The contract cases: the same requests, sent to any engine (the bundled mock or a real vLLM), observed alike.

Each case sends one request and returns an `Observation`: the HTTP status, the media type, the shape of the
body (or of the SSE event sequence, or the metric families the router reads) and a few VALUES that must be the
same on both sides (finish_reason, error type and code). `tests.contract.capture` records the observations of a
real vLLM as golden files; the tests compare any engine against them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.contract.shape import Shape, shape, stream_shape

# The families the routing strategies and the health probe read from a backend's /metrics.
ROUTER_METRICS = {
    "vllm:num_requests_waiting": "gauge",
    "vllm:num_requests_running": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:prefix_cache_hits": "counter",  # prometheus_client strips _total from a counter family's name
    "vllm:prefix_cache_queries": "counter",
}

CAPITAL = "In one word, can you provide me the capital of France?"  # SmolLM2 and the mock both stop by themselves
STORY = "Write a long story about a dragon."  # both go on past CUT tokens: cut by max_tokens ("length")
CUT = 6  # max_tokens of the cut cases: enough tokens that a real vLLM under load never merges them all in one chunk
LONG_PROMPT = "hello " * 2100  # over max_model_len 2048 on both (mock: one token per word; SmolLM2: ~1 per word)
EMBED_LONG = "hello " * 300  # over the embedding model's 256 tokens (and the mock's 2048 only if configured)


@dataclass(frozen=True)
class Engine:
    """Where an engine answers and what it serves."""

    name: str  # "mock" or "vllm"
    url: str  # chat/completions/tokenize server
    model: str
    embed_url: str | None = None
    embed_model: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Observation:
    """What one case saw: compared with the golden one by value (status, media type, values) and by shape."""

    status: int
    media_type: str
    shape: Shape
    values: dict[str, Any] = field(default_factory=dict)
    raw: Any = None  # the parsed body / events / families, for the semantic checks (never written to golden)

    def golden(self) -> dict[str, Any]:
        """The JSON-able part recorded in a golden file."""
        return {"status": self.status, "media_type": self.media_type, "values": self.values, "shape": self.shape}


def _media(response: httpx.Response) -> str:
    return response.headers.get("content-type", "").split(";")[0].strip()


def _json_obs(response: httpx.Response, values: Callable[[Any], dict[str, Any]] | None = None) -> Observation:
    body = response.json() if response.content else None
    return Observation(
        status=response.status_code,
        media_type=_media(response),
        shape=shape(body),
        values=values(body) if values and isinstance(body, dict) else {},
        raw=body,
    )


def parse_sse(text: str) -> list[Any]:
    """Parse an SSE body of `data:` events into JSON values (the literal "[DONE]" kept as a string)."""
    events: list[Any] = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        data = "\n".join(line[5:].lstrip() for line in block.split("\n") if line.startswith("data:"))
        if data:
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def _finish_reasons(events: list[Any]) -> list[str]:
    out = []
    for event in events:
        if isinstance(event, dict):
            out += [c["finish_reason"] for c in event.get("choices", []) if c.get("finish_reason") is not None]
    return out


def _stream_obs(response: httpx.Response) -> Observation:
    if _media(response) != "text/event-stream":  # an error answered before the stream: plain JSON
        return _json_obs(response, _error_values)
    events = parse_sse(response.text)
    return Observation(
        status=response.status_code,
        media_type="text/event-stream",
        shape=stream_shape(events),
        values={"finish_reasons": _finish_reasons(events)},
        raw=events,
    )


def _error_values(body: dict[str, Any]) -> dict[str, Any]:
    error = body.get("error")
    if not isinstance(error, dict):
        return {}
    return {"error.type": error.get("type"), "error.code": error.get("code")}


def _choice_values(body: dict[str, Any]) -> dict[str, Any]:
    if "error" in body:
        return _error_values(body)
    return {"finish_reasons": [c.get("finish_reason") for c in body.get("choices", [])]}


def _chat(engine: Engine, http: httpx.Client, *, prompt: str = STORY, **extra: Any) -> dict[str, Any]:
    return {"model": engine.model, "messages": [{"role": "user", "content": prompt}], "temperature": 0, **extra}


# --- the cases ----------------------------------------------------------------------------------------------


def chat_stop(engine: Engine, http: httpx.Client) -> Observation:
    """Non-streamed chat that ends by itself: finish_reason "stop"."""
    return _json_obs(
        http.post(f"{engine.url}/v1/chat/completions", json=_chat(engine, http, prompt=CAPITAL, max_tokens=50)),
        _choice_values,
    )


def chat_length(engine: Engine, http: httpx.Client) -> Observation:
    """Non-streamed chat cut by max_tokens: finish_reason "length"."""
    body = _chat(engine, http, max_tokens=CUT)
    return _json_obs(http.post(f"{engine.url}/v1/chat/completions", json=body), _choice_values)


def _stream(engine: Engine, http: httpx.Client, path: str, body: dict[str, Any]) -> Observation:
    with http.stream("POST", f"{engine.url}{path}", json=body) as response:
        response.read()
    return _stream_obs(response)


def chat_stream_stop(engine: Engine, http: httpx.Client) -> Observation:
    """Streamed chat with include_usage that ends by itself: role, content, empty finish chunk, usage, [DONE]."""
    body = _chat(engine, http, prompt=CAPITAL, max_tokens=50, stream=True, stream_options={"include_usage": True})
    return _stream(engine, http, "/v1/chat/completions", body)


def chat_stream_length(engine: Engine, http: httpx.Client) -> Observation:
    """Streamed chat cut by max_tokens: the last token's chunk carries finish_reason "length"."""
    body = _chat(engine, http, max_tokens=CUT, stream=True, stream_options={"include_usage": True})
    return _stream(engine, http, "/v1/chat/completions", body)


def chat_stream_no_usage(engine: Engine, http: httpx.Client) -> Observation:
    """Streamed chat without stream_options: no usage chunk."""
    return _stream(engine, http, "/v1/chat/completions", _chat(engine, http, max_tokens=CUT, stream=True))


def chat_stream_continuous_usage(engine: Engine, http: httpx.Client) -> Observation:
    """stream_options.continuous_usage_stats: a usage object in every chunk."""
    opts = {"include_usage": True, "continuous_usage_stats": True}
    body = _chat(engine, http, max_tokens=CUT, stream=True, stream_options=opts)
    return _stream(engine, http, "/v1/chat/completions", body)


def chat_logprobs(engine: Engine, http: httpx.Client) -> Observation:
    """Non-streamed chat with logprobs: true (vLLM fills choices[].logprobs.content)."""
    body = _chat(engine, http, max_tokens=CUT, logprobs=True)
    return _json_obs(http.post(f"{engine.url}/v1/chat/completions", json=body), _choice_values)


def completion(engine: Engine, http: httpx.Client) -> Observation:
    """Non-streamed /v1/completions cut by max_tokens."""
    body = {"model": engine.model, "prompt": "Once upon a time", "max_tokens": CUT, "temperature": 0}
    return _json_obs(http.post(f"{engine.url}/v1/completions", json=body), _choice_values)


def completion_stream(engine: Engine, http: httpx.Client) -> Observation:
    """Streamed /v1/completions with include_usage."""
    body = {
        "model": engine.model,
        "prompt": "Once upon a time",
        "max_tokens": CUT,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return _stream(engine, http, "/v1/completions", body)


def models(engine: Engine, http: httpx.Client) -> Observation:
    """GET /v1/models."""
    return _json_obs(http.get(f"{engine.url}/v1/models"))


def tokenize_prompt(engine: Engine, http: httpx.Client) -> Observation:
    """POST /tokenize with a prompt."""
    return _json_obs(http.post(f"{engine.url}/tokenize", json={"model": engine.model, "prompt": "Hello world"}))


def tokenize_messages(engine: Engine, http: httpx.Client) -> Observation:
    """POST /tokenize with chat messages (the count the router compares with usage.prompt_tokens)."""
    body = {"model": engine.model, "messages": [{"role": "user", "content": CAPITAL}]}
    return _json_obs(http.post(f"{engine.url}/tokenize", json=body))


def detokenize(engine: Engine, http: httpx.Client) -> Observation:
    """POST /detokenize with the ids /tokenize gave."""
    ids = http.post(f"{engine.url}/tokenize", json={"model": engine.model, "prompt": "Hello world"}).json()["tokens"]
    return _json_obs(http.post(f"{engine.url}/detokenize", json={"model": engine.model, "tokens": ids}))


def tokenize_token_strs(engine: Engine, http: httpx.Client) -> Observation:
    """POST /tokenize with return_token_strs: the token strings too."""
    body = {"model": engine.model, "prompt": "Hello world", "return_token_strs": True}
    return _json_obs(http.post(f"{engine.url}/tokenize", json=body))


def metrics(engine: Engine, http: httpx.Client) -> Observation:
    """GET /metrics: the families the router reads, with their types."""
    response = http.get(f"{engine.url}/metrics")
    families = {f.name: f.type for f in text_string_to_metric_families(response.text) if f.name in ROUTER_METRICS}
    return Observation(
        status=response.status_code,
        media_type=_media(response),
        shape=dict(sorted(families.items())),  # names and types ARE the shape here
        raw=families,
    )


def health(engine: Engine, http: httpx.Client) -> Observation:
    """GET /health: 200, empty body."""
    response = http.get(f"{engine.url}/health")
    return Observation(status=response.status_code, media_type="", shape="empty" if not response.content else "body")


def version(engine: Engine, http: httpx.Client) -> Observation:
    """GET /version."""
    return _json_obs(http.get(f"{engine.url}/version"))


def _embed_engine(engine: Engine) -> tuple[str, str]:
    if not engine.embed_url or not engine.embed_model:
        raise LookupError("no embedding server configured (VLLM_EMBED_URL)")
    return engine.embed_url, engine.embed_model


def embeddings(engine: Engine, http: httpx.Client) -> Observation:
    """POST /v1/embeddings with two inputs, floats."""
    url, model = _embed_engine(engine)
    return _json_obs(http.post(f"{url}/v1/embeddings", json={"model": model, "input": ["a cat", "a dog"]}))


def embeddings_base64(engine: Engine, http: httpx.Client) -> Observation:
    """POST /v1/embeddings, encoding_format base64."""
    url, model = _embed_engine(engine)
    body = {"model": model, "input": "a cat", "encoding_format": "base64"}
    return _json_obs(http.post(f"{url}/v1/embeddings", json=body))


RERANK_QUERY = "Where is the cat sleeping?"
RERANK_DOCS = ["The cat is sleeping on the sofa.", "Quarterly revenue grew by eight percent.", "A kitten naps."]


def rerank(engine: Engine, http: httpx.Client) -> Observation:
    """POST /rerank on the embedding server (vLLM scores with an embedding model as a bi-encoder)."""
    url, model = _embed_engine(engine)
    body = {"model": model, "query": RERANK_QUERY, "documents": RERANK_DOCS}
    return _json_obs(http.post(f"{url}/rerank", json=body))


def rerank_top_n(engine: Engine, http: httpx.Client) -> Observation:
    """POST /v2/rerank with top_n 1: only the most relevant document."""
    url, model = _embed_engine(engine)
    body = {"model": model, "query": RERANK_QUERY, "documents": RERANK_DOCS, "top_n": 1}
    return _json_obs(http.post(f"{url}/v2/rerank", json=body))


def score(engine: Engine, http: httpx.Client) -> Observation:
    """POST /score, one query against documents (1:N)."""
    url, model = _embed_engine(engine)
    body = {"model": model, "queries": RERANK_QUERY, "documents": RERANK_DOCS}
    return _json_obs(http.post(f"{url}/score", json=body))


def score_pairs(engine: Engine, http: httpx.Client) -> Observation:
    """POST /v1/score with text_1/text_2 lists scored pairwise (N:N); the second pair is a text with itself."""
    url, model = _embed_engine(engine)
    body = {"model": model, "text_1": RERANK_DOCS[:2], "text_2": [RERANK_DOCS[1], RERANK_DOCS[1]]}
    return _json_obs(http.post(f"{url}/v1/score", json=body))


# --- the Responses API (stored responses need VLLM_ENABLE_RESPONSES_API_STORE=1, as scripts/real_backend.sh sets) ---


def _responses(engine: Engine, *, text: str = CAPITAL, **extra: Any) -> dict[str, Any]:
    return {"model": engine.model, "input": text, "temperature": 0, **extra}


def _response_values(body: dict[str, Any]) -> dict[str, Any]:
    if "error" in body:
        return _error_values(body)
    return {"status": body.get("status"), "incomplete_details": body.get("incomplete_details")}


def _event_types(events: list[Any]) -> list[str]:
    """The stream's event types, consecutive repeats collapsed (the number of deltas is the model's business)."""
    types: list[str] = []
    for event in events:
        kind = event.get("type") if isinstance(event, dict) else str(event)
        if not types or types[-1] != kind:
            types.append(str(kind))
    return types


def responses_stop(engine: Engine, http: httpx.Client) -> Observation:
    """POST /v1/responses that ends by itself: status "completed", one output message."""
    body = _responses(engine, max_output_tokens=50)
    return _json_obs(http.post(f"{engine.url}/v1/responses", json=body), _response_values)


def responses_length(engine: Engine, http: httpx.Client) -> Observation:
    """POST /v1/responses cut by max_output_tokens: status "incomplete", reason max_output_tokens."""
    body = _responses(engine, text=STORY, max_output_tokens=CUT)
    return _json_obs(http.post(f"{engine.url}/v1/responses", json=body), _response_values)


def responses_stream(engine: Engine, http: httpx.Client) -> Observation:
    """Streamed /v1/responses: typed events (`event:` lines), created ... deltas ... completed, no [DONE]."""
    body = _responses(engine, text=STORY, max_output_tokens=CUT, stream=True)
    with http.stream("POST", f"{engine.url}/v1/responses", json=body) as response:
        response.read()
    if _media(response) != "text/event-stream":
        return _json_obs(response, _error_values)
    events = parse_sse(response.text)
    named = [line[len("event: ") :] for line in response.text.splitlines() if line.startswith("event: ")]
    return Observation(
        status=response.status_code,
        media_type="text/event-stream",
        shape=stream_shape(events),
        values={"types": _event_types(events), "event_lines_match": named == [e.get("type") for e in events]},
        raw=events,
    )


def responses_retrieve(engine: Engine, http: httpx.Client) -> Observation:
    """GET /v1/responses/{id} of a stored response: the same object again."""
    created = http.post(f"{engine.url}/v1/responses", json=_responses(engine, max_output_tokens=50)).json()
    return _json_obs(http.get(f"{engine.url}/v1/responses/{created.get('id')}"), _response_values)


def error_responses_unknown_id(engine: Engine, http: httpx.Client) -> Observation:
    """GET /v1/responses/{id} of no stored response: 404."""
    return _json_obs(http.get(f"{engine.url}/v1/responses/resp_{'0' * 32}"), _error_values)


def error_responses_cancel_sync(engine: Engine, http: httpx.Client) -> Observation:
    """POST /v1/responses/{id}/cancel of a response that was not a background one: 400."""
    created = http.post(f"{engine.url}/v1/responses", json=_responses(engine, max_output_tokens=5)).json()
    return _json_obs(http.post(f"{engine.url}/v1/responses/{created.get('id')}/cancel"), _error_values)


def error_responses_missing_input(engine: Engine, http: httpx.Client) -> Observation:
    """POST /v1/responses without input: 400 (request validation)."""
    return _json_obs(http.post(f"{engine.url}/v1/responses", json={"model": engine.model}), _error_values)


# --- errors: the same bad input must give the same status and error object ----------------------------------


def error_unknown_model(engine: Engine, http: httpx.Client) -> Observation:
    """Chat with a model the server does not serve: 404."""
    body = _chat(engine, http, max_tokens=5) | {"model": "no-such-model"}
    return _json_obs(http.post(f"{engine.url}/v1/chat/completions", json=body), _error_values)


def error_max_tokens_negative(engine: Engine, http: httpx.Client) -> Observation:
    """max_tokens -1: 400."""
    return _json_obs(
        http.post(f"{engine.url}/v1/chat/completions", json=_chat(engine, http, max_tokens=-1)), _error_values
    )


def error_max_tokens_over_context(engine: Engine, http: httpx.Client) -> Observation:
    """max_tokens larger than max_model_len: 400."""
    body = _chat(engine, http, max_tokens=5000)
    return _json_obs(http.post(f"{engine.url}/v1/chat/completions", json=body), _error_values)


def error_prompt_too_long(engine: Engine, http: httpx.Client) -> Observation:
    """A prompt longer than the context: 400."""
    body = {"model": engine.model, "messages": [{"role": "user", "content": LONG_PROMPT}], "max_tokens": 5}
    return _json_obs(http.post(f"{engine.url}/v1/chat/completions", json=body), _error_values)


def error_prompt_too_long_stream(engine: Engine, http: httpx.Client) -> Observation:
    """The same, streamed: still a plain JSON 400, not SSE."""
    body = {
        "model": engine.model,
        "messages": [{"role": "user", "content": LONG_PROMPT}],
        "max_tokens": 5,
        "stream": True,
    }
    return _stream(engine, http, "/v1/chat/completions", body)


def error_missing_messages(engine: Engine, http: httpx.Client) -> Observation:
    """Chat without messages: 400 (request validation)."""
    return _json_obs(http.post(f"{engine.url}/v1/chat/completions", json={"model": engine.model}), _error_values)


def error_body_not_object(engine: Engine, http: httpx.Client) -> Observation:
    """A JSON body that is not an object: 400 (request validation)."""
    return _json_obs(http.post(f"{engine.url}/v1/chat/completions", json=[1]), _error_values)


def error_n_zero(engine: Engine, http: httpx.Client) -> Observation:
    """n 0: 400."""
    return _json_obs(
        http.post(f"{engine.url}/v1/chat/completions", json=_chat(engine, http, max_tokens=CUT, n=0)), _error_values
    )


def error_bad_json(engine: Engine, http: httpx.Client) -> Observation:
    """A body that is not JSON: 400."""
    response = http.post(
        f"{engine.url}/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"}
    )
    return _json_obs(response, _error_values)


def error_tokenize_unknown_model(engine: Engine, http: httpx.Client) -> Observation:
    """/tokenize with an unknown model: 404."""
    return _json_obs(
        http.post(f"{engine.url}/tokenize", json={"model": "no-such-model", "prompt": "hi"}), _error_values
    )


def error_embeddings_unknown_model(engine: Engine, http: httpx.Client) -> Observation:
    """/v1/embeddings with an unknown model: 404."""
    url, _ = _embed_engine(engine)
    return _json_obs(http.post(f"{url}/v1/embeddings", json={"model": "no-such-model", "input": "hi"}), _error_values)


def error_rerank_unknown_model(engine: Engine, http: httpx.Client) -> Observation:
    """/rerank with an unknown model: 404."""
    url, _ = _embed_engine(engine)
    body = {"model": "no-such-model", "query": "q", "documents": ["d"]}
    return _json_obs(http.post(f"{url}/rerank", json=body), _error_values)


def error_rerank_missing_query(engine: Engine, http: httpx.Client) -> Observation:
    """/rerank without a query: 400 (request validation)."""
    url, model = _embed_engine(engine)
    return _json_obs(http.post(f"{url}/rerank", json={"model": model, "documents": ["d"]}), _error_values)


def error_score_lengths(engine: Engine, http: httpx.Client) -> Observation:
    """/score with 2 queries for 3 documents (neither 1:N nor N:N): 400."""
    url, model = _embed_engine(engine)
    body = {"model": model, "queries": ["a", "b"], "documents": ["a", "b", "c"]}
    return _json_obs(http.post(f"{url}/score", json=body), _error_values)


def error_rerank_on_chat_server(engine: Engine, http: httpx.Client) -> Observation:
    """/rerank on a generative model's server: 404, the route does not exist there (FastAPI's {"detail": ...})."""
    return _json_obs(http.post(f"{engine.url}/rerank", json={"model": engine.model, "query": "q", "documents": ["d"]}))


def error_unknown_path(engine: Engine, http: httpx.Client) -> Observation:
    """A path the server does not have: 404 (FastAPI's {"detail": ...})."""
    return _json_obs(http.get(f"{engine.url}/v1/no-such-endpoint"))


CASES: dict[str, Callable[[Engine, httpx.Client], Observation]] = {
    f.__name__: f
    for f in (
        chat_stop,
        chat_length,
        chat_stream_stop,
        chat_stream_length,
        chat_stream_no_usage,
        chat_stream_continuous_usage,
        chat_logprobs,
        completion,
        completion_stream,
        models,
        tokenize_prompt,
        tokenize_messages,
        detokenize,
        tokenize_token_strs,
        metrics,
        health,
        version,
        embeddings,
        embeddings_base64,
        rerank,
        rerank_top_n,
        score,
        score_pairs,
        responses_stop,
        responses_length,
        responses_stream,
        responses_retrieve,
        error_responses_unknown_id,
        error_responses_cancel_sync,
        error_responses_missing_input,
        error_unknown_model,
        error_max_tokens_negative,
        error_max_tokens_over_context,
        error_prompt_too_long,
        error_prompt_too_long_stream,
        error_missing_messages,
        error_body_not_object,
        error_n_zero,
        error_bad_json,
        error_tokenize_unknown_model,
        error_embeddings_unknown_model,
        error_rerank_unknown_model,
        error_rerank_missing_query,
        error_score_lengths,
        error_rerank_on_chat_server,
        error_unknown_path,
    )
}
EMBEDDING_CASES = frozenset(
    {
        "embeddings",
        "embeddings_base64",
        "error_embeddings_unknown_model",
        "rerank",
        "rerank_top_n",
        "score",
        "score_pairs",
        "error_rerank_unknown_model",
        "error_rerank_missing_query",
        "error_score_lengths",
    }
)
