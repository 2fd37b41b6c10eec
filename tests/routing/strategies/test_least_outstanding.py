"""Least outstanding avoids the busy backend."""

import random

from routing.strategies import LeastOutstanding, RoutingStats
from tests.factories import backend_snap


def test_avoids_the_busy_backend() -> None:
    # given b1 with 5 requests in flight and b2, b3 with fewer
    backends = [backend_snap("b1"), backend_snap("b2"), backend_snap("b3")]
    stats = RoutingStats(in_flight={"b1": 5, "b2": 1, "b3": 2})
    # when routing; then the least busy one is chosen
    assert LeastOutstanding(random.Random(1)).select(backends, stats).name == "b2"


def test_ties_are_broken_at_random() -> None:
    # given two idle backends; when routing many times; then both are used
    backends = [backend_snap("b1"), backend_snap("b2"), backend_snap("b3")]
    strategy = LeastOutstanding(random.Random(3))
    stats = RoutingStats(in_flight={"b3": 4})
    picks = {strategy.select(backends, stats).name for _ in range(50)}
    assert picks == {"b1", "b2"}
