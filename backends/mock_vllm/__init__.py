"""Bundled mock vLLM server: a fast, deterministic, knob-driven raw ASGI imitation of vLLM's API.

Standalone (no Django). In-process: ``MockVLLM`` (an ASGI app, use with ``httpx.ASGITransport``);
on a real socket: ``MockServer`` (uvicorn in a background thread); from the shell:
``python -m backends.mock_vllm --port 8101 --model mock-chat --embed-model mock-embed``.
"""

from backends.mock_vllm.app import (
    DEFAULT_ANSWER,
    MockAbort,
    MockConfig,
    MockStats,
    MockVLLM,
    chat_prompt_token_count,
    chat_prompt_token_ids,
    chat_prompt_tokens,
    count_tokens,
    embed_text,
    token_ids,
    tokenize,
)
from backends.mock_vllm.prefix_cache import PrefixCache
from backends.mock_vllm.server import MockServer, await_until, free_port, wait_until

__all__ = [
    "DEFAULT_ANSWER",
    "MockAbort",
    "MockConfig",
    "MockServer",
    "MockStats",
    "MockVLLM",
    "PrefixCache",
    "await_until",
    "chat_prompt_token_count",
    "chat_prompt_token_ids",
    "chat_prompt_tokens",
    "count_tokens",
    "embed_text",
    "free_port",
    "token_ids",
    "tokenize",
    "wait_until",
]
