"""Round robin spreads requests evenly."""

from routing.strategies import RoundRobin, RoutingStats
from tests.factories import backend_snap


def test_round_robin_is_even() -> None:
    # given three backends; when 300 requests are routed
    backends = [backend_snap(f"b{i}") for i in range(3)]
    strategy = RoundRobin()
    picks = [strategy.select(backends, RoutingStats()).name for _ in range(300)]
    # then each gets exactly a third, in turn
    assert {name: picks.count(name) for name in set(picks)} == {"b0": 100, "b1": 100, "b2": 100}
    assert picks[:6] == ["b0", "b1", "b2", "b0", "b1", "b2"]
