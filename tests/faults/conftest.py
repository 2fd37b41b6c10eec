"""Fixtures of the fault tests: namespaces created per test and always removed, the platform on the host side."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator

import pytest

from tests.faults.netns import Netns, cleanup_leftovers


@pytest.fixture(scope="session", autouse=True)
def _teardown_on_sigterm() -> Iterator[None]:
    """SIGTERM (scripts/faults.sh's overall time limit) stops the run like Ctrl-C: fixtures still tear down, so
    the platform process, the servers in the namespaces and the namespaces themselves are all removed."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture
def netns() -> Iterator[Callable[[int], Netns]]:
    """Create namespaces by index (llmfx-N, 10.200.N.0/30); all are removed at the end, even on failure."""
    cleanup_leftovers()
    created: list[Netns] = []

    def make(index: int) -> Netns:
        ns = Netns(index)
        created.append(ns)
        return ns.create()

    try:
        yield make
    finally:
        for ns in created:
            ns.destroy()
