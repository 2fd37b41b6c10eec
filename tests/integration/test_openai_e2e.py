"""Chat through the platform against a real vLLM: answers, token accounting, timeouts and backend errors."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from tests.integration.conftest import SLOW_READ_TIMEOUT_S, E2EConfig, E2ERegistry, LatencyLog, Timing
from tests.live import PlatformProcess

pytestmark = pytest.mark.e2e

CAPITAL = "In one word, can you provide me the capital of France?"
LONG_ANSWER = "Count from one to one hundred in words, separated by commas."
# A fixed sampling seed makes the temperature-0.1 sample reproducible on one machine. Unseeded, SmolLM2-135M named
# Paris in 89 of 100 samples at 0.1 (it sometimes answers "No, I'm afraid. I'm afraid of the French."); which seeds
# are unlucky depends on the CPU (its vector code changes the logits' last bits): 1234 was lucky on the machines
# before 2026-12-02 and is not on that day's. So at a temperature above 0 the question is asked with up to three
# seeds and one answer naming Paris passes (all three missing: ~0.1 % per machine, and what a platform that
# garbled the prompt or the sampling parameters would get every time). At temperature 0 the seed changes nothing.
SEED = 1234
SAMPLE_SEEDS = (SEED, 4321, 2026)


def _messages(text: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": text}]


def _stream(client: openai.OpenAI, timing: Timing, **params: Any) -> list[ChatCompletionChunk]:
    """Run a streamed chat request to the end, noting the first token; returns every chunk."""
    chunks: list[ChatCompletionChunk] = []
    for chunk in client.chat.completions.create(stream=True, **params):
        if chunk.choices and chunk.choices[0].delta.content:
            timing.first_token()
        chunks.append(chunk)
    return chunks


def _text(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def _finish(chunks: list[ChatCompletionChunk]) -> tuple[str | None, str]:
    """The finish reason and the content carried by the chunk that has it."""
    for chunk in chunks:
        if chunk.choices and chunk.choices[0].finish_reason:
            return chunk.choices[0].finish_reason, chunk.choices[0].delta.content or ""
    return None, ""


def test_platform_lists_the_model_with_the_backends_context_length(
    client: openai.OpenAI, platform: PlatformProcess, e2e_registry: E2ERegistry, e2e_config: E2EConfig
) -> None:
    # given the registry built from VLLM_BACKEND_URL; when listing models through the platform
    listed = httpx.get(
        f"{platform.url}/v1/models", headers={"Authorization": f"Bearer {client.api_key}"}, timeout=10
    ).json()["data"]
    by_id = {m["id"]: m for m in listed}
    # then the model is there under its public name, with the max_model_len the backend reported
    assert e2e_registry.model in by_id
    assert by_id[e2e_registry.model].get("max_model_len") == e2e_config.max_model_len
    assert e2e_registry.slow_model in by_id


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("temperature", [0.0, 0.1], ids=["t0", "t0.1"])
def test_capital_of_france(
    client: openai.OpenAI, e2e_registry: E2ERegistry, latency: LatencyLog, temperature: float, stream: bool
) -> None:
    answers: list[str] = []
    for seed in SAMPLE_SEEDS if temperature > 0 else (SEED,):
        params: dict[str, Any] = {
            "model": e2e_registry.model,
            "messages": _messages(CAPITAL),
            "temperature": temperature,
            "max_tokens": 50,
            "seed": seed,
        }
        # when the seed's critical question is asked through the platform
        with latency.measure(f"capital t={temperature:g} {'stream' if stream else 'json'} seed={seed}") as timing:
            if stream:
                chunks = _stream(client, timing, **params)
                answers.append(_text(chunks))
                assert {c.model for c in chunks} == {e2e_registry.model}
            else:
                response = client.chat.completions.create(**params)
                answers.append(response.choices[0].message.content or "")
                assert response.model == e2e_registry.model
        if "paris" in answers[-1].lower():
            break
    # then the answer names Paris (at 0.1, one of the seeded samples does)
    assert "paris" in answers[-1].lower(), f"no 'Paris' in the answers at temperature {temperature}: {answers!r}"


def _tokenize(backend_http: httpx.Client, model: str, messages: list[ChatCompletionMessageParam]) -> int:
    response = backend_http.post("/tokenize", json={"model": model, "messages": messages})
    assert response.status_code == 200, f"backend /tokenize answered {response.status_code}: {response.text[:300]}"
    return int(response.json()["count"])


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_prompt_tokens_equal_backend_tokenize(
    client: openai.OpenAI,
    backend_http: httpx.Client,
    e2e_config: E2EConfig,
    e2e_registry: E2ERegistry,
    latency: LatencyLog,
    stream: bool,
) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "You are a concise assistant."},
        *_messages(CAPITAL),
    ]
    # given the backend's own count of the prompt (chat template applied, generation prompt added)
    expected = _tokenize(backend_http, e2e_config.model, messages)
    # when the same messages go through the platform
    params: dict[str, Any] = {"model": e2e_registry.model, "messages": messages, "temperature": 0, "max_tokens": 5}
    with latency.measure(f"prompt tokens {'stream' if stream else 'json'}") as timing:
        if stream:
            chunks = _stream(client, timing, stream_options={"include_usage": True}, **params)
            usage = chunks[-1].usage
        else:
            usage = client.chat.completions.create(**params).usage
    # then the platform reports exactly that many prompt tokens
    assert usage is not None
    assert usage.prompt_tokens == expected


def _tokens_in(chunk: ChatCompletionChunk) -> int:
    """How many generated tokens a chunk carries: its `logprobs.content` has one entry per token."""
    if not chunk.choices or chunk.choices[0].logprobs is None:
        return 0
    return len(chunk.choices[0].logprobs.content or [])


@pytest.mark.parametrize("prompt,max_tokens", [(CAPITAL, 50), (LONG_ANSWER, 24)], ids=["until-eos", "until-max"])
def test_completion_tokens_equal_streamed_token_chunks(
    client: openai.OpenAI, e2e_registry: E2ERegistry, latency: LatencyLog, prompt: str, max_tokens: int
) -> None:
    # when a chat is streamed with usage requested (and logprobs, which say how many tokens each chunk carries)
    with latency.measure(f"completion tokens {prompt[:12]}... stream") as timing:
        chunks = _stream(
            client,
            timing,
            model=e2e_registry.model,
            messages=_messages(prompt),
            temperature=0,
            max_tokens=max_tokens,
            logprobs=True,
            stream_options={"include_usage": True},
        )
    # then the client gets the usage chunk it asked for, once: the last chunk, with no choices
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    assert sum(1 for c in chunks if c.usage is not None) == 1
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # and every generated token reached the client in exactly one chunk. Chunks that carry a token are the ones
    # with text, plus the finish chunk of the end-of-sequence token: it has no text (content ""), finish_reason
    # "stop", and vLLM counts it. The role chunk and the usage chunk carry none. Usually each chunk carries one
    # token, but vLLM merges the deltas of a request when its API server falls behind the engine (a busy CPU,
    # speculative decoding), so the count is per token (logprobs entries), not per chunk.
    carrying = [c for c in chunks if _tokens_in(c)]
    streamed = sum(_tokens_in(c) for c in carrying)
    assert all(_tokens_in(c) for c in chunks if c.choices and c.choices[0].delta.content), "text without a token"
    textless = [c.choices[0].finish_reason for c in carrying if not c.choices[0].delta.content]
    assert textless in ([], ["stop"]), f"only the end-of-sequence token may come without text: {textless}"
    assert usage.completion_tokens == streamed, (
        f"usage says {usage.completion_tokens} completion tokens, the stream carried {streamed} "
        f"in {len(carrying)} chunks"
    )
    if streamed != len(carrying):
        timing.note = f"{streamed} tokens in {len(carrying)} chunks: vLLM merged deltas"
    finish_reason, _ = _finish(chunks)
    assert finish_reason in {"stop", "length"}
    if finish_reason == "length":
        assert usage.completion_tokens == max_tokens


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_max_tokens_reached_gives_finish_reason_length(
    client: openai.OpenAI, e2e_registry: E2ERegistry, latency: LatencyLog, stream: bool
) -> None:
    params: dict[str, Any] = {
        "model": e2e_registry.model,
        "messages": _messages(LONG_ANSWER),
        "temperature": 0,
        "max_tokens": 5,
    }
    # when the answer needs more than max_tokens
    with latency.measure(f"max_tokens=5 {'stream' if stream else 'json'}") as timing:
        if stream:
            chunks = _stream(client, timing, stream_options={"include_usage": True}, **params)
            finish_reason, _ = _finish(chunks)
            usage = chunks[-1].usage
        else:
            response = client.chat.completions.create(**params)
            finish_reason, usage = response.choices[0].finish_reason, response.usage
    # then generation stops there, and says why
    assert finish_reason == "length"
    assert usage is not None and usage.completion_tokens == 5


def test_backend_read_timeout_gives_504_in_openai_shape(
    client: openai.OpenAI, e2e_registry: E2ERegistry, latency: LatencyLog
) -> None:
    # given a backend row whose read timeout (0.05 s) is shorter than any real generation
    # when a long generation is requested (non-streaming: vLLM sends nothing before it is done)
    with latency.measure("read timeout -> 504") as timing, pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(
            model=e2e_registry.slow_model,
            messages=_messages(LONG_ANSWER),
            temperature=0,
            max_tokens=200,
            extra_body={"ignore_eos": True},
        )
    timing.outcome = f"{caught.value.status_code} {caught.value.code}"
    # then the platform answers 504 backend_timeout, in OpenAI's error shape, without waiting for the generation
    error = caught.value
    assert error.status_code == 504
    assert error.code == "backend_timeout"
    assert error.type == "server_error"
    body = error.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert f"{SLOW_READ_TIMEOUT_S:g} s" in body["error"]["message"]
    assert timing.seconds < 5, f"the 504 took {timing.seconds:.1f} s: the read timeout was not applied"


def _long_prompt(backend_http: httpx.Client, model: str, max_model_len: int) -> str:
    """A user message whose prompt is longer than the context, checked with the backend's own tokenizer."""
    words = max_model_len + 64
    for _ in range(4):
        text = "hello " * words
        if _tokenize(backend_http, model, _messages(text)) > max_model_len:
            return text
        words *= 2
    pytest.fail(f"could not build a prompt longer than {max_model_len} tokens")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_prompt_longer_than_context_gives_the_backends_400(
    client: openai.OpenAI,
    backend_http: httpx.Client,
    e2e_config: E2EConfig,
    e2e_registry: E2ERegistry,
    latency: LatencyLog,
    stream: bool,
) -> None:
    if e2e_config.max_model_len is None:
        pytest.skip("the backend's /v1/models does not report max_model_len")
    text = _long_prompt(backend_http, e2e_config.model, e2e_config.max_model_len)
    # when the prompt does not fit the model's context
    with latency.measure(f"prompt > context {'stream' if stream else 'json'}") as timing:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(
                model=e2e_registry.model, messages=_messages(text), max_tokens=16, stream=stream
            )
        timing.outcome = f"{caught.value.status_code}"
    # then the backend's own 400 comes through (not a 500/502), with its message naming the context length
    error = caught.value
    assert error.status_code == 400
    body = error.response.json()
    assert isinstance(body.get("error"), dict)
    assert str(e2e_config.max_model_len) in body["error"]["message"]
    assert body["error"].get("type") != "server_error"
