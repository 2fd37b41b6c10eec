"""The `engine` fixture: the bundled mock (fast suite) or the real vLLM (`make e2e`, marker e2e)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest

from backends.mock_vllm import MockServer
from tests.contract.cases import Engine

MOCK_MODEL, MOCK_EMBED = "mock-chat", "mock-embed"


def _env_url(name: str) -> str | None:
    urls = [u.strip().rstrip("/").removesuffix("/v1") for u in os.environ.get(name, "").split(",") if u.strip()]
    return urls[0] if urls else None


def _first_model(url: str, headers: dict[str, str]) -> str:
    return str(httpx.get(f"{url}/v1/models", headers=headers, timeout=10).json()["data"][0]["id"])


def _real_engine() -> Engine:
    url = _env_url("VLLM_BACKEND_URL")
    if url is None:
        message = "the real engine needs VLLM_BACKEND_URL (make e2e sets it)"
        if os.environ.get("E2E_REQUIRE") == "1":
            pytest.fail(f"E2E_REQUIRE=1: {message}", pytrace=False)
        pytest.skip(message)
    key = os.environ.get("VLLM_API_KEY", "")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    embed_url = _env_url("VLLM_EMBED_URL")
    return Engine(
        name="vllm",
        url=url,
        model=os.environ.get("VLLM_MODEL_NAME", "").strip() or _first_model(url, headers),
        embed_url=embed_url,
        embed_model=(os.environ.get("VLLM_EMBED_MODEL_NAME", "").strip() or _first_model(embed_url, headers))
        if embed_url
        else None,
        headers=headers,
    )


@pytest.fixture(scope="session", params=["mock", pytest.param("vllm", marks=pytest.mark.e2e)])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    """A base URL and model names: the mock on a loopback socket, or the real vLLM of the E2E run."""
    if request.param == "vllm":
        yield _real_engine()
        return
    with MockServer(models=[MOCK_MODEL], embed_models=[MOCK_EMBED]) as mock:
        yield Engine(name="mock", url=mock.url, model=MOCK_MODEL, embed_url=mock.url, embed_model=MOCK_EMBED)


@pytest.fixture(scope="session")
def http(engine: Engine) -> Iterator[httpx.Client]:
    """An HTTP client for the engine (real generation on a CPU takes seconds)."""
    with httpx.Client(headers=engine.headers, timeout=120) as client:
        yield client
