"""The real ASGI stack in uvicorn processes, on the test database, with the mock vLLM on a real socket."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from backends.mock_vllm import MockServer
from backends.models import Backend, ServedModel
from tests.conftest import MASTER_KEY
from tests.factories import backend_create, model_create, pool_create
from tests.live import PlatformProcess

CAPITAL = "In one word, can you provide me the capital of France?"

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def mock_server() -> Iterator[MockServer]:
    """The mock vLLM on a real port, serving the registry's served names."""
    with MockServer(models=["served-chat", "served-text"], embed_models=["served-embed"]) as server:
        yield server


@pytest.fixture
def registry_rows(mock_server: MockServer) -> dict[str, object]:
    """A pool with one backend (the mock) and a chat (with an alias), a completion and an embedding model."""
    pool = pool_create(name="gpu-a")
    backend = backend_create(pool=pool, name="mock-a", base_url=mock_server.url)
    chat = model_create(pool=pool, name="chat-model", served_name="served-chat", aliases=["chat-alias"])
    model_create(pool=pool, name="text-model", served_name="served-text", kind="completion")
    model_create(pool=pool, name="embed-model", served_name="served-embed", kind="embedding")
    return {"pool": pool, "backend": backend, "chat": chat}


def test_openai_sdk_against_live_process(mock_server: MockServer, registry_rows: dict[str, object]) -> None:
    # given a platform process in front of the mock; when the official SDK calls every endpoint
    with PlatformProcess(master_key=MASTER_KEY) as platform:
        client = openai.OpenAI(base_url=f"{platform.url}/v1", api_key=MASTER_KEY, max_retries=0)
        # then models are listed by public name
        assert sorted(m.id for m in client.models.list()) == ["chat-model", "embed-model", "text-model"]
        assert client.models.retrieve("chat-alias").id == "chat-alias"

        chat = client.chat.completions.create(
            model="chat-model", messages=[{"role": "user", "content": CAPITAL}], temperature=0, max_tokens=50
        )
        assert chat.choices[0].message.content == "Paris"
        assert chat.model == "chat-model"
        assert mock_server.stats.last_request["model"] == "served-chat"
        assert chat.usage is not None and chat.usage.completion_tokens == 1

        via_alias = client.chat.completions.create(model="chat-alias", messages=[{"role": "user", "content": CAPITAL}])
        assert via_alias.model == "chat-alias"
        assert mock_server.stats.last_request["model"] == "served-chat"

        text = client.completions.create(model="text-model", prompt="Say something", max_tokens=3)
        assert text.model == "text-model"
        assert text.choices[0].finish_reason == "length"
        assert text.usage is not None and text.usage.completion_tokens == 3
        assert mock_server.stats.last_request["model"] == "served-text"

        emb = client.embeddings.create(model="embed-model", input=["the cat sat", "a dog ran"])
        assert emb.model == "embed-model"
        assert [len(d.embedding) for d in emb.data] == [384, 384]

        stream = client.chat.completions.create(
            model="chat-model", messages=[{"role": "user", "content": "Tell me"}], max_tokens=5, stream=True
        )
        chunks = list(stream)
        assert {c.model for c in chunks} == {"chat-model"}
        assert chunks[-1].choices[0].finish_reason == "length"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{platform.url}/v1", api_key="wrong", max_retries=0).models.list()


def _listed(url: str) -> set[str]:
    response = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {MASTER_KEY}"}, timeout=5)
    return {m["id"] for m in response.json()["data"]}


def _seen_within(deadline_s: float, predicate: object) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_registry_change_reaches_two_processes_within_two_seconds(registry_rows: dict[str, object]) -> None:
    # given two web processes serving the same registry
    with PlatformProcess(master_key=MASTER_KEY) as a, PlatformProcess(master_key=MASTER_KEY) as b:
        assert "new-model" not in _listed(a.url) | _listed(b.url)
        # when an operator adds a model (a save, as admin does)
        model_create(pool=registry_rows["pool"], name="new-model")  # type: ignore[arg-type]
        # then both processes list it within 2 s, without a restart
        assert _seen_within(2.0, lambda: "new-model" in _listed(a.url) and "new-model" in _listed(b.url))
        # and disabling it takes it away again
        ServedModel.objects.filter(name="new-model").update(enabled=False)
        ServedModel.objects.get(name="chat-model").save()  # .update() sends no signal; a save does
        assert _seen_within(2.0, lambda: "new-model" not in _listed(a.url) | _listed(b.url))


def test_draining_the_only_backend_gives_503_in_both_processes(registry_rows: dict[str, object]) -> None:
    with PlatformProcess(master_key=MASTER_KEY) as a, PlatformProcess(master_key=MASTER_KEY) as b:
        backend = registry_rows["backend"]
        assert isinstance(backend, Backend)
        backend.state = "draining"
        backend.save()

        def both_503() -> bool:
            codes = [
                httpx.post(
                    f"{p.url}/v1/chat/completions",
                    headers={"Authorization": f"Bearer {MASTER_KEY}"},
                    json={"model": "chat-model", "messages": [{"role": "user", "content": "hi"}]},
                    timeout=5,
                ).status_code
                for p in (a, b)
            ]
            return codes == [503, 503]

        assert _seen_within(2.0, both_503)


def test_health_state_spreads_to_two_processes(mock_server: MockServer) -> None:
    from backends.services import backend_probe_all

    # given a pool of two backends (both the healthy mock and a second mock about to fail its health check)
    with MockServer(models=["served-chat"]) as sick:
        pool = pool_create(name="gpu-h")
        backend_create(pool=pool, name="h-good", base_url=mock_server.url)
        backend_create(pool=pool, name="h-sick", base_url=sick.url)
        model_create(pool=pool, name="h-model", served_name="served-chat")
        with PlatformProcess(master_key=MASTER_KEY) as a, PlatformProcess(master_key=MASTER_KEY) as b:
            # when the periodic probe finds h-sick unhealthy
            sick.config.health_status = 503
            backend_probe_all()

            def only_good() -> bool:
                served = {
                    httpx.post(
                        f"{p.url}/v1/chat/completions",
                        headers={"Authorization": f"Bearer {MASTER_KEY}"},
                        json={"model": "h-model", "messages": [{"role": "user", "content": "hi"}]},
                        timeout=5,
                    ).headers.get("x-router-backend")
                    for p in (a, b)
                    for _ in range(2)
                }
                return served == {"h-good"}

            # then both processes stop routing to it within 2 s
            assert _seen_within(2.0, only_good)
            # and once both have reloaded, no request reaches it any more
            reached = sick.stats.total_requests
            assert all(only_good() for _ in range(3))
            assert sick.stats.total_requests == reached
