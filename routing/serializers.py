"""Request schemas of the OpenAI-compatible endpoints, as DRF serializers.

They validate only; the router forwards the client's own JSON (with the model name rewritten), so parameters
vLLM adds (top_k, min_p, repetition_penalty, ...) pass through unchanged.
"""

from __future__ import annotations

import asyncio
import gc
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import orjson
from rest_framework import serializers

from routing.errors import APIError, bad_request

# --- Strict scalar fields: OpenAI rejects "0.5" for a number and 1 for a boolean; so do we. ---------------------


class StrictFloatField(serializers.FloatField):
    """A JSON number (not a string, not a boolean)."""

    def to_internal_value(self, data: Any) -> float:
        if isinstance(data, bool) or not isinstance(data, int | float):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictIntegerField(serializers.IntegerField):
    """A JSON integer (not a float, string or boolean)."""

    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictBooleanField(serializers.BooleanField):
    """A JSON boolean."""

    def to_internal_value(self, data: Any) -> bool:
        if not isinstance(data, bool):
            self.fail("invalid")
        return data


class StrictCharField(serializers.CharField):
    """A JSON string."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StopField(serializers.Field):
    """`stop`: a string, or a list of strings."""

    default_error_messages = {"invalid": "Must be a string or a list of strings."}

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, str) or (isinstance(data, list) and all(isinstance(s, str) for s in data)):
            return data
        self.fail("invalid")

    def to_representation(self, value: Any) -> Any:
        return value


class ContentField(serializers.Field):
    """Message `content`: a string, a list of content parts, or null (assistant turns with tool calls)."""

    default_error_messages = {
        "invalid": "Must be a string, a list of content parts, or null.",
        "part": "Each content part must be an object with a string `type`.",
        "text": "A text content part needs a string `text`.",
    }

    def to_internal_value(self, data: Any) -> Any:
        if data is None or isinstance(data, str):
            return data
        if not isinstance(data, list):
            self.fail("invalid")
        for part in data:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                self.fail("part")
            if part["type"] == "text" and not isinstance(part.get("text"), str):
                self.fail("text")
        return data

    def to_representation(self, value: Any) -> Any:
        return value


class JSONObjectField(serializers.Field):
    """Any JSON object (dict)."""

    default_error_messages = {"invalid": "Must be a JSON object."}

    def to_internal_value(self, data: Any) -> Any:
        if not isinstance(data, dict):
            self.fail("invalid")
        return data

    def to_representation(self, value: Any) -> Any:
        return value


class PromptField(serializers.Field):
    """Completion `prompt` / embedding `input`: a string, strings, a token list, or token lists (non-empty)."""

    default_error_messages = {
        "invalid": "Must be a string, a list of strings, a list of integers, or a list of lists of integers.",
        "empty": "Must not be empty.",
    }

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, str):
            return data
        if not isinstance(data, list):
            self.fail("invalid")
        if not data:
            self.fail("empty")
        if all(isinstance(x, str) for x in data):
            return data
        if all(isinstance(x, int) and not isinstance(x, bool) for x in data):
            return data
        if all(
            isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x) for x in data
        ):
            return data
        self.fail("invalid")

    def to_representation(self, value: Any) -> Any:
        return value


# --- Nested objects ---------------------------------------------------------------------------------------------

ROLES = ("system", "developer", "user", "assistant", "tool", "function")


class ChatMessageSerializer(serializers.Serializer):
    """One chat message."""

    role = serializers.ChoiceField(choices=ROLES)
    content = ContentField(required=False, allow_null=True)
    name = StrictCharField(required=False)
    tool_calls = serializers.ListField(child=JSONObjectField(), required=False, allow_null=True)
    tool_call_id = StrictCharField(required=False)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        """Only assistant turns (with tool calls) may omit their content."""
        if attrs.get("content") is None and attrs.get("role") != "assistant":
            raise serializers.ValidationError({"content": "This field is required for this role."})
        if attrs.get("role") == "tool" and "tool_call_id" not in attrs:
            raise serializers.ValidationError({"tool_call_id": "Tool messages need a tool_call_id."})
        return attrs


class StreamOptionsSerializer(serializers.Serializer):
    """`stream_options`."""

    include_usage = StrictBooleanField(required=False)
    continuous_usage_stats = StrictBooleanField(required=False)


class FunctionSerializer(serializers.Serializer):
    """A tool's function definition."""

    name = StrictCharField(max_length=64)
    description = StrictCharField(required=False, allow_blank=True)
    parameters = JSONObjectField(required=False)
    strict = StrictBooleanField(required=False, allow_null=True)


class ToolSerializer(serializers.Serializer):
    """One tool."""

    type = serializers.ChoiceField(choices=["function"])
    function = FunctionSerializer()


class ResponseFormatSerializer(serializers.Serializer):
    """`response_format`: text, json_object, or json_schema with its schema."""

    type = serializers.ChoiceField(choices=["text", "json_object", "json_schema"])
    json_schema = JSONObjectField(required=False)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        """json_schema needs a named schema."""
        if attrs["type"] == "json_schema":
            schema = attrs.get("json_schema")
            if schema is None:
                raise serializers.ValidationError({"json_schema": "Required when type is json_schema."})
            if not isinstance(schema.get("name"), str):
                raise serializers.ValidationError({"json_schema": "Needs a string `name`."})
        return attrs


# --- Endpoint schemas ------------------------------------------------------------------------------------------


class _SamplingSerializer(serializers.Serializer):
    """Parameters shared by chat and text completions."""

    model = StrictCharField()
    temperature = StrictFloatField(required=False, allow_null=True, min_value=0.0, max_value=2.0)
    top_p = StrictFloatField(required=False, allow_null=True, min_value=0.0, max_value=1.0)
    max_tokens = StrictIntegerField(required=False, allow_null=True, min_value=1)
    n = StrictIntegerField(required=False, allow_null=True, min_value=1, max_value=128)
    stop = StopField(required=False, allow_null=True)
    seed = StrictIntegerField(required=False, allow_null=True)
    stream = StrictBooleanField(required=False, allow_null=True)
    stream_options = StreamOptionsSerializer(required=False, allow_null=True)
    presence_penalty = StrictFloatField(required=False, allow_null=True, min_value=-2.0, max_value=2.0)
    frequency_penalty = StrictFloatField(required=False, allow_null=True, min_value=-2.0, max_value=2.0)
    logit_bias = JSONObjectField(required=False, allow_null=True)
    user = StrictCharField(required=False, allow_blank=True)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        """stream_options only make sense on a stream."""
        if attrs.get("stream_options") is not None and not attrs.get("stream"):
            raise serializers.ValidationError({"stream_options": "Only allowed when stream is true."})
        return attrs


class ChatCompletionRequestSerializer(_SamplingSerializer):
    """POST /v1/chat/completions."""

    messages = serializers.ListField(child=ChatMessageSerializer(), allow_empty=False)
    max_completion_tokens = StrictIntegerField(required=False, allow_null=True, min_value=1)
    response_format = ResponseFormatSerializer(required=False, allow_null=True)
    tools = serializers.ListField(child=ToolSerializer(), required=False, allow_null=True)
    tool_choice = serializers.JSONField(required=False, allow_null=True)
    parallel_tool_calls = StrictBooleanField(required=False, allow_null=True)
    logprobs = StrictBooleanField(required=False, allow_null=True)
    top_logprobs = StrictIntegerField(required=False, allow_null=True, min_value=0, max_value=20)

    def validate_tool_choice(self, value: Any) -> Any:
        """`tool_choice`: none, auto, required, or an object naming a function."""
        if value is None or value in ("none", "auto", "required"):
            return value
        if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("function"), dict):
            return value
        raise serializers.ValidationError('Must be "none", "auto", "required" or {"type": "function", ...}.')


class CompletionRequestSerializer(_SamplingSerializer):
    """POST /v1/completions."""

    prompt = PromptField()
    echo = StrictBooleanField(required=False, allow_null=True)
    logprobs = StrictIntegerField(required=False, allow_null=True, min_value=0, max_value=20)
    best_of = StrictIntegerField(required=False, allow_null=True, min_value=1)
    suffix = StrictCharField(required=False, allow_null=True, allow_blank=True)


class EmbeddingRequestSerializer(serializers.Serializer):
    """POST /v1/embeddings."""

    model = StrictCharField()
    input = PromptField()
    encoding_format = serializers.ChoiceField(choices=["float", "base64"], required=False)
    dimensions = StrictIntegerField(required=False, allow_null=True, min_value=1)
    user = StrictCharField(required=False, allow_blank=True)


# --- Pooling (rerank, score) and tokenizer endpoints: vLLM's own APIs (entrypoints/pooling, serve/tokenize) ------


def _text_limit(field: serializers.Field) -> int:
    limits = field.context.get("limits") if isinstance(field.context, dict) else None
    return (limits if isinstance(limits, RequestLimits) else _DEFAULT_LIMITS).max_text_chars


class ScoreInputField(serializers.Field):
    """One rerank/score text: a string, or vLLM's multimodal `{"content": [parts]}` (each at most max_text_chars)."""

    default_error_messages = {
        "invalid": 'Must be a string or an object {{"content": [content parts]}}.',  # braces doubled: str.format
        "part": "Each content part must be an object with a string `type`.",
        "too_long": "Must be at most {limit} characters (got {length}).",
    }

    def to_internal_value(self, data: Any) -> Any:
        limit = _text_limit(self)
        if isinstance(data, str):
            if len(data) > limit:
                self.fail("too_long", limit=limit, length=len(data))
            return data
        if not isinstance(data, dict) or not isinstance(data.get("content"), list):
            self.fail("invalid")
        for part in data["content"]:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                self.fail("part")
            text = part.get("text")
            if isinstance(text, str) and len(text) > limit:
                self.fail("too_long", limit=limit, length=len(text))
        return data

    def to_representation(self, value: Any) -> Any:
        return value


class ScoreInputsField(ScoreInputField):
    """One text or a non-empty list of them (`documents`, `queries`, `text_1`, ...)."""

    default_error_messages = {**ScoreInputField.default_error_messages, "empty": "Must not be empty."}

    def to_internal_value(self, data: Any) -> Any:
        if not isinstance(data, list):
            return super().to_internal_value(data)
        if not data:
            self.fail("empty")
        for item in data:
            super().to_internal_value(item)
        return data


class _PoolingSerializer(serializers.Serializer):
    """Parameters vLLM's rerank and score requests share (the others pass through unchanged)."""

    model = StrictCharField()
    user = StrictCharField(required=False, allow_blank=True, allow_null=True)
    truncate_prompt_tokens = StrictIntegerField(required=False, allow_null=True, min_value=-1)
    max_tokens_per_query = StrictIntegerField(required=False, min_value=0)
    max_tokens_per_doc = StrictIntegerField(required=False, min_value=0)
    use_activation = StrictBooleanField(required=False, allow_null=True)
    instruction = StrictCharField(required=False, allow_null=True, allow_blank=True)
    chat_template_kwargs = JSONObjectField(required=False, allow_null=True)


class RerankRequestSerializer(_PoolingSerializer):
    """POST /v1/rerank, /rerank, /v2/rerank (Jina / Cohere shape): a query, its documents, the top N to return."""

    query = ScoreInputField()
    documents = ScoreInputsField()
    top_n = StrictIntegerField(required=False, min_value=0)


SCORE_PAIRS = (("queries", "documents"), ("queries", "items"), ("data_1", "data_2"), ("text_1", "text_2"))
"""The field pairs of vLLM's score request, in the order vLLM tries them."""


class ScoreRequestSerializer(_PoolingSerializer):
    """POST /v1/score, /score: one pair of fields (`queries`/`documents`, or vLLM's other names) scored 1:1, 1:N or
    N:N."""

    queries = ScoreInputsField(required=False)
    documents = ScoreInputsField(required=False)
    items = ScoreInputsField(required=False)
    data_1 = ScoreInputsField(required=False)
    data_2 = ScoreInputsField(required=False)
    text_1 = ScoreInputsField(required=False)
    text_2 = ScoreInputsField(required=False)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        """Exactly one pair of inputs, in vLLM's proportions (1:1, 1:N or N:N)."""
        pair = next(((a, b) for a, b in SCORE_PAIRS if a in attrs and b in attrs), None)
        if pair is None:
            names = " or ".join(f"`{a}` and `{b}`" for a, b in SCORE_PAIRS)
            raise serializers.ValidationError({"queries": f"Give {names}."})
        first, second = (attrs[name] if isinstance(attrs[name], list) else [attrs[name]] for name in pair)
        if len(first) > 1 and len(first) != len(second):
            raise serializers.ValidationError(
                {pair[1]: f"Must have as many items as `{pair[0]}` ({len(first)}), or `{pair[0]}` only one."}
            )
        return attrs


class TokenIdsField(serializers.Field):
    """`tokens`: a list of token ids (non-negative integers), checked in one pass."""

    default_error_messages = {"invalid": "Must be a list of non-negative integers (token ids)."}

    def to_internal_value(self, data: Any) -> Any:
        if not isinstance(data, list) or not all(type(t) is int and 0 <= t <= 0x7FFF_FFFF_FFFF_FFFF for t in data):
            self.fail("invalid")
        return data

    def to_representation(self, value: Any) -> Any:
        return value


class TokenizeRequestSerializer(serializers.Serializer):
    """POST /tokenize: a `prompt`, or chat `messages` rendered with the model's chat template."""

    model = StrictCharField()
    prompt = StrictCharField(required=False, allow_blank=True, trim_whitespace=False)
    messages = serializers.ListField(child=ChatMessageSerializer(), required=False, allow_empty=False)
    add_special_tokens = StrictBooleanField(required=False)
    return_token_strs = StrictBooleanField(required=False, allow_null=True)
    add_generation_prompt = StrictBooleanField(required=False)
    continue_final_message = StrictBooleanField(required=False)
    chat_template = StrictCharField(required=False, allow_null=True)
    chat_template_kwargs = JSONObjectField(required=False, allow_null=True)
    tools = serializers.ListField(child=ToolSerializer(), required=False, allow_null=True)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        """Either `prompt` or `messages`; not both `continue_final_message` and `add_generation_prompt`, as vLLM."""
        if ("prompt" in attrs) == ("messages" in attrs):
            raise serializers.ValidationError({"prompt": "Give either `prompt` (a string) or `messages`, not both."})
        if attrs.get("continue_final_message") and attrs.get("add_generation_prompt"):
            raise serializers.ValidationError(
                {"continue_final_message": "Cannot be true together with `add_generation_prompt`."}
            )
        return attrs


class DetokenizeRequestSerializer(serializers.Serializer):
    """POST /detokenize: token ids back to text."""

    model = StrictCharField()
    tokens = TokenIdsField()


# --- Error mapping ---------------------------------------------------------------------------------------------


def _first_error(errors: Any, path: str) -> tuple[str, str]:
    """Walk DRF's nested error structure to the first leaf; return (param path, message)."""
    if isinstance(errors, dict):
        key, value = next(iter(errors.items()))
        if key == "non_field_errors":
            return _first_error(value, path)
        if isinstance(key, int):
            return _first_error(value, f"{path}[{key}]")
        return _first_error(value, f"{path}.{key}" if path else str(key))
    if isinstance(errors, list):
        # A list of messages, or a ListField's per-item list (dicts / empty entries for valid items).
        for index, item in enumerate(errors):
            if isinstance(item, dict | list) and item:
                return _first_error(item, f"{path}[{index}]" if isinstance(item, dict) else path)
            if isinstance(item, str):
                return path, str(item)
    return path, str(errors)


# The router re-encodes the body with orjson, which refuses containers nested deeper than this (the parser
# accepts 1024); DRF's JSONField would also hit Python's recursion limit on such values.
MAX_JSON_DEPTH = 254


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether a JSON value has containers nested more than `limit` levels (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def check_depth(data: dict[str, Any]) -> None:
    """Raise a 400 naming the top-level parameter nested too deeply for the router to forward."""
    try:
        orjson.dumps(data)  # C speed; fails only on nesting for anything orjson.loads produced
        return
    except orjson.JSONEncodeError:
        pass
    param = next((key for key, value in data.items() if _deeper_than(value, MAX_JSON_DEPTH - 1)), None)
    raise bad_request(
        f"Invalid value for '{param}': nested more than {MAX_JSON_DEPTH} levels deep."
        if param
        else f"The request body is nested more than {MAX_JSON_DEPTH} levels deep.",
        param=param,
        code="invalid_body",
    )


def validate_request(
    serializer_class: type[serializers.Serializer], data: dict[str, Any], limits: RequestLimits | None = None
) -> None:
    """Validate a request body; raise a 400 APIError naming the first bad parameter.

    With `limits`, the per-message lists (content parts, tool calls) are counted first (see `check_message_items`).
    """
    if limits is not None:
        check_message_items(data, limits)
    check_depth(data)
    serializer = serializer_class(data=data, context={"limits": limits} if limits is not None else {})
    if serializer.is_valid():
        return
    param, message = _first_error(serializer.errors, "")
    raise bad_request(f"Invalid value for '{param}': {message}" if param else message, param=param or None)


# --- Structural limits and validation off the event loop -------------------------------------------------------
#
# DRF costs tens of microseconds per nested object (a message, a tool): a 4 MB body of 90,000 tools held a worker's
# event loop for 7 s. So, before any validation, `check_counts` bounds the lists a client controls by looking at
# their lengths only (O(1) per field); the serializers then see at most a bounded number of items, and a body large
# enough for their work to matter is validated in a worker thread (`validate_request_offloaded`), so the loop keeps
# serving other requests meanwhile. The defaults and their reasons are in docs/security.md ("Client limits").

OFFLOAD_BYTES = 16 * 1024
"""A body the serializers must validate goes to a worker thread above this size.

Below it, their worst case (a body made of the cheapest-to-write, dearest-to-validate items: ~350 tool messages)
costs a few milliseconds on the loop, under the cost of the thread hop's latency when the loop is busy."""
VALIDATION_THREADS = 2
"""Worker threads for offloaded validation. The work holds the GIL, so more threads add no throughput: they would
only take the GIL from the event loop more often. Requests beyond them wait in the executor's queue."""

_executor: ThreadPoolExecutor | None = None


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """Upper bounds on the lists of a request body (settings `ROUTER_MAX_*`; docs/security.md, "Client limits")."""

    max_messages: int = 4096
    """Items in `messages`."""
    max_tools: int = 256
    """Items in `tools`."""
    max_stop: int = 64
    """Items in `stop`."""
    max_content_parts: int = 256
    """Items in one message's `content` list, and in one message's `tool_calls`."""
    max_inputs: int = 2048
    """Prompts in a batch: a `prompt` (completions) or `input` (embeddings) list of strings or of token lists; also
    the texts in each list of a rerank or score request (`documents`, `queries`, ...)."""
    max_text_chars: int = 65_536
    """Characters in one rerank or score text (a query or a document)."""

    @classmethod
    def from_settings(cls) -> RequestLimits:
        """The limits configured in Django settings."""
        from django.conf import settings

        return cls(
            max_messages=settings.ROUTER_MAX_MESSAGES,
            max_tools=settings.ROUTER_MAX_TOOLS,
            max_stop=settings.ROUTER_MAX_STOP,
            max_content_parts=settings.ROUTER_MAX_CONTENT_PARTS,
            max_inputs=settings.ROUTER_MAX_INPUTS,
            max_text_chars=settings.ROUTER_MAX_TEXT_CHARS,
        )


_DEFAULT_LIMITS = RequestLimits()


def parse_json(raw: bytes | str) -> Any:
    """`orjson.loads` with Python's cyclic garbage collector paused meanwhile (orjson.JSONDecodeError if invalid).

    Parsing allocates one tracked object per JSON object and array; with the collector on, a body made of many small
    objects set off collections of the whole heap while it was parsed: 64 ms instead of 11 ms (median) for 900 KB
    of 20,000 tools, 198 ms instead of 61 ms for 4 MB of 90,000. Parsed JSON holds no reference cycle, so pausing
    the collector loses nothing; the objects are counted as usual once it runs again.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        return orjson.loads(raw)
    finally:
        if enabled:
            gc.enable()


def _too_long(param: str, limit: int, length: int) -> APIError:
    """400 for a list over its limit, worded and coded as OpenAI words and codes it."""
    return APIError(
        400,
        f"Invalid '{param}': array too long. Expected an array with maximum length {limit}, "
        f"but got an array with length {length} instead.",
        param=param,
        code="array_above_max_length",
    )


POOLING_LISTS = ("documents", "queries", "items", "data_1", "data_2", "text_1", "text_2")


def check_counts(data: dict[str, Any], limits: RequestLimits) -> None:
    """Raise a 400 for a top-level list over its limit: `messages`, `tools`, `stop`, a `prompt`/`input` batch.

    Looks at lengths only (a few dict lookups), so every body pays it before the fast check walks any list.
    Whether a value has the right type is not its business: the validation that follows decides that.
    """
    for param, limit in (("messages", limits.max_messages), ("tools", limits.max_tools), ("stop", limits.max_stop)):
        value = data.get(param)
        if isinstance(value, list) and len(value) > limit:
            raise _too_long(param, limit, len(value))
    for param in ("prompt", "input"):
        value = data.get(param)
        # A list of integers is one tokenized prompt (bounded by the body size), not a batch.
        if isinstance(value, list) and len(value) > limits.max_inputs and not isinstance(value[0], int):
            raise _too_long(param, limits.max_inputs, len(value))
    for param in POOLING_LISTS:  # the texts of a rerank or score request
        value = data.get(param)
        if isinstance(value, list) and len(value) > limits.max_inputs:
            raise _too_long(param, limits.max_inputs, len(value))


def check_message_items(data: dict[str, Any], limits: RequestLimits) -> None:
    """Raise a 400 for a message whose `content` parts or `tool_calls` are over their limit (chat `messages`, and
    the Responses API's `input` items).

    One look per message (their number is bounded by `check_counts`); needed only for bodies the serializers
    validate, since the fast check accepts string contents only.
    """
    limit = limits.max_content_parts
    for param in ("messages", "input"):
        messages = data.get(param)
        if not isinstance(messages, list):
            continue
        for index, message in enumerate(messages):
            if not isinstance(message, dict):
                continue
            for field in ("content", "tool_calls"):
                value = message.get(field)
                if isinstance(value, list) and len(value) > limit:
                    raise _too_long(f"{param}[{index}].{field}", limit, len(value))


async def validate_request_offloaded(
    serializer_class: type[serializers.Serializer],
    data: dict[str, Any],
    limits: RequestLimits,
    *,
    size: int | None = None,
) -> None:
    """`validate_request`, in a worker thread when the body (`size` bytes; measured if None) is over OFFLOAD_BYTES.

    The loop waits for the thread without blocking; the body must not be changed meanwhile (the caller awaits).
    """
    if size is None:
        try:
            size = len(orjson.dumps(data))
        except orjson.JSONEncodeError:
            size = OFFLOAD_BYTES + 1  # nested too deeply to encode: the depth check reports it, off the loop
    if size <= OFFLOAD_BYTES:
        validate_request(serializer_class, data, limits)
        return
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(max_workers=VALIDATION_THREADS, thread_name_prefix="router-validate")
    await asyncio.get_running_loop().run_in_executor(_executor, validate_request, serializer_class, data, limits)


__all__ = [
    "APIError",
    "ChatCompletionRequestSerializer",
    "CompletionRequestSerializer",
    "DetokenizeRequestSerializer",
    "EmbeddingRequestSerializer",
    "RequestLimits",
    "RerankRequestSerializer",
    "ScoreRequestSerializer",
    "TokenizeRequestSerializer",
    "check_counts",
    "parse_json",
    "validate_request",
    "validate_request_offloaded",
]
