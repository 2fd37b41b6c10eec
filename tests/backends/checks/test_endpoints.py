"""The checks' Responses API and rerank cases: requests in vLLM's shapes, answers judged, targets by model kind.

The backend is an httpx transport answering as vLLM does (its ResponsesResponse and RerankResponse shapes, see
vllm/entrypoints/openai/responses/protocol.py and vllm/entrypoints/pooling/scoring/protocol.py), so these tests
pin what the runner sends and how it reads; tests/backends/checks/test_checks_e2e.py runs the seeded cases against
the real vLLM.
"""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest
from django.core.exceptions import ValidationError
from django.test import Client
from django.urls import reverse

from backends.checks.models import CaseEndpoint, CheckCase, CheckResult, CheckRun, RunTrigger
from backends.checks.report import run_markdown
from backends.checks.selectors import check_targets_build
from backends.checks.services import check_run_now
from backends.models import ServedModel
from tests.factories import backend_create, model_create, pool_create

pytestmark = pytest.mark.django_db

QUERY = "What is the capital of France?"
DOCUMENTS = [
    "Bananas are a good source of potassium.",
    "Paris is the capital and largest city of France.",
    "Berlin is the capital of Germany.",
]


def _response(text: str, *, status: str = "completed", reason: str | None = None) -> dict[str, Any]:
    """A vLLM ResponsesResponse (a reasoning item first: it is not the answer)."""
    return {
        "id": "resp_0123",
        "object": "response",
        "created_at": 1764633600,
        "model": "served-chat",
        "output": [
            {"id": "rs_1", "type": "reasoning", "content": [{"type": "reasoning_text", "text": "Lyon?"}]},
            {
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "status": status,
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": None}],
            },
        ],
        "status": status,
        "incomplete_details": {"reason": reason} if reason else None,
        "usage": {"input_tokens": 19, "output_tokens": 2, "total_tokens": 21},
    }


def _ranking(order: list[int], documents: list[str] = DOCUMENTS) -> dict[str, Any]:
    """A vLLM RerankResponse ranking `order` (document indexes, best first); listed unsorted on purpose."""
    results = [
        {"index": index, "document": {"text": documents[index]}, "relevance_score": 0.9 - 0.2 * rank}
        for rank, index in enumerate(order)
    ]
    return {"id": "rerank-1", "model": "served-embed", "usage": {"prompt_tokens": 31, "total_tokens": 31},
            "results": list(reversed(results))}  # fmt: skip


class FakeVLLM:
    """An httpx transport answering /v1/responses and /v1/rerank with the given bodies; keeps what it received."""

    def __init__(self, answers: dict[str, tuple[int, Any]]) -> None:
        self.answers = answers
        self.requests: dict[str, dict[str, Any]] = {}

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests[request.url.path] = orjson.loads(request.content)
        status, body = self.answers.get(request.url.path, (404, {"detail": "Not Found"}))
        return httpx.Response(status, json=body)

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)


@pytest.fixture
def registry() -> tuple[ServedModel, ServedModel]:
    """A pool with one backend, a chat model and an embedding (pooling) model."""
    pool = pool_create(name="p-mixed")
    backend_create(pool=pool, name="b1", base_url="http://vllm.test")
    chat = model_create(pool=pool, name="chat-model", served_name="served-chat")
    embed = model_create(pool=pool, name="embed-model", served_name="served-embed", kind="embedding")
    return chat, embed


def _only(**fields: Any) -> CheckCase:
    CheckCase.objects.update(enabled=False)
    case = CheckCase(name=fields.pop("name", "case"), **fields)
    case.full_clean(exclude=["models"])
    case.save()
    return case


def _responses_case(**fields: Any) -> CheckCase:
    values: dict[str, Any] = {
        "endpoint": CaseEndpoint.RESPONSES,
        "messages": [{"role": "user", "content": "In one word, can you provide me the capital of France?"}],
        "temperature": 0.1,
        "max_tokens": 50,
        "extra_params": {"seed": 1},
        "expectation": "contains",
        "expected_text": "Paris",
    }
    return _only(**{**values, **fields})


def _rerank_case(**fields: Any) -> CheckCase:
    values: dict[str, Any] = {
        "endpoint": CaseEndpoint.RERANK,
        "query": QUERY,
        "documents": DOCUMENTS,
        "temperature": None,
        "expectation": "equals",
        "expected_text": DOCUMENTS[1],
        "case_sensitive": True,
    }
    return _only(**{**values, **fields})


def _run(backend: FakeVLLM) -> tuple[CheckRun, CheckResult]:
    run = check_run_now(trigger=RunTrigger.COMMAND, triggered_by="test", transport=backend.transport)
    results = list(run.results.all())
    assert len(results) == 1, [(r.model_name, r.case_name, r.error) for r in results]
    return run, results[0]


def test_responses_case_sends_the_question_as_input_and_reads_the_output_text(registry: Any) -> None:
    _responses_case()
    backend = FakeVLLM({"/v1/responses": (200, _response("Paris"))})
    run, result = _run(backend)
    # the chat model was asked through the Responses API, not stored, with the case's parameters
    sent = backend.requests["/v1/responses"]
    assert sent == {
        "seed": 1,
        "model": "served-chat",
        "input": [{"role": "user", "content": "In one word, can you provide me the capital of France?"}],
        "temperature": 0.1,
        "max_output_tokens": 50,
        "store": False,
    }
    # and the answer is the message's output text (not the reasoning), with the Responses API's usage
    assert (result.model_name, result.outcome, result.cause) == ("chat-model", "pass", "")
    assert (result.answer, result.finish_reason, result.http_status) == ("Paris", "completed", 200)
    assert (result.prompt_tokens, result.completion_tokens) == (19, 2)
    assert run.status == "passed"


@pytest.mark.parametrize(
    ("answer", "cause", "error"),
    [
        ((200, _response("Lyon")), "wrong_answer", "does not contain 'Paris'"),
        ((200, _response("The", status="incomplete", reason="max_output_tokens")), "truncated", "max_tokens=50"),
        ((404, {"detail": "Not Found"}), "backend_error", "HTTP 404 from /v1/responses: Not Found"),
        ((200, {"object": "chat.completion", "choices": []}), "backend_error", "not a Responses API response"),
        (
            (200, {**_response(""), "status": "failed", "error": {"code": "server_error", "message": "engine died"}}),
            "backend_error",
            "engine died",
        ),
    ],
)
def test_responses_case_failures_are_classified(registry: Any, answer: Any, cause: str, error: str) -> None:
    _responses_case()
    _, result = _run(FakeVLLM({"/v1/responses": answer}))
    assert (result.outcome, result.cause) == ("fail", cause)
    assert error in result.error, result.error


def test_rerank_case_passes_when_the_relevant_document_is_ranked_first(registry: Any) -> None:
    _rerank_case()
    backend = FakeVLLM({"/v1/rerank": (200, _ranking([1, 2, 0]))})
    _, result = _run(backend)
    assert backend.requests["/v1/rerank"] == {"model": "served-embed", "query": QUERY, "documents": DOCUMENTS}
    assert (result.model_name, result.outcome, result.answer) == ("embed-model", "pass", DOCUMENTS[1])
    assert (result.prompt_tokens, result.http_status) == (31, 200)


def test_rerank_case_fails_when_another_document_comes_first(registry: Any) -> None:
    _rerank_case()
    _, result = _run(FakeVLLM({"/v1/rerank": (200, _ranking([2, 1, 0]))}))
    assert (result.outcome, result.cause, result.answer) == ("fail", "wrong_answer", DOCUMENTS[2])
    assert "does not equal 'Paris is the capital" in result.error


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        ((200, {"results": []}), "the ranking has no results"),
        ((200, {"results": [{"index": 7, "relevance_score": 1.0}]}), "index 7 is not one of the 3 documents"),
        ((200, {"data": [{"index": 0, "score": 1.0}]}), "not a rerank answer"),
        ((400, {"error": {"message": "rerank is not supported by this model", "code": 400}}), "not supported"),
    ],
)
def test_rerank_case_bad_answers_are_backend_errors(registry: Any, answer: Any, error: str) -> None:
    _rerank_case()
    _, result = _run(FakeVLLM({"/v1/rerank": answer}))
    assert (result.outcome, result.cause) == ("fail", "backend_error")
    assert error in result.error, result.error


def test_cases_apply_to_the_models_their_endpoint_serves(registry: tuple[ServedModel, ServedModel]) -> None:
    chat, embed = registry
    _rerank_case(name="rank")
    _responses_case(name="respond")  # (disables the others)
    CheckCase.objects.filter(name="rank").update(enabled=True)
    targets = {(t.model_name, t.case.name, t.case.endpoint) for t in check_targets_build()}
    assert targets == {("embed-model", "rank", "rerank"), ("chat-model", "respond", "responses")}
    # a case listing a model of the wrong kind does not send it there
    CheckCase.objects.get(name="rank").models.set([chat, embed])
    assert {(t.model_name, t.case.name) for t in check_targets_build()} == {
        ("embed-model", "rank"),
        ("chat-model", "respond"),
    }


def test_seeded_responses_and_rerank_cases_exist_after_migrate() -> None:
    cases = {c.name: c for c in CheckCase.objects.all()}
    responses = cases["capital-of-france-responses"]
    assert (responses.endpoint, responses.expectation, responses.expected_text) == ("responses", "contains", "Paris")
    assert responses.messages[0]["content"] == "In one word, can you provide me the capital of France?"
    assert responses.enabled and not responses.stream
    rerank = cases["rerank-capital-of-france"]
    assert rerank.endpoint == "rerank" and rerank.enabled and rerank.query
    assert rerank.expected_text in rerank.documents and rerank.documents.index(rerank.expected_text) > 0
    for case in (responses, rerank):
        case.full_clean(exclude=["models"])  # valid as seeded


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"endpoint": "rerank", "query": "", "documents": DOCUMENTS}, "query"),
        ({"endpoint": "rerank", "query": QUERY, "documents": ["only one"]}, "documents"),
        ({"endpoint": "rerank", "query": QUERY, "documents": [1, 2]}, "documents"),
        ({"endpoint": "rerank", "query": QUERY, "documents": DOCUMENTS, "stream": True}, "stream"),
        ({"endpoint": "rerank", "query": QUERY, "documents": DOCUMENTS, "expectation": "token_count"}, "expectation"),
        ({"endpoint": "responses", "stream": True}, "stream"),
        ({"endpoint": "responses", "expectation": "token_count"}, "expectation"),
        ({"endpoint": "responses", "messages": []}, "messages"),
        ({"endpoint": "responses", "extra_params": {"max_output_tokens": 3}}, "extra_params"),
    ],
)
def test_invalid_cases_name_the_field(fields: dict[str, Any], field: str) -> None:
    values: dict[str, Any] = {
        "name": "bad",
        "messages": [{"role": "user", "content": "hi"}],
        "expectation": "contains",
        "expected_text": "x",
        **fields,
    }
    with pytest.raises(ValidationError) as raised:
        CheckCase(**values).full_clean(exclude=["models"])
    assert field in raised.value.message_dict, raised.value.message_dict


def test_report_lists_each_case_with_its_endpoint(registry: Any) -> None:
    _responses_case(name="respond")
    backend = FakeVLLM({"/v1/responses": (200, _response("Paris"))})
    run, _ = _run(backend)
    text = run_markdown(run=run)
    assert "## Cases" in text and "- respond: `POST /v1/responses`" in text.splitlines()


def test_admin_shows_and_edits_endpoint_cases(admin_client: Client) -> None:
    listing = admin_client.get(reverse("admin:backends_checkcase_changelist") + "?endpoint=rerank").content.decode()
    assert "rerank-capital-of-france" in listing and "capital-of-france-stream" not in listing
    response = admin_client.post(
        reverse("admin:backends_checkcase_add"),
        {
            "name": "rank-admin",
            "endpoint": "rerank",
            "messages": "",
            "query": QUERY,
            "documents": orjson.dumps(DOCUMENTS).decode(),
            "extra_params": "{}",
            "expectation": "equals",
            "expected_text": DOCUMENTS[1],
            "latency_budget_s": "120",
            "slow_threshold_s": "30",
            "enabled": "on",
        },
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    case = CheckCase.objects.get(name="rank-admin")
    assert (case.endpoint, case.documents, case.query) == ("rerank", DOCUMENTS, QUERY)
    page = admin_client.get(reverse("admin:backends_checkcase_change", args=[case.pk])).content.decode()
    assert "all pooling models" in admin_client.get(reverse("admin:backends_checkcase_changelist")).content.decode()
    assert 'name="documents"' in page and 'name="query"' in page


@pytest.mark.parametrize(("kind", "knob"), [("embedding", "embed_models"), ("rerank", "rerank_models")])
def test_seeded_rerank_case_passes_on_the_mock_pooling_models(kind: str, knob: str) -> None:
    # given the bundled mock serving a pooling model (an embedding model reranks as a bi-encoder, a reranker as a
    # cross-encoder), registered with its kind next to a chat model
    from backends.mock_vllm import MockServer

    knobs: dict[str, Any] = {knob: ["served-pool"]}
    with MockServer(models=["served-chat"], **knobs) as mock:
        pool = pool_create(name="p-pool")
        backend_create(pool=pool, name="b-pool", base_url=mock.url)
        model_create(pool=pool, name="pool-model", served_name="served-pool", kind=kind)
        # when the checks run on it
        run = check_run_now(trigger=RunTrigger.COMMAND, model_names=["pool-model"])
    # then only the seeded rerank case applied, and the Paris document came first
    results = list(run.results.all())
    assert [(r.case_name, r.outcome) for r in results] == [("rerank-capital-of-france", "pass")], [
        r.error for r in results
    ]
    assert results[0].answer == CheckCase.objects.get(name="rerank-capital-of-france").expected_text
    assert results[0].prompt_tokens and results[0].http_status == 200
