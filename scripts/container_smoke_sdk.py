"""SDK smoke checks through the platform image's web container (scripts/container_smoke.sh).

    python scripts/container_smoke_sdk.py smoke  BASE_URL API_KEY
        models list, a chat answered "Paris", a stream, an embedding; exit 1 on the first failure
    python scripts/container_smoke_sdk.py drain  BASE_URL API_KEY MARKER_FILE
        one long stream; MARKER_FILE is written after its first chunk (the caller then stops the containers);
        exit 0 only when the stream ends normally (finish_reason, every token) although SIGTERM came mid-stream

Each step prints one line; `drain` ends with `completion_tokens=N` (for the usage check) and `ended_at=EPOCH`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from openai import OpenAI

CHAT_MODEL = "mock-chat"
EMBED_MODEL = "mock-embed"
DRAIN_TOKENS = 80  # the mock streams one token per --token-delay-s: a stream of a few seconds


def fail(message: str) -> None:
    print(f"FAIL {message}", flush=True)
    sys.exit(1)


def smoke(client: OpenAI) -> None:
    """The four checks of a new installation, as a user of the openai package runs them."""
    ids = sorted(model.id for model in client.models.list())
    if CHAT_MODEL not in ids or EMBED_MODEL not in ids:
        fail(f"models list: {ids}")
    print(f"ok models list: {ids}", flush=True)

    chat = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "In one word, can you provide me the capital of France?"}],
        max_tokens=8,
    )
    answer = chat.choices[0].message.content or ""
    if "Paris" not in answer:
        fail(f"chat answer {answer!r}")
    print(f"ok chat: {answer!r}", flush=True)

    pieces: list[str] = []
    finish = None
    for chunk in client.chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "Count to ten."}], max_tokens=12, stream=True
    ):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    if finish is None or not "".join(pieces):
        fail(f"stream: {len(pieces)} chunks, finish_reason {finish}")
    print(f"ok stream: {len(pieces)} chunks, finish_reason {finish}", flush=True)

    vectors = client.embeddings.create(model=EMBED_MODEL, input=["hello", "world"]).data
    if len(vectors) != 2 or not vectors[0].embedding:
        fail(f"embeddings: {len(vectors)} vectors")
    print(f"ok embeddings: {len(vectors)} vectors of {len(vectors[0].embedding)}", flush=True)


def drain(client: OpenAI, marker: Path) -> None:
    """One long stream that must end normally while the containers are being stopped."""
    started = time.monotonic()
    tokens = 0
    finish = None
    stream = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "Tell me a long story."}],
        max_tokens=DRAIN_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        if chunk.choices[0].delta.content:
            tokens += 1
            if tokens == 1:
                marker.write_text("streaming\n")
        finish = chunk.choices[0].finish_reason or finish
    took = time.monotonic() - started
    completion = usage.completion_tokens if usage is not None else None
    if finish != "length" or completion != DRAIN_TOKENS:
        fail(f"drain stream cut: {tokens} content chunks, finish_reason {finish}, usage {completion} in {took:.1f}s")
    print(f"ok drain stream: {tokens} content chunks, finish_reason {finish} in {took:.1f}s", flush=True)
    print(f"completion_tokens={completion}", flush=True)
    print(f"ended_at={time.time():.3f}", flush=True)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[0] not in {"smoke", "drain"}:
        print(__doc__, file=sys.stderr)
        return 2
    client = OpenAI(base_url=f"{argv[1]}/v1", api_key=argv[2], timeout=60, max_retries=0)
    if argv[0] == "smoke":
        smoke(client)
    else:
        drain(client, Path(argv[3]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
