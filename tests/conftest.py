"""Shared fixtures: the master key, registry snapshots, an in-process gateway wired to the mock vLLM."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from backends.mock_vllm import MockConfig, MockVLLM
from routing.dispatch import Dispatcher
from routing.gateway import Gateway
from routing.registry import RegistryCache
from routing.usage import MemoryUsageSink
from tests.factories import backend_snap, registry_snap

MASTER_KEY = "test-master-key"
AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}


@pytest.fixture(autouse=True)
def _master_key(settings: Any) -> None:
    settings.ROUTER_MASTER_KEY = MASTER_KEY


@pytest.fixture
def mock_vllm() -> MockVLLM:
    """An in-process mock vLLM serving `served-chat`, `served-text` and `served-embed`."""
    return MockVLLM(MockConfig(models=["served-chat", "served-text"], embed_models=["served-embed"]))


@pytest.fixture
def make_gateway() -> Callable[..., Gateway]:
    """Build a gateway over a static registry whose backends are reached through the given transports."""

    def build(
        *,
        registry: Any = None,
        transport: httpx.AsyncBaseTransport | None = None,
        max_attempts: int = 2,
        **options: Any,
    ) -> Gateway:
        snapshot = registry if registry is not None else registry_snap()
        return Gateway(
            None,
            registry=RegistryCache.static(snapshot),
            dispatcher=Dispatcher(max_attempts=max_attempts, transport=transport),
            master_key=MASTER_KEY,
            usage=MemoryUsageSink(),
            **options,
        )

    return build


@pytest.fixture
async def gateway_client(
    make_gateway: Callable[..., Gateway], mock_vllm: MockVLLM
) -> AsyncIterator[tuple[httpx.AsyncClient, Gateway]]:
    """An httpx client talking in-process to a gateway whose single backend is the in-process mock."""
    gateway = make_gateway(
        registry=registry_snap(backends=[backend_snap("b1", base_url="http://mock-a")]),
        transport=httpx.ASGITransport(app=mock_vllm),
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="http://router") as client:
        yield client, gateway
