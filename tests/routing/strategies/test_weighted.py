"""Weighted routing follows the backends' weights."""

import random

from routing.strategies import RoutingStats, Weighted
from tests.factories import backend_snap


def test_weights_within_tolerance_over_1000_picks() -> None:
    # given weights 1, 3 and 6
    backends = [backend_snap("a", weight=1), backend_snap("b", weight=3), backend_snap("c", weight=6)]
    strategy = Weighted(random.Random(7))
    # when 1,000 requests are routed
    picks = [strategy.select(backends, RoutingStats()).name for _ in range(1000)]
    # then each share is within 5 points of its weight share (10 %, 30 %, 60 %)
    for name, share in {"a": 0.1, "b": 0.3, "c": 0.6}.items():
        assert abs(picks.count(name) / 1000 - share) < 0.05, (name, picks.count(name))
