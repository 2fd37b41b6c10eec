"""Fixtures of the checks tests: Celery eager, registered mock backends, cases that replace the seeded ones."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from backends.checks.models import CheckCase
from backends.mock_vllm import MockServer
from backends.models import Backend, GpuPool, ServedModel
from llm_platform.celery import app as celery_app
from tests.factories import backend_create, model_create, pool_create

QUESTION = [{"role": "user", "content": "In one word, can you provide me the capital of France?"}]


@pytest.fixture(autouse=True)
def celery_eager() -> Iterator[None]:
    """Tasks run inline (no broker message is ever written by these tests)."""
    saved = celery_app.conf.task_always_eager, celery_app.conf.task_eager_propagates
    celery_app.conf.task_always_eager = True
    celery_app.conf.task_eager_propagates = True
    yield
    celery_app.conf.task_always_eager, celery_app.conf.task_eager_propagates = saved


@pytest.fixture
def only_cases(db: None) -> Callable[..., CheckCase]:
    """Disable the seeded cases and create the given one (defaults: the capital question, contains "Paris")."""
    CheckCase.objects.update(enabled=False)

    def create(**fields: Any) -> CheckCase:
        values: dict[str, Any] = {
            "name": f"case-{CheckCase.objects.count() + 1}",
            "messages": QUESTION,
            "temperature": 0.1,
            "max_tokens": 50,
            "expectation": "contains",
            "expected_text": "Paris",
        }
        values.update(fields)
        models = values.pop("models", None)
        case = CheckCase.objects.create(**values)
        if models:
            case.models.set(models)
        return case

    return create


class Fleet:
    """Mock vLLM servers registered as backends of one pool serving one chat model."""

    def __init__(self, stack: ExitStack) -> None:
        self._stack = stack
        self.pool: GpuPool = pool_create()
        self.model: ServedModel = model_create(pool=self.pool, name="chat-model", served_name="served-chat")
        self.mocks: dict[str, MockServer] = {}

    def add(self, name: str, *, backend: dict[str, Any] | None = None, **knobs: Any) -> Backend:
        """Start a mock with the given MockConfig knobs and register it as backend `name`."""
        knobs.setdefault("models", ["served-chat"])
        mock = self._stack.enter_context(MockServer(**knobs))
        self.mocks[name] = mock
        return backend_create(pool=self.pool, name=name, base_url=mock.url, **(backend or {}))

    def add_dead(self, name: str, **fields: Any) -> Backend:
        """Register a backend nothing listens on (port 9, discard: connection refused)."""
        return backend_create(pool=self.pool, name=name, base_url="http://127.0.0.1:9", **fields)


@pytest.fixture
def fleet(db: None) -> Iterator[Fleet]:
    """A pool with a chat model; add mock backends with `fleet.add(name, **knobs)`."""
    with ExitStack() as stack:
        yield Fleet(stack)
