"""A conservative fast pre-check of common request bodies, in front of the DRF serializers.

`fast_valid(endpoint, data)` returns True only for bodies the DRF serializers certainly accept; anything it
is unsure about (tools, content parts, response formats, unusual values) returns False, and the DRF
serializers then validate and produce the error. So the errors clients see are the serializers' by
construction, while the common body costs a few microseconds instead of hundreds (see docs/performance.md).
Every rule here is a subset of a rule in `routing/serializers.py`; `tests/routing/test_fastcheck.py` checks
that the two never disagree on acceptance over the error and fuzz corpora.
"""

from __future__ import annotations

from typing import Any

from routing.serializers import (
    ROLES,
    ChatCompletionRequestSerializer,
    CompletionRequestSerializer,
    EmbeddingRequestSerializer,
)

_ROLES = frozenset(ROLES)
_FLOAT_RANGES = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
}
_INT_MIN_1 = frozenset({"max_tokens", "max_completion_tokens"})
# Fields the serializers declare, taken from them so the two cannot drift: a body using a declared field that is
# not simple goes to DRF (undeclared ones pass through to vLLM, as DRF ignores them).
_CHAT_DECLARED = frozenset(ChatCompletionRequestSerializer().fields)
_COMPLETION_DECLARED = frozenset(CompletionRequestSerializer().fields)
_EMBEDDING_DECLARED = frozenset(EmbeddingRequestSerializer().fields)
_SIMPLE = frozenset(
    {
        "model",
        "messages",
        "prompt",
        "input",
        "temperature",
        "top_p",
        "presence_penalty",
        "frequency_penalty",
        "max_tokens",
        "max_completion_tokens",
        "n",
        "seed",
        "stream",
        "stream_options",
        "stop",
        "user",
    }
)
_MAX_SCALAR_DEPTH_FREE = 32  # unknown (pass-through) values must be shallow, else DRF checks nesting depth
_PASS_THROUGH_BUDGET = 1024
"""Containers and items of pass-through values the fast check visits per body before deferring to the serializers,
which do not walk them (only the depth check does, at C speed): a large one costs the loop no Python-level walk."""


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shallow(value: Any, budget: list[int]) -> bool:
    """Whether a pass-through value is shallow enough that the serializers' depth check would pass.

    Visits at most `budget[0]` items (shared by the body's values, decremented); False once it is spent.
    """
    if not isinstance(value, dict | list):
        return True
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        budget[0] -= len(children)
        if budget[0] < 0 or depth > _MAX_SCALAR_DEPTH_FREE:
            return False
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return True


def _common(data: dict[str, Any], declared: frozenset[str]) -> bool:
    model = data.get("model")
    if not isinstance(model, str) or not model or model.strip() != model or "\x00" in model:
        return False
    budget = [_PASS_THROUGH_BUDGET]
    for key, value in data.items():
        if key in declared:
            if key not in _SIMPLE:
                return False  # a declared field with structure: let DRF decide
            if value is None and key not in {"stream_options"}:
                return False  # nulls: DRF rules differ per field
            continue
        if not _shallow(value, budget):
            return False
    for key, (low, high) in _FLOAT_RANGES.items():
        if key in data:
            value = data[key]
            if not _number(value) or not (low <= value <= high) or value != value:
                return False
    for key in _INT_MIN_1:
        if key in data and (not _int(data[key]) or data[key] < 1):
            return False
    if "n" in data and (not _int(data["n"]) or not 1 <= data["n"] <= 128):
        return False
    if "seed" in data and not _int(data["seed"]):
        return False
    if "user" in data and (not isinstance(data["user"], str) or "\x00" in data["user"]):
        return False
    if "stop" in data:
        stop = data["stop"]
        if not (isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
            return False
    stream = data.get("stream", False)
    if "stream" in data and not isinstance(stream, bool):
        return False
    if "stream_options" in data:
        options = data["stream_options"]
        if options is None:
            return False
        if not stream or not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
            return False
        if not all(isinstance(v, bool) for v in options.values()):
            return False
    return True


def _text(value: Any) -> bool:
    # DRF's CharField rejects NUL and (by default) surrounding whitespace is trimmed, never rejected; empty content
    # is allowed for messages, so only NUL and lone surrogates need care. Surrogates cannot come out of orjson.
    return isinstance(value, str) and "\x00" not in value


def fast_valid_chat(data: dict[str, Any]) -> bool:
    """True only for chat bodies the serializers certainly accept."""
    if not _common(data, _CHAT_DECLARED):
        return False
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        return False
    for message in messages:
        if not isinstance(message, dict) or message.keys() - {"role", "content", "name"}:
            return False
        role = message.get("role")
        if role not in _ROLES or role == "tool":
            return False
        if not _text(message.get("content")):
            return False
        if "name" in message and not (_text(message["name"]) and message["name"].strip()):
            return False
    return True


def fast_valid_completion(data: dict[str, Any]) -> bool:
    """True only for completion bodies with a plain string (or list of strings) prompt."""
    if not _common(data, _COMPLETION_DECLARED):
        return False
    prompt = data.get("prompt")
    if isinstance(prompt, str):
        return True
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(p, str) for p in prompt)


def fast_valid_embedding(data: dict[str, Any]) -> bool:
    """True only for embedding bodies with a string or a list of strings as input."""
    if not _common(data, _EMBEDDING_DECLARED):
        return False
    value = data.get("input")
    if isinstance(value, str):
        return True
    return isinstance(value, list) and bool(value) and all(isinstance(p, str) for p in value)
