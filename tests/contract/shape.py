"""The "shape" of a JSON value (key sets and types, recursively) and a diff of two shapes that names JSON paths.

A shape keeps structure and drops values: ``{"a": [1, 2], "b": null}`` has the shape
``{"a": ["int"], "b": "null"}``. A list's shape holds the distinct shapes of its elements in order of first
appearance (``[]`` when empty), so a vector of 384 floats and one of 3 floats have the same shape. A server-sent
event stream is a list of events whose consecutive equal shapes are collapsed into one (``"+"``: "one or more"),
so the number of content chunks (a property of the model, not of the API) does not matter, their order does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

Shape = Any
NUMBER_TYPES = ("int", "float")


def shape(value: Any) -> Shape:
    """Return the shape of a JSON value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, dict):
        return {str(k): shape(v) for k, v in sorted(value.items())}
    if isinstance(value, list | tuple):
        distinct: list[Shape] = []
        for item in value:
            s = shape(item)
            if s not in distinct:
                distinct.append(s)
        return distinct
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def stream_shape(events: Iterable[Any]) -> list[dict[str, Any]]:
    """Shape an SSE stream: one entry per run of consecutive events of equal shape (``[DONE]`` stays literal)."""
    runs: list[dict[str, Any]] = []
    for event in events:
        s = "[DONE]" if event == "[DONE]" else shape(event)
        if runs and runs[-1]["event"] == s:
            runs[-1]["count"] = "+"
        else:
            runs.append({"event": s, "count": "1"})
    for run in runs:  # "one" vs "several" is the model's business (merged deltas, answer length), not the API's
        del run["count"]
    return runs


@dataclass(frozen=True)
class Allowed:
    """A documented difference between the mock and the real vLLM that the contract accepts.

    path: a pattern over the JSON path (``choices[0].token_ids``; ``*`` stands for any characters, brackets are
    literal); case: the same over the case name; kind: ``missing`` (the key is absent on the checked side),
    ``extra`` (only the checked side has it), ``null`` (null on one side, a value on the other) or ``any``.
    """

    case: str
    path: str
    kind: str
    why: str

    def covers(self, case: str, path: str, kind: str) -> bool:
        """Tell whether this allowance accepts a difference of `kind` at `path` in `case`."""
        return _glob(self.case, case) and _glob(self.path, path) and self.kind in (kind, "any")


def _glob(pattern: str, text: str) -> bool:
    return re.fullmatch(".*".join(re.escape(part) for part in pattern.split("*")), text) is not None


@dataclass(frozen=True)
class Difference:
    """One structural difference: where, what kind, and a message naming the path."""

    path: str
    kind: str
    message: str


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def diff(expected: Shape, actual: Shape, *, side: str, reference: str = "vllm", path: str = "") -> list[Difference]:
    """List the differences of `actual` (the engine under test, `side`) from `expected` (`reference`)."""
    if expected == actual:
        return []
    if isinstance(expected, dict) and isinstance(actual, dict):
        out: list[Difference] = []
        for key in sorted(expected.keys() | actual.keys()):
            where = _join(path, key)
            if key not in actual:
                out.append(
                    Difference(
                        where, "missing", f"{where}: missing in {side} ({reference} has {_brief(expected[key])})"
                    )
                )
            elif key not in expected:
                out.append(
                    Difference(where, "extra", f"{where}: only in {side} ({_brief(actual[key])}), not in {reference}")
                )
            else:
                out += diff(expected[key], actual[key], side=side, reference=reference, path=where)
        return out
    if isinstance(expected, list) and isinstance(actual, list):
        if not expected or not actual:
            what = "empty" if not actual else f"non-empty ({_brief(actual)})"
            return [
                Difference(f"{path}[]", "list", f"{path}: {what} list in {side}, {reference} has {_brief(expected)}")
            ]
        if len(expected) != len(actual):
            if len(expected) == 1 or len(actual) == 1:  # one element shape against several: compare each
                out = []
                for i, item in enumerate(actual if len(expected) == 1 else expected):
                    e, a = (expected[0], item) if len(expected) == 1 else (item, actual[0])
                    out += diff(e, a, side=side, reference=reference, path=f"{path}[{i}]")
                return out
            first = next((i for i, (e, a) in enumerate(zip(expected, actual, strict=False)) if e != a), None)
            at = min(len(expected), len(actual)) if first is None else first
            detail = (
                diff(expected[at], actual[at], side=side, reference=reference, path=f"{path}[{at}]")
                if first is not None
                else []
            )
            note = (
                f"{path or '<root>'}: {len(actual)} distinct element shapes in {side}, {len(expected)} in "
                f"{reference}; first different: [{at}]"
            )
            return [Difference(path, "length", note), *detail]
        out = []
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            out += diff(e, a, side=side, reference=reference, path=f"{path}[{i}]")
        return out
    if "null" in (expected, actual):
        return [Difference(path, "null", f"{path}: {side} has {_brief(actual)}, {reference} has {_brief(expected)}")]
    return [Difference(path, "type", f"{path}: {side} has {_brief(actual)}, {reference} has {_brief(expected)}")]


def _brief(s: Shape) -> str:
    if isinstance(s, dict):
        keys = ", ".join(list(s)[:6])
        return f"an object {{{keys}{', ...' if len(s) > 6 else ''}}}"
    if isinstance(s, list):
        return "a list" if s else "an empty list"
    return "null" if s == "null" else f"a {s}" if s != "[DONE]" else "[DONE]"


def unexplained(differences: list[Difference], case: str, allowed: Iterable[Allowed]) -> list[Difference]:
    """Keep the differences that no allowance covers."""
    rules = list(allowed)
    return [d for d in differences if not any(rule.covers(case, d.path, d.kind) for rule in rules)]
