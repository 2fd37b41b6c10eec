"""The shape helper and its diff: structure, not values; every difference names its JSON path."""

from __future__ import annotations

from tests.contract.shape import Allowed, diff, shape, stream_shape, unexplained


def test_shape_keeps_keys_and_types_not_values() -> None:
    # given two bodies that differ only in values, then their shapes are equal
    a = {"id": "x", "choices": [{"index": 0, "delta": {"content": "Hi"}}], "usage": None, "v": [0.1, 0.2]}
    b = {"id": "y", "choices": [{"index": 3, "delta": {"content": ""}}], "usage": None, "v": [0.5]}
    assert (
        shape(a)
        == shape(b)
        == {
            "choices": [{"delta": {"content": "str"}, "index": "int"}],
            "id": "str",
            "usage": "null",
            "v": ["float"],
        }
    )


def test_diff_names_the_path_of_a_missing_key() -> None:
    # given the mock's chunk lacks delta.role, then the message names choices[0].delta.role
    vllm = shape({"choices": [{"delta": {"role": "assistant", "content": ""}}]})
    mock = shape({"choices": [{"delta": {"content": ""}}]})
    (only,) = diff(vllm, mock, side="mock")
    assert only.message == "choices[0].delta.role: missing in mock (vllm has a str)"
    assert only.kind == "missing"


def test_diff_reports_extra_keys_types_and_nulls() -> None:
    # given an extra key, a changed type and a null where a value was, then three differences, each by path
    found = diff(shape({"a": 1, "b": "x"}), shape({"a": "1", "b": None, "c": 2}), side="mock")
    assert [(d.path, d.kind) for d in found] == [("a", "type"), ("b", "null"), ("c", "extra")]


def test_allowances_cover_only_their_case_path_and_kind() -> None:
    # given an allowance for null logprobs in one case, then it covers that and nothing else
    rule = Allowed(case="chat_logprobs", path="choices[0].logprobs", kind="null", why="test")
    found = diff(
        shape({"choices": [{"logprobs": {"content": []}}]}), shape({"choices": [{"logprobs": None}]}), side="m"
    )
    assert unexplained(found, "chat_logprobs", [rule]) == []
    assert unexplained(found, "chat_stop", [rule]) == found


def test_stream_shape_collapses_runs_but_keeps_order() -> None:
    # given role, three content chunks, a finish chunk, usage and [DONE], then five entries in that order, the same
    # for one content chunk as for three
    role = {"delta": {"role": "assistant", "content": ""}, "finish_reason": None}
    tok = {"delta": {"content": "a"}, "finish_reason": None}
    fin = {"delta": {"content": ""}, "finish_reason": "stop"}
    usage = {"choices": [], "usage": {"prompt_tokens": 1}}
    long = stream_shape([role, tok, tok, tok, fin, usage, "[DONE]"])
    assert long == stream_shape([role, tok, fin, usage, "[DONE]"])
    assert [entry["event"] for entry in long][-1] == "[DONE]" and len(long) == 5
    assert diff(long, stream_shape([role, fin, usage, "[DONE]"]), side="mock")  # a missing content run is caught
