"""The mock's Responses API, as vLLM 0.32 serves it (vllm/entrypoints/openai/responses/{api_router,serving}.py).

- `POST /v1/responses`: JSON, or SSE with typed events (`event: <type>` + `data: {...}`, no `[DONE]`):
  response.created, response.in_progress, response.output_item.added, response.content_part.added,
  response.output_text.delta (one per token), response.output_text.done, response.content_part.done,
  response.output_item.done, response.completed (usage inside its response object).
- The id is the request's `request_id` (a vLLM extension) when given, else `resp_<32 hex>`.
- Stored in memory when `MockConfig.responses_store` is on (vLLM: VLLM_ENABLE_RESPONSES_API_STORE=1, off by
  default; `store: false` opts out) and `previous_response_id` continues a stored conversation (404 otherwise).
- `background: true` (store on only): answers `queued` at once and generates in a task; with `stream: true` the
  events are also kept, and `GET /v1/responses/{id}?stream=true&starting_after=N` replays them.
- `GET /v1/responses/{id}` and `POST /v1/responses/{id}/cancel` (only a queued or in-progress background
  response: "Cannot cancel a synchronous response." otherwise). No DELETE, no input_items (404 / 405 as FastAPI).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from backends.mock_vllm.app import MockVLLM, Receive, Scope, Send

_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
_ROLES = ("user", "assistant", "system", "developer")


def _uuid() -> str:
    return os.urandom(16).hex()


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's input as chat messages (what the mock's tokenizer and answer logic read)."""
    value = body.get("input")
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    out = []
    for item in value or ():
        if item.get("type", "message") == "message" and item.get("role") in _ROLES:
            out.append({"role": item["role"], "content": _text_of(item.get("content"))})
        elif item.get("type") == "function_call_output":
            out.append({"role": "tool", "content": str(item.get("output", ""))})
    return out


def _float(value: Any, default: float) -> float:
    """A sampling parameter as vLLM echoes it: from its SamplingParams, always a float."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else default


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    # vLLM 0.32 leaves the per-turn lists empty for a plain (single-turn, no tool) generation.
    return {
        "input_tokens": prompt,
        "input_tokens_details": {
            "cached_tokens": 0,
            "cache_write_tokens": 0,
            "input_tokens_per_turn": [],
            "cached_tokens_per_turn": [],
        },
        "output_tokens": completion,
        "output_tokens_details": {
            "reasoning_tokens": 0,
            "tool_output_tokens": 0,
            "output_tokens_per_turn": [],
            "tool_output_tokens_per_turn": [],
        },
        "total_tokens": prompt + completion,
    }


def _part(text: str, logprobs: Any) -> dict[str, Any]:
    return {"annotations": [], "text": text, "type": "output_text", "logprobs": logprobs}


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [_part(text, None)] if text and status == "completed" else []
    return {"id": item_id, "content": content, "role": "assistant", "status": status, "type": "message", "phase": None}


def _sse(event: dict[str, Any]) -> bytes:
    return b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


class _Generation:
    """One response being generated: its object, its plan, its events (kept for background streams)."""

    def __init__(self, response: dict[str, Any], pieces: list[str], prompt_tokens: int, finish: str) -> None:
        self.response = response
        self.pieces = pieces
        self.prompt_tokens = prompt_tokens
        self.finish = finish
        self.events: list[bytes] = []
        self.more = asyncio.Event()
        self.done = False
        self.streamed = False


class MockResponses:
    """The Responses API of one mock server; its store lives as long as the app (like vLLM's, in memory)."""

    def __init__(self, app: MockVLLM) -> None:
        self.app = app
        self.store: dict[str, dict[str, Any]] = {}
        self.conversations: dict[str, list[dict[str, Any]]] = {}
        self.generations: dict[str, _Generation] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def reset(self) -> None:
        """Forget every stored response (a restarted vLLM)."""
        for task in self.tasks.values():
            task.cancel()
        self.store.clear()
        self.conversations.clear()
        self.generations.clear()
        self.tasks.clear()

    # -- POST /v1/responses -------------------------------------------------------------------------------------

    async def create(self, body: dict[str, Any], send: Send) -> int:
        """Serve POST /v1/responses."""
        from backends.mock_vllm.app import _HTTPError, _send_json, _validation_error, chat_prompt_text

        app = self.app
        cfg = app.config
        model = app._check_model(body, embedding=False)
        value = body.get("input")
        if value is None:
            raise _validation_error("body.input", "missing", "Field required")
        if not isinstance(value, str) and not (isinstance(value, list) and all(isinstance(i, dict) for i in value)):
            raise _validation_error("body.input", "list_type", "Input should be a valid list")
        background = bool(body.get("background"))
        wants_store = body.get("store", True) is not False
        if background and not wants_store:
            raise _HTTPError(400, "background can only be used when `store` is true", "BadRequestError", "background")
        if background and not cfg.responses_store:
            raise _HTTPError(
                400,
                "This vLLM engine does not support `store=True` and therefore does not support the background mode. "
                "To enable these features, set the environment variable `VLLM_ENABLE_RESPONSES_API_STORE=1` when "
                "launching the vLLM server.",
                "invalid_request_error",
                "background",
            )
        store = wants_store and cfg.responses_store
        messages: list[dict[str, Any]] = []
        if isinstance(body.get("instructions"), str):
            messages.append({"role": "system", "content": body["instructions"]})
        previous = body.get("previous_response_id")
        history: list[dict[str, Any]] = []
        if previous is not None:
            if previous not in self.store:
                raise self._not_found(str(previous))
            history = self.conversations.get(previous, [])
        turn = _messages(body)
        messages += [*history, *turn]
        max_tokens = body.get("max_output_tokens")
        if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)):
            raise _validation_error("body.max_output_tokens", "int_type", "Input should be a valid integer")
        prompt_tokens = _count(messages)
        room = app._check_length(prompt_tokens)
        plan = app._plan(chat_prompt_text(messages), body, max_tokens, room)
        given = body.get("request_id")
        rid: str = given if isinstance(given, str) else "resp_" + _uuid()
        response = self._object(rid, body, model, max_tokens if max_tokens is not None else room)
        generation = _Generation(response, plan.pieces, prompt_tokens, plan.finish_reason)
        app._account(prompt_tokens, len(plan.pieces))
        if store:
            self.conversations[rid] = [*history, *turn, {"role": "assistant", "content": plan.text}]
        if background:
            response["status"] = "queued"
            self.store[rid] = response
            self.generations[rid] = generation
            generation.streamed = bool(body.get("stream"))
            self.tasks[rid] = asyncio.ensure_future(self._run_background(rid, generation, bool(body.get("stream"))))
            self.tasks[rid].add_done_callback(lambda _: self.tasks.pop(rid, None))
            if body.get("stream"):
                return await self._tail(send, generation, 0)
            await _send_json(send, 200, orjson.dumps(response))
            return 200
        if body.get("stream"):
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
            async for event in self._events(generation):
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            await app._generation_delay([plan])
            self._finish(generation)
            await _send_json(send, 200, orjson.dumps(response))
        if store:
            self.store[rid] = response
        return 200

    def _object(self, rid: str, body: dict[str, Any], model: str, max_tokens: int) -> dict[str, Any]:
        """A response object as vLLM's ResponsesResponse.from_request dumps it (status in_progress, no output)."""
        return {
            "id": rid,
            "created_at": int(time.time()),
            "incomplete_details": None,
            "instructions": body.get("instructions"),
            "metadata": body.get("metadata"),
            "model": model,
            "object": "response",
            "output": [],
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "temperature": _float(body.get("temperature"), 1.0),
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools") or [],
            "top_p": _float(body.get("top_p"), 1.0),
            "background": bool(body.get("background")),
            "max_output_tokens": max_tokens,
            "max_tool_calls": body.get("max_tool_calls"),
            "previous_response_id": body.get("previous_response_id"),
            "prompt": None,
            "reasoning": body.get("reasoning"),
            "service_tier": body.get("service_tier", "auto"),
            "status": "in_progress",
            "text": body.get("text"),
            "top_logprobs": None,
            "truncation": body.get("truncation", "disabled"),
            "usage": None,
            "user": body.get("user"),
            "presence_penalty": _float(body.get("presence_penalty"), 0.0),
            "frequency_penalty": _float(body.get("frequency_penalty"), 0.0),
            "kv_transfer_params": None,
            "ec_transfer_params": None,
            "input_messages": None,
            "output_messages": None,
        }

    def _finish(self, generation: _Generation, item_id: str | None = None) -> None:
        """Complete the response object: output message, status, usage (unless it was cancelled meanwhile)."""
        response = generation.response
        if response["status"] == "cancelled":
            return
        text = "".join(generation.pieces)
        response["output"] = [_message_item(item_id or "msg_" + _uuid(), text, "completed")]
        incomplete = generation.finish == "length"
        response["status"] = "incomplete" if incomplete else "completed"
        response["incomplete_details"] = {"reason": "max_output_tokens"} if incomplete else None
        response["usage"] = _usage(generation.prompt_tokens, len(generation.pieces))

    async def _events(self, generation: _Generation) -> Any:
        """vLLM's event sequence for a plain text answer, paced like the chat stream (latency, token delay)."""
        app = self.app
        cfg = app.config
        sequence = 0

        def event(kind: str, **fields: Any) -> bytes:
            nonlocal sequence
            fields["sequence_number"] = sequence
            fields["type"] = kind
            sequence += 1
            return _sse(fields)

        initial = dict(generation.response)
        yield event("response.created", response=initial)
        yield event("response.in_progress", response=initial)
        if cfg.latency_s > 0:
            await app.sleep(cfg.latency_s)
        item_id = "msg_" + _uuid()
        pieces = generation.pieces
        if pieces:
            yield event("response.output_item.added", item=_message_item(item_id, "", "in_progress"), output_index=0)
            yield event(
                "response.content_part.added", content_index=0, item_id=item_id, output_index=0, part=_part("", [])
            )
            for index, piece in enumerate(pieces):
                if index and cfg.token_delay_s > 0:
                    await asyncio.sleep(cfg.token_delay_s)
                yield event(
                    "response.output_text.delta",
                    content_index=0,
                    delta=piece,
                    item_id=item_id,
                    logprobs=[],
                    output_index=0,
                )
            text = "".join(pieces)
            yield event(
                "response.output_text.done",
                content_index=0,
                item_id=item_id,
                logprobs=[],
                output_index=0,
                text=text,
            )
            yield event(
                "response.content_part.done",
                content_index=0,
                item_id=item_id,
                output_index=0,
                part=_part(text, None),
            )
            yield event("response.output_item.done", item=_message_item(item_id, text, "completed"), output_index=0)
        self._finish(generation, item_id)
        yield event("response.completed", response=dict(generation.response))

    async def _run_background(self, rid: str, generation: _Generation, stream: bool) -> None:
        generation.response["status"] = "in_progress"
        try:
            if stream:
                async for event in self._events(generation):
                    generation.events.append(event)
                    generation.more.set()
            else:
                plan_delay = self.app.config.latency_s + self.app.config.token_delay_s * len(generation.pieces)
                if plan_delay > 0:
                    await asyncio.sleep(plan_delay)
                self._finish(generation)
        finally:
            generation.done = True
            generation.more.set()

    async def _tail(self, send: Send, generation: _Generation, start: int) -> int:
        """Stream a background generation's events from `start`, following it until response.completed."""
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        index = start
        while True:
            generation.more.clear()
            while index < len(generation.events):
                await send({"type": "http.response.body", "body": generation.events[index], "more_body": True})
                index += 1
            if generation.done:
                break
            await generation.more.wait()
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return 200

    # -- GET /v1/responses/{id}, POST /v1/responses/{id}/cancel ---------------------------------------------------

    def _not_found(self, rid: str) -> Exception:
        from backends.mock_vllm.app import _HTTPError

        return _HTTPError(404, f"Response with id '{rid}' not found.", "invalid_request_error", "response_id")

    async def serve_stored(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        """Serve the per-id routes (FastAPI's 404 / 405 for what vLLM does not route)."""
        from backends.mock_vllm.app import _Disconnected, _HTTPError, _read_body, _send_error, _send_json

        method: str = scope["method"]
        rid, _, action = path[len("/v1/responses/") :].partition("/")
        if not rid or action not in ("", "cancel"):
            await _send_json(send, 404, b'{"detail":"Not Found"}')
            return
        if (action == "" and method != "GET") or (action == "cancel" and method != "POST"):
            await _send_json(send, 405, b'{"detail":"Method Not Allowed"}')
            return
        try:
            if method == "POST":
                await _read_body(receive)
            response = self.store.get(rid)
            if response is None:
                raise self._not_found(rid)
            if action == "cancel":
                if response["status"] not in ("queued", "in_progress"):
                    raise _HTTPError(
                        400, "Cannot cancel a synchronous response.", "invalid_request_error", "response_id"
                    )
                response["status"] = "cancelled"
                task = self.tasks.get(rid)
                if task is not None:
                    task.cancel()
                await _send_json(send, 200, orjson.dumps(response))
                return
            query = dict(
                pair.split("=", 1) for pair in scope.get("query_string", b"").decode().split("&") if "=" in pair
            )
            if query.get("stream") == "true":
                generation = self.generations.get(rid)
                if generation is None or not generation.streamed:
                    raise _HTTPError(400, f"Unknown response_id: {rid}", "BadRequestError", "response_id")
                after = query.get("starting_after")
                await self._tail(send, generation, int(after) + 1 if after and after.isdigit() else 0)
                return
            await _send_json(send, 200, orjson.dumps(response))
        except _HTTPError as err:
            await _send_error(send, err)
        except _Disconnected:
            return


def _count(messages: list[dict[str, Any]]) -> int:
    from backends.mock_vllm.app import chat_prompt_token_count

    return chat_prompt_token_count(messages)
