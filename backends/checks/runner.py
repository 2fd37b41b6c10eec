"""The async check runner: sends each case straight to each backend and classifies the outcome precisely.

A case calls one endpoint (`CaseSpec.endpoint`): a chat completion (plain or streamed), a Responses API request
(`/v1/responses`, not stored) or a rerank (`/v1/rerank`, whose answer is the text of the top-ranked document); the
answer is judged the same way for all (contains / equals / regex, finish reason "length", token count for chat).

No database access here (the service builds the targets and stores the outcomes): the runner takes plain
dataclasses, runs every backend in parallel with at most `per_backend` checks in flight on each, and returns one
`CheckOutcome` per target, in order. It runs in the Celery worker or the `run_checks` command, never in a web
process.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from backends.checks.models import ANSWER_MAX_CHARS, CaseEndpoint, CheckCause, Expectation
from backends.models import InvalidApiKeyError, bearer_headers
from core.errors import error_message_from

logger = logging.getLogger(__name__)

PER_BACKEND_CONCURRENCY = 2
"""Checks in flight at once on one backend (backends run in parallel with each other)."""

# Error texts that mean the GPU (or host) ran out of memory: PyTorch/CUDA, vLLM and allocator wordings.
_OOM_RE = re.compile(
    r"out of memory|outofmemoryerror|\boom\b|cuda_error_out_of_memory|cublas_status_alloc_failed"
    r"|cannot allocate memory|failed to allocate|not enough memory",
    re.IGNORECASE,
)
_ERROR_TEXT_MAX = 1000


@dataclass(frozen=True, slots=True)
class BackendTarget:
    """Where and how to reach one backend."""

    id: int
    name: str
    base_url: str
    api_key: str = ""
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 120.0


@dataclass(frozen=True, slots=True)
class CaseSpec:
    """What to send and what to expect (a plain copy of a CheckCase)."""

    id: int | None
    name: str
    messages: list[dict[str, Any]]
    temperature: float | None = 0.0
    max_tokens: int | None = None
    stream: bool = False
    extra_params: dict[str, Any] = field(default_factory=dict)
    expectation: str = Expectation.CONTAINS
    expected_text: str = ""
    case_sensitive: bool = False
    latency_budget_s: float = 120.0
    slow_threshold_s: float = 30.0
    endpoint: str = CaseEndpoint.CHAT
    query: str = ""
    documents: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class CheckTarget:
    """One check: a case sent to one model on one backend."""

    backend: BackendTarget
    model_id: int | None
    model_name: str
    served_name: str
    case: CaseSpec


@dataclass(slots=True)
class CheckOutcome:
    """What one check observed and how it was judged."""

    target: CheckTarget
    passed: bool
    cause: str = ""
    error: str = ""
    answer: str = ""
    finish_reason: str = ""
    latency_ms: float | None = None
    ttft_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    http_status: int | None = None


@dataclass(slots=True)
class _Observed:
    """Raw observations of one completion request."""

    answer: str = ""
    finish_reason: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_s: float | None = None
    http_status: int | None = None


class BackendHTTPError(Exception):
    """The backend answered with an error status (or an error event inside a stream)."""

    def __init__(self, status: int | None, message: str, what: str = "") -> None:
        """Keep the status and the backend's own message."""
        super().__init__(message)
        self.status = status
        self.message = message
        self.what = what


class BadResponse(Exception):
    """The backend answered 200 with something that is not the endpoint's answer (completion, response, ranking)."""


# -- classification (pure functions) ------------------------------------------------------------------------


def classify_backend_error(status: int | None, message: str) -> str:
    """Out of memory when the message says so (whatever the status), else a backend error."""
    return CheckCause.OUT_OF_MEMORY if _OOM_RE.search(message or "") else CheckCause.BACKEND_ERROR


def answer_matches(case: CaseSpec, answer: str) -> bool:
    """Whether an answer satisfies a contains / equals / regex expectation."""
    expected = case.expected_text
    if case.expectation == Expectation.REGEX:
        flags = 0 if case.case_sensitive else re.IGNORECASE
        return re.search(expected, answer, flags) is not None
    got, want = (answer, expected) if case.case_sensitive else (answer.casefold(), expected.casefold())
    if case.expectation == Expectation.EQUALS:
        return got.strip() == want.strip()
    return want in got


def judge(
    case: CaseSpec,
    *,
    answer: str,
    finish_reason: str,
    latency_s: float,
    prompt_tokens: int | None,
    tokenize_count: int | None = None,
) -> tuple[str, str]:
    """Judge a complete answer: ("", "") when it passes, else (cause, explanation)."""
    kind = case.expectation
    if kind == Expectation.TOKEN_COUNT:
        if prompt_tokens is None:
            return CheckCause.TOKEN_MISMATCH, "the answer reported no usage.prompt_tokens"
        if prompt_tokens != tokenize_count:
            return (
                CheckCause.TOKEN_MISMATCH,
                f"usage.prompt_tokens is {prompt_tokens} but /tokenize counts {tokenize_count} for the same messages",
            )
    elif kind == Expectation.FINISH_LENGTH:
        if finish_reason != "length":
            return (
                CheckCause.WRONG_ANSWER,
                f'finish_reason is "{finish_reason or "none"}", expected "length" (max_tokens={case.max_tokens})',
            )
    elif not answer_matches(case, answer):
        verbs: dict[str, str] = {Expectation.EQUALS: "equal", Expectation.REGEX: "match"}
        what = verbs.get(kind, "contain")
        if finish_reason == "length":
            return (
                CheckCause.TRUNCATED,
                f'the answer was cut at max_tokens={case.max_tokens} (finish_reason "length") '
                f"before it could {what} {case.expected_text!r}",
            )
        return CheckCause.WRONG_ANSWER, f"the answer does not {what} {case.expected_text!r}"
    if latency_s > case.slow_threshold_s:
        return CheckCause.SLOW, f"took {latency_s:.2f} s, over the slow threshold of {case.slow_threshold_s:g} s"
    return "", ""


# -- requests --------------------------------------------------------------------------------------------


def _request_body(target: CheckTarget) -> dict[str, Any]:
    """The chat completion request of a check."""
    case = target.case
    body: dict[str, Any] = {**case.extra_params, "model": target.served_name, "messages": case.messages}
    if case.temperature is not None:
        body["temperature"] = case.temperature
    if case.max_tokens is not None:
        body["max_tokens"] = case.max_tokens
    if case.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


async def _raise_for_status(response: httpx.Response, what: str) -> None:
    """Turn an error status into BackendHTTPError carrying the backend's message."""
    if response.status_code >= 400:
        body = await response.aread()
        message = error_message_from(body) or response.reason_phrase
        raise BackendHTTPError(response.status_code, message, what)


def _int_or_none(value: Any) -> int | None:
    """An int from JSON, or None for anything else (booleans included)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


async def _complete(client: httpx.AsyncClient, target: CheckTarget) -> _Observed:
    """Send a non-streamed chat completion and read answer, finish reason and usage."""
    response = await client.post("/v1/chat/completions", json=_request_body(target))
    await _raise_for_status(response, "chat completion")
    try:
        data = response.json()
        choice = data["choices"][0]
        usage = data.get("usage") or {}
        return _Observed(
            answer=str(choice["message"].get("content") or ""),
            finish_reason=str(choice.get("finish_reason") or ""),
            prompt_tokens=_int_or_none(usage.get("prompt_tokens")),
            completion_tokens=_int_or_none(usage.get("completion_tokens")),
            http_status=response.status_code,
        )
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise BadResponse(f"not an OpenAI chat completion: {response.text[:200]!r}") from exc


async def _complete_streamed(client: httpx.AsyncClient, target: CheckTarget, start: float) -> _Observed:
    """Send a streamed chat completion; time the first token and collect text, finish reason and usage."""
    observed = _Observed()
    parts: list[str] = []
    async with client.stream("POST", "/v1/chat/completions", json=_request_body(target)) as response:
        await _raise_for_status(response, "chat completion (stream)")
        observed.http_status = response.status_code
        event = ""
        done = False
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line[len("event:") :].strip()
                continue
            if not line.startswith("data:"):
                continue
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                done = True
                break
            try:
                chunk = orjson.loads(data)
            except orjson.JSONDecodeError as exc:
                raise BadResponse(f"stream sent a line that is not JSON: {data[:200]!r}") from exc
            if event == "error" or (isinstance(chunk, dict) and "error" in chunk):
                raise BackendHTTPError(None, error_message_from(data), "stream")
            _read_chunk(chunk, observed, parts, start)
        if not done and not observed.finish_reason:
            raise BadResponse("the stream ended without a finish_reason or [DONE]")
    observed.answer = "".join(parts)
    return observed


def _read_chunk(chunk: Any, observed: _Observed, parts: list[str], start: float) -> None:
    """Fold one SSE chunk into the observations."""
    if not isinstance(chunk, dict):
        raise BadResponse(f"stream chunk is not an object: {chunk!r:.200}")
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        observed.prompt_tokens = _int_or_none(usage.get("prompt_tokens"))
        observed.completion_tokens = _int_or_none(usage.get("completion_tokens"))
    for choice in chunk.get("choices") or []:
        if not isinstance(choice, dict) or choice.get("index", 0) != 0:
            continue
        content = (choice.get("delta") or {}).get("content")
        if content:
            if observed.ttft_s is None:
                observed.ttft_s = time.perf_counter() - start
            parts.append(str(content))
        if choice.get("finish_reason"):
            observed.finish_reason = str(choice["finish_reason"])


def _responses_body(target: CheckTarget) -> dict[str, Any]:
    """The Responses API request of a check: the messages as `input`, max_tokens as `max_output_tokens`."""
    case = target.case
    body: dict[str, Any] = {**case.extra_params, "model": target.served_name, "input": case.messages}
    if case.temperature is not None:
        body["temperature"] = case.temperature
    if case.max_tokens is not None:
        body["max_output_tokens"] = case.max_tokens
    body["store"] = False  # a check leaves nothing on the backend
    return body


async def _respond(client: httpx.AsyncClient, target: CheckTarget) -> _Observed:
    """Send a non-streamed Responses API request and read the output text, how it ended and its usage.

    The answer is the text of the `output_text` parts of the `message` items (reasoning items are not the
    answer); a response `incomplete` because of `max_output_tokens` is reported as finish reason "length".
    """
    response = await client.post("/v1/responses", json=_responses_body(target))
    await _raise_for_status(response, "/v1/responses")
    try:
        data = response.json()
        if data.get("object") != "response" or not isinstance(data.get("output"), list):
            raise BadResponse(f"not a Responses API response: {response.text[:200]!r}")
        status = str(data.get("status") or "")
        if status == "failed":
            raise BackendHTTPError(None, error_message_from(orjson.dumps(data)), "/v1/responses (status failed)")
        parts = [
            str(part.get("text") or "")
            for item in data["output"]
            if isinstance(item, dict) and item.get("type") == "message"
            for part in item.get("content") or []
            if isinstance(part, dict) and part.get("type") == "output_text"
        ]
        reason = str((data.get("incomplete_details") or {}).get("reason") or "")
        usage = data.get("usage") or {}
        return _Observed(
            answer="".join(parts),
            finish_reason="length" if reason == "max_output_tokens" else reason or status,
            prompt_tokens=_int_or_none(usage.get("input_tokens")),
            completion_tokens=_int_or_none(usage.get("output_tokens")),
            http_status=response.status_code,
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BadResponse(f"not a Responses API response: {response.text[:200]!r}") from exc


async def _rerank(client: httpx.AsyncClient, target: CheckTarget) -> _Observed:
    """Send a rerank request (vLLM's /v1/rerank, Jina/Cohere shape); the answer is the top-ranked document's text.

    vLLM sorts `results` by relevance; the runner sorts again (by `relevance_score`, highest first) rather than
    trust the order, and reads the document through its `index` into the case's documents.
    """
    case = target.case
    body: dict[str, Any] = {
        **case.extra_params,
        "model": target.served_name,
        "query": case.query,
        "documents": case.documents,
    }
    response = await client.post("/v1/rerank", json=body)
    await _raise_for_status(response, "/v1/rerank")
    try:
        data = response.json()
        results = data["results"]
        if not isinstance(results, list) or not results:
            raise BadResponse(f"the ranking has no results: {response.text[:200]!r}")
        ranked = sorted(results, key=lambda r: float(r["relevance_score"]), reverse=True)
        top = ranked[0]["index"]
        if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top < len(case.documents):
            raise BadResponse(f"the top result's index {top!r} is not one of the {len(case.documents)} documents")
        usage = data.get("usage") or {}
        return _Observed(
            answer=case.documents[top],
            finish_reason="",
            prompt_tokens=_int_or_none(usage.get("prompt_tokens")),
            http_status=response.status_code,
        )
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise BadResponse(f"not a rerank answer: {response.text[:200]!r}") from exc


async def _tokenize_count(client: httpx.AsyncClient, target: CheckTarget) -> int:
    """The backend's own prompt token count of the case's messages (vLLM's POST /tokenize)."""
    response = await client.post("/tokenize", json={"model": target.served_name, "messages": target.case.messages})
    await _raise_for_status(response, "/tokenize")
    try:
        data = response.json()
        count = data.get("count")
        return int(count) if isinstance(count, int) else len(data["tokens"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BadResponse(f"/tokenize did not return a token count: {response.text[:200]!r}") from exc


# -- one check -------------------------------------------------------------------------------------------


def _ms(seconds: float | None) -> float | None:
    """Seconds to milliseconds rounded to 0.01, keeping None."""
    return None if seconds is None else round(seconds * 1000.0, 2)


async def run_check(client: httpx.AsyncClient, target: CheckTarget) -> CheckOutcome:
    """Run one check on a client bound to its backend and classify what happened."""
    case, backend = target.case, target.backend
    start = time.perf_counter()
    observed: _Observed | None = None
    latency_s: float | None = None

    def failed(cause: str, error: str, status: int | None = None) -> CheckOutcome:
        """A failed outcome with what was observed so far."""
        elapsed = latency_s if latency_s is not None else time.perf_counter() - start
        outcome = CheckOutcome(target, False, cause, error[:_ERROR_TEXT_MAX], latency_ms=_ms(elapsed))
        outcome.http_status = status
        if observed is not None:
            _copy_observed(outcome, observed)
        return outcome

    try:
        async with asyncio.timeout(case.latency_budget_s):
            if case.endpoint == CaseEndpoint.RESPONSES:
                observed = await _respond(client, target)
            elif case.endpoint == CaseEndpoint.RERANK:
                observed = await _rerank(client, target)
            elif case.stream:
                observed = await _complete_streamed(client, target, start)
            else:
                observed = await _complete(client, target)
            latency_s = time.perf_counter() - start
            tokenize_count = (
                await _tokenize_count(client, target) if case.expectation == Expectation.TOKEN_COUNT else None
            )
    except TimeoutError:
        what = "/tokenize did not answer" if observed is not None else "no complete answer"
        return failed(CheckCause.TIMEOUT, f"{what} within the latency budget of {case.latency_budget_s:g} s")
    except httpx.ConnectTimeout:
        return failed(
            CheckCause.UNREACHABLE, f"connecting to {backend.base_url} timed out after {backend.connect_timeout_s:g} s"
        )
    except httpx.TimeoutException as exc:
        return failed(
            CheckCause.TIMEOUT, f"no data for {backend.read_timeout_s:g} s (read timeout): {type(exc).__name__}"
        )
    except httpx.ConnectError as exc:
        return failed(CheckCause.UNREACHABLE, f"cannot connect to {backend.base_url}: {exc or type(exc).__name__}")
    except BackendHTTPError as exc:
        prefix = f"HTTP {exc.status}" if exc.status else "error event"
        where = f" from {exc.what}" if exc.what else ""
        return failed(classify_backend_error(exc.status, exc.message), f"{prefix}{where}: {exc.message}", exc.status)
    except BadResponse as exc:
        return failed(CheckCause.BACKEND_ERROR, str(exc))
    except httpx.HTTPError as exc:  # the connection broke mid-answer (RemoteProtocolError, ReadError, ...)
        return failed(CheckCause.BACKEND_ERROR, f"connection broke: {type(exc).__name__}: {exc}")
    cause, error = judge(
        case,
        answer=observed.answer,
        finish_reason=observed.finish_reason,
        latency_s=latency_s,
        prompt_tokens=observed.prompt_tokens,
        tokenize_count=tokenize_count,
    )
    outcome = CheckOutcome(target, not cause, cause, error, latency_ms=_ms(latency_s))
    _copy_observed(outcome, observed)
    return outcome


def _copy_observed(outcome: CheckOutcome, observed: _Observed) -> None:
    """Copy what was observed onto an outcome (answer cut to ANSWER_MAX_CHARS)."""
    outcome.answer = observed.answer[:ANSWER_MAX_CHARS]
    outcome.finish_reason = observed.finish_reason
    outcome.prompt_tokens = observed.prompt_tokens
    outcome.completion_tokens = observed.completion_tokens
    outcome.ttft_ms = _ms(observed.ttft_s)
    outcome.http_status = outcome.http_status or observed.http_status


# -- a whole run -----------------------------------------------------------------------------------------


def _client(backend: BackendTarget, transport: httpx.AsyncBaseTransport | None) -> httpx.AsyncClient:
    """An HTTP client bound to one backend with its key and timeouts."""
    timeout = httpx.Timeout(
        connect=backend.connect_timeout_s, read=backend.read_timeout_s, write=backend.read_timeout_s, pool=None
    )
    headers = bearer_headers(backend.api_key)  # InvalidApiKeyError (naming no secret) for a key no header can hold
    return httpx.AsyncClient(
        base_url=backend.base_url, timeout=timeout, headers=headers, transport=transport, follow_redirects=False
    )


async def run_checks(
    targets: Sequence[CheckTarget],
    *,
    per_backend: int = PER_BACKEND_CONCURRENCY,
    transport: httpx.AsyncBaseTransport | None = None,
) -> list[CheckOutcome]:
    """Run all targets: backends in parallel, at most `per_backend` checks at once on each; outcomes in order."""
    by_backend: dict[int, list[int]] = {}
    for index, target in enumerate(targets):
        by_backend.setdefault(target.backend.id, []).append(index)
    outcomes: list[CheckOutcome | None] = [None] * len(targets)

    async def one_backend(indexes: list[int]) -> None:
        """Check one backend's targets through one client, `per_backend` at a time."""
        limit = asyncio.Semaphore(max(1, per_backend))
        try:
            client = _client(targets[indexes[0]].backend, transport)
        except InvalidApiKeyError as exc:  # fails this backend's checks only; the message holds no secret
            for index in indexes:
                outcomes[index] = CheckOutcome(
                    targets[index], False, CheckCause.BACKEND_ERROR, f"{exc}; fix it in admin"
                )
            return
        async with client:

            async def one(index: int) -> None:
                """Run one check; a bug becomes a failed outcome instead of losing the run."""
                async with limit:
                    try:
                        outcomes[index] = await run_check(client, targets[index])
                    except Exception as exc:  # a bug must not lose the other results of the run
                        logger.exception("check %s failed unexpectedly", targets[index].case.name)
                        outcomes[index] = CheckOutcome(
                            targets[index], False, CheckCause.BACKEND_ERROR, f"unexpected error: {exc!r}"[:1000]
                        )

            await asyncio.gather(*(one(i) for i in indexes))

    await asyncio.gather(*(one_backend(indexes) for indexes in by_backend.values()))
    return [o for o in outcomes if o is not None]
