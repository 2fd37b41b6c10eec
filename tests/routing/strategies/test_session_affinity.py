"""Session affinity keeps a key on one backend and moves ~1/N of keys when a backend leaves."""

from routing.dispatch import RequestContext
from routing.strategies import RoutingStats, SessionAffinity
from tests.factories import backend_snap


def _route(backends, keys):
    strategy = SessionAffinity()
    return {k: strategy.select(backends, RoutingStats(affinity_key=k)).name for k in keys}


def test_a_key_stays_on_one_backend() -> None:
    backends = [backend_snap(f"b{i}") for i in range(4)]
    strategy = SessionAffinity()
    picks = {strategy.select(backends, RoutingStats(affinity_key="conversation-42")).name for _ in range(100)}
    assert len(picks) == 1


def test_removing_one_of_four_moves_only_its_keys() -> None:
    # given 4 backends and 2,000 session keys spread over them
    backends = [backend_snap(f"b{i}") for i in range(4)]
    keys = [f"user-{i}" for i in range(2000)]
    before = _route(backends, keys)
    shares = [list(before.values()).count(f"b{i}") / 2000 for i in range(4)]
    assert all(0.2 < s < 0.3 for s in shares), shares
    # when b3 leaves
    after = _route(backends[:3], keys)
    moved = [k for k in keys if before[k] != after[k]]
    # then only the keys that were on b3 move (~1/4), and nothing else
    assert all(before[k] == "b3" for k in moved)
    assert 0.2 < len(moved) / 2000 < 0.3
    # and when it comes back, the same keys return
    assert _route(backends, keys) == before


def test_key_from_user_field_or_header() -> None:
    context = RequestContext(user="alice", headers=[(b"x-session-id", b"s-1")])
    assert context.affinity_key("user") == "alice"
    assert context.affinity_key("header:X-Session-Id") == "s-1"
    assert context.affinity_key("header:x-other") is None


def test_without_key_falls_back_to_least_outstanding() -> None:
    backends = [backend_snap("b1"), backend_snap("b2")]
    assert SessionAffinity().select(backends, RoutingStats(in_flight={"b1": 3})).name == "b2"
