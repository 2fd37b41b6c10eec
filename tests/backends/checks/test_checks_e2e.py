"""Against the real vLLM of the E2E suite: the seeded cases pass on every backend of VLLM_BACKEND_URL, and the
rerank case on the pooling server of VLLM_EMBED_URL.

Run: `VLLM_BACKEND_URL=http://127.0.0.1:18001,http://127.0.0.1:18002 VLLM_EMBED_URL=http://127.0.0.1:18003
pytest -m e2e tests/backends/checks` (or `make e2e`).
"""

from __future__ import annotations

import os

import pytest

from backends.checks.models import RunStatus, RunTrigger
from backends.checks.report import run_markdown
from backends.checks.services import check_run_now
from backends.models import CheckCase
from backends.services import registry_vllm_register

URLS = [u.strip() for u in os.environ.get("VLLM_BACKEND_URL", "").split(",") if u.strip()]
EMBED_URL = os.environ.get("VLLM_EMBED_URL", "").split(",")[0].strip()
SEEDED = {
    "capital-of-france",
    "capital-of-france-stream",
    "capital-of-france-responses",
    "prompt-token-count",
    "finish-reason-length",
}
RERANK = "rerank-capital-of-france"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not URLS, reason="needs VLLM_BACKEND_URL (a real vLLM; see docs/testing.md)"),
    pytest.mark.django_db,
]


def test_seeded_cases_pass_on_the_real_vllm() -> None:
    model, names = registry_vllm_register(
        urls=URLS, model_name=os.environ.get("VLLM_MODEL_NAME", "").strip() or None, pool_name="checks-e2e"
    )
    if key := os.environ.get("VLLM_API_KEY", ""):
        from backends.models import Backend

        Backend.objects.filter(name__in=names).update(api_key=key)
    assert set(CheckCase.objects.filter(enabled=True).values_list("name", flat=True)) >= SEEDED
    run = check_run_now(trigger=RunTrigger.COMMAND, triggered_by="e2e", model_names=[model])
    report = run_markdown(run=run)
    assert run.status == RunStatus.PASSED, report
    results = list(run.results.all())
    assert {(r.backend_name, r.case_name) for r in results} >= {(n, c) for n in names for c in SEEDED}, report
    by_case = {(r.backend_name, r.case_name): r for r in results}
    for name in names:
        capital = by_case[(name, "capital-of-france")]
        assert "paris" in capital.answer.lower() and capital.latency_ms is not None and capital.latency_ms < 30_000
        streamed = by_case[(name, "capital-of-france-stream")]
        assert "paris" in streamed.answer.lower() and streamed.ttft_ms is not None
        assert streamed.latency_ms is not None and streamed.ttft_ms <= streamed.latency_ms
        assert by_case[(name, "finish-reason-length")].finish_reason == "length"
        assert by_case[(name, "finish-reason-length")].completion_tokens == 5
        assert by_case[(name, "prompt-token-count")].prompt_tokens  # equal to /tokenize, or it would have failed
        responses = by_case[(name, "capital-of-france-responses")]
        assert "paris" in responses.answer.lower() and responses.prompt_tokens and responses.completion_tokens
    assert not any(r.case_name == RERANK for r in results)  # a chat model is not reranked


@pytest.mark.skipif(not EMBED_URL, reason="needs VLLM_EMBED_URL (a vLLM pooling server; `make e2e` starts one)")
def test_rerank_case_passes_on_the_real_pooling_model() -> None:
    # given the pooling server (all-MiniLM-L6-v2 in `make e2e`: vLLM reranks with it as a bi-encoder, by cosine)
    model, names = registry_vllm_register(
        urls=[EMBED_URL],
        model_name=os.environ.get("VLLM_EMBED_MODEL_NAME", "").strip() or None,
        pool_name="checks-e2e-embed",
        kind="embedding",
    )
    if key := os.environ.get("VLLM_API_KEY", ""):
        from backends.models import Backend

        Backend.objects.filter(name__in=names).update(api_key=key)
    # when the checks run on it
    run = check_run_now(trigger=RunTrigger.COMMAND, triggered_by="e2e", model_names=[model])
    report = run_markdown(run=run)
    # then only the rerank case applies, and the document that answers the query is ranked first
    assert run.status == RunStatus.PASSED, report
    results = list(run.results.all())
    assert {r.case_name for r in results} == {RERANK}, report
    case = CheckCase.objects.get(name=RERANK)
    for result in results:
        assert result.answer == case.expected_text and result.prompt_tokens, report
