"""The mock held to the real engine: every case, on the mock (fast suite) and on a real vLLM (make e2e).

Both are compared with the golden files recorded from a real vLLM (`python -m tests.contract.capture`): the
status, the media type, a few values (finish_reason, error type and code) and the SHAPE (key sets and types,
recursively; SSE streams as event sequences). A difference fails and names the JSON path of the field. The
differences the contract accepts are listed once, in ALLOWED, each with its reason.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.contract.cases import CASES, CUT, EMBEDDING_CASES, ROUTER_METRICS, Engine, Observation
from tests.contract.shape import Allowed, diff, unexplained

GOLDEN = Path(__file__).with_name("golden")

# Every difference between the mock and the real vLLM that the contract accepts, in one place. A rule applies to
# the mock only: the real engine must match its own recording exactly. Beyond these, what the shapes do not cover
# is not a promise: the mock's token ids, counts and texts are its own (a regex tokenizer, a fixed answer), error
# MESSAGES differ in wording (status, type, param and code are compared), and /metrics exposes only the families
# the router and the benches read (72 in vLLM).
ALLOWED: tuple[Allowed, ...] = (
    Allowed(
        case="chat_logprobs",
        path="choices[0].logprobs",
        kind="null",
        why="the mock computes no log-probabilities: `logprobs: true` gives null where vLLM gives {content: [...]}; "
        "the router passes logprobs through and reads none of them (the E2E token count uses the real engine)",
    ),
)


def observe(case: str, engine: Engine, http: httpx.Client) -> Observation:
    """Run one case on the engine (embedding cases need an embedding server)."""
    if case in EMBEDDING_CASES and not engine.embed_url:
        pytest.skip("no embedding server (VLLM_EMBED_URL)")
    return CASES[case](engine, http)


def golden(case: str) -> dict[str, Any]:
    """The real vLLM's recorded observation of a case."""
    return json.loads((GOLDEN / f"{case}.json").read_text())


def contract_problems(case: str, engine: Engine, seen: Observation) -> list[str]:
    """Every way the engine's observation departs from the golden one, not covered by ALLOWED, as messages."""
    want = golden(case)
    ref = want["captured_from"]
    problems = []
    for key in ("status", "media_type"):
        if want[key] != getattr(seen, key):
            problems.append(f"{key}: {engine.name} answered {getattr(seen, key)!r}, {ref} answered {want[key]!r}")
    for key, value in want["values"].items():
        if seen.values.get(key) != value:
            problems.append(f"{key}: {engine.name} has {seen.values.get(key)!r}, {ref} has {value!r}")
    for key in seen.values.keys() - want["values"].keys():
        problems.append(f"{key}: {engine.name} has {seen.values[key]!r}, {ref} has nothing")
    differences = diff(want["shape"], seen.shape, side=engine.name, reference=ref)
    rules = ALLOWED if engine.name == "mock" else ()
    problems += [d.message for d in unexplained(differences, case, rules)]
    return problems


def test_every_case_has_a_golden_file() -> None:
    # given the cases and the golden directory, then each case has its recording and no recording is orphaned
    recorded = {p.stem for p in GOLDEN.glob("*.json")}
    assert recorded == set(CASES), (
        f"missing: {sorted(set(CASES) - recorded)}, orphaned: {sorted(recorded - set(CASES))}"
    )


@pytest.mark.parametrize("case", list(CASES))
def test_engine_matches_the_recorded_vllm(case: str, engine: Engine, http: httpx.Client) -> None:
    # given a case, when the engine answers it, then status, values and shape match the real vLLM's recording
    seen = observe(case, engine, http)
    problems = contract_problems(case, engine, seen)
    assert not problems, f"{case} on {engine.name}:\n  " + "\n  ".join(problems)


# --- semantics both engines must share (values the shapes cannot show) --------------------------------------


def _usage_ok(usage: dict[str, Any]) -> None:
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], f"usage arithmetic: {usage}"


@pytest.mark.parametrize("case", ["chat_stop", "chat_length", "completion"])
def test_usage_adds_up(case: str, engine: Engine, http: httpx.Client) -> None:
    # given a non-streamed generation, when it answers, then total = prompt + completion; max_tokens CUT bounds it
    body = observe(case, engine, http).raw
    _usage_ok(body["usage"])
    if body["choices"][0]["finish_reason"] == "length":
        assert body["usage"]["completion_tokens"] == CUT


@pytest.mark.parametrize("case", ["chat_stream_stop", "chat_stream_length", "completion_stream"])
def test_stream_sequence_and_usage_chunk(case: str, engine: Engine, http: httpx.Client) -> None:
    # given a stream with include_usage, then: (chat) a role chunk first, one finish per choice, then exactly one
    # usage chunk with no choices, right before [DONE]; its usage adds up
    events = observe(case, engine, http).raw
    assert events[-1] == "[DONE]", "the stream must end with [DONE]"
    chunks = events[:-1]
    if case.startswith("chat"):
        assert chunks[0]["choices"][0]["delta"].get("role") == "assistant", "the first chat chunk carries the role"
    with_usage = [i for i, c in enumerate(chunks) if c.get("usage")]
    assert with_usage == [len(chunks) - 1], f"exactly one usage chunk, the last; got chunks {with_usage}"
    assert chunks[-1]["choices"] == []
    _usage_ok(chunks[-1]["usage"])
    finishes = [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c["finish_reason"]]
    assert len(finishes) == 1, f"one finish_reason per choice, got {finishes}"
    if finishes == ["length"]:
        assert chunks[-1]["usage"]["completion_tokens"] == CUT


def test_stream_without_include_usage_has_no_usage(engine: Engine, http: httpx.Client) -> None:
    # given a stream without stream_options, then no chunk carries usage
    events = observe("chat_stream_no_usage", engine, http).raw
    assert not [e for e in events if isinstance(e, dict) and "usage" in e]


def test_continuous_usage_in_every_chunk(engine: Engine, http: httpx.Client) -> None:
    # given continuous_usage_stats, then every chunk has usage: constant prompt_tokens, completion_tokens counting
    # up from 0 (role chunk), each adding up, the last equal to the final usage chunk's
    events = observe("chat_stream_continuous_usage", engine, http).raw
    chunks = events[:-1]
    assert all("usage" in c for c in chunks), "every chunk carries usage"
    usages = [c["usage"] for c in chunks]
    for usage in usages:
        _usage_ok(usage)
    assert len({u["prompt_tokens"] for u in usages}) == 1
    completions = [u["completion_tokens"] for u in usages]
    assert completions[0] == 0 and completions == sorted(completions), completions
    assert completions[-2] == completions[-1] == CUT


def test_tokenize_counts_the_chat_prompt(engine: Engine, http: httpx.Client) -> None:
    # given the same messages, /tokenize counts what the chat call reports as prompt_tokens (the E2E relies on it),
    # and reports the max_model_len /v1/models lists
    tokens = observe("tokenize_messages", engine, http).raw
    chat = observe("chat_stop", engine, http).raw
    listed = observe("models", engine, http).raw["data"][0]
    assert tokens["count"] == len(tokens["tokens"]) == chat["usage"]["prompt_tokens"]
    assert tokens["max_model_len"] == listed["max_model_len"]


def test_detokenize_inverts_tokenize(engine: Engine, http: httpx.Client) -> None:
    # given the ids of "Hello world", then /detokenize gives the text back
    assert observe("detokenize", engine, http).raw == {"prompt": "Hello world"}


def test_metrics_the_router_reads_are_there(engine: Engine, http: httpx.Client) -> None:
    # given /metrics, then every family the strategies read is exposed with its type
    assert observe("metrics", engine, http).raw == ROUTER_METRICS


def test_tokenize_token_strs_match_the_tokens(engine: Engine, http: httpx.Client) -> None:
    # given return_token_strs, then one string per token id, and the strings spell the prompt's words
    body = observe("tokenize_token_strs", engine, http).raw
    assert len(body["token_strs"]) == len(body["tokens"]) == body["count"]
    assert "Hello" in "".join(body["token_strs"])


def test_rerank_sorts_by_relevance_and_keeps_top_n(engine: Engine, http: httpx.Client) -> None:
    # given a query about a sleeping cat, then every document once, sorted by relevance, a cat above the revenue
    # one, the text of each document echoed; top_n 1 keeps only the first; usage counts prompt tokens only
    from tests.contract.cases import RERANK_DOCS

    body = observe("rerank", engine, http).raw
    results = body["results"]
    assert sorted(r["index"] for r in results) == [0, 1, 2]
    scores = [r["relevance_score"] for r in results]
    revenue = next(r["relevance_score"] for r in results if r["index"] == 1)
    assert scores == sorted(scores, reverse=True) and scores[0] > revenue
    assert all(r["document"]["text"] == RERANK_DOCS[r["index"]] for r in results)
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    top = observe("rerank_top_n", engine, http).raw["results"]
    assert [r["index"] for r in top] == [results[0]["index"]]


def test_score_gives_one_score_per_pair(engine: Engine, http: httpx.Client) -> None:
    # 1:N gives one score per document, N:N one per pair, in input order; a text with itself scores highest
    one_to_n = observe("score", engine, http).raw
    assert [d["index"] for d in one_to_n["data"]] == [0, 1, 2]
    pairs = observe("score_pairs", engine, http).raw["data"]
    assert [d["index"] for d in pairs] == [0, 1]
    assert pairs[0]["score"] < pairs[1]["score"] == pytest.approx(1.0, abs=1e-3)


# --- the Responses API ----------------------------------------------------------------------------------------


def _response_usage_ok(usage: dict[str, Any]) -> None:
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"], f"usage arithmetic: {usage}"


def test_responses_usage_adds_up_and_the_cut_is_max_output_tokens(engine: Engine, http: httpx.Client) -> None:
    # given a response that stops by itself and one cut by max_output_tokens
    stop = observe("responses_stop", engine, http).raw
    cut = observe("responses_length", engine, http).raw
    # then both report usage the Responses way, and the cut one generated exactly max_output_tokens
    for body in (stop, cut):
        _response_usage_ok(body["usage"])
        assert body["object"] == "response" and body["model"] == engine.model
    assert stop["status"] == "completed" and stop["output"][0]["content"][0]["text"]
    assert cut["status"] == "incomplete" and cut["usage"]["output_tokens"] == CUT


def test_responses_stream_deltas_make_the_completed_text(engine: Engine, http: httpx.Client) -> None:
    # given a streamed response, then its deltas add up to the text of response.completed, which carries usage,
    # and sequence numbers count up from 0
    events = observe("responses_stream", engine, http).raw
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    completed = events[-1]["response"]
    assert completed["output"][0]["content"][0]["text"] == deltas
    _response_usage_ok(completed["usage"])
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert len({e["response"]["id"] for e in events if "response" in e}) == 1


def test_responses_retrieve_returns_the_stored_object(engine: Engine, http: httpx.Client) -> None:
    # given a stored response, then a retrieval answers it again (vLLM: VLLM_ENABLE_RESPONSES_API_STORE=1)
    body = observe("responses_retrieve", engine, http).raw
    assert body["object"] == "response" and body["status"] == "completed"
    _response_usage_ok(body["usage"])
