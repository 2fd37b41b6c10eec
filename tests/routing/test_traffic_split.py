"""Traffic split (canary) choice, without a database: weights with fixed seeds, stickiness, stable hashing."""

from __future__ import annotations

import random
import subprocess
import sys
from collections import Counter

import pytest

from backends.snapshot import ModelSnap, SplitSnap
from routing.dispatch import RequestContext
from routing.traffic import split_choose, sticky_point

V1 = ModelSnap("chat-v1", "served-v1", "chat", "p1", (), None, 0)
V2 = ModelSnap("chat-v2", "served-v2", "chat", "p1", (), None, 0)
OWN = ModelSnap("mychat", "served-own", "chat", "p1", (), None, 0)
N = 20_000


def split(shares: list[tuple[ModelSnap, float]], sticky_key: str = "") -> SplitSnap:
    total = sum(w for _, w in shares)
    bounds, running = [], 0.0
    for _, weight in shares:
        running += weight
        bounds.append(running / total)
    return SplitSnap("mychat", tuple(m for m, _ in shares), tuple(bounds), sticky_key)


def tolerance(n: int, p: float) -> float:
    """Five binomial standard deviations: a correct split stays inside with overwhelming probability."""
    return 5 * (n * p * (1 - p)) ** 0.5


@pytest.mark.parametrize("seed", [1, 7, 2026])
def test_random_split_respects_the_weights(seed: int) -> None:
    # given mychat -> 95 % chat-v1, 5 % chat-v2, drawn with a fixed seed
    rng = random.Random(seed)
    snap = split([(V1, 95), (V2, 5)])
    # when N requests without a sticky key are routed
    counts = Counter(split_choose(snap, RequestContext(), rng.random)[0].name for _ in range(N))
    # then each model gets its share, within tolerance
    assert abs(counts["chat-v2"] - N * 0.05) < tolerance(N, 0.05), counts
    assert counts["chat-v1"] + counts["chat-v2"] == N


def test_three_way_split_with_the_model_keeping_the_rest() -> None:
    rng = random.Random(42)
    snap = split([(OWN, 70), (V1, 20), (V2, 10)])
    counts = Counter(split_choose(snap, RequestContext(), rng.random)[0].name for _ in range(N))
    for name, share in (("mychat", 0.7), ("chat-v1", 0.2), ("chat-v2", 0.1)):
        assert abs(counts[name] - N * share) < tolerance(N, share), counts


def test_sticky_split_keeps_each_user_on_one_model_and_spreads_users_by_weight() -> None:
    # given a split sticky on the request's user field
    snap = split([(V1, 90), (V2, 10)], sticky_key="user")
    rng = random.Random(3)
    users = [f"user-{i}" for i in range(N)]
    first = {u: split_choose(snap, RequestContext(user=u), rng.random) for u in users}
    # then the choice says it was sticky, repeats for the same user whatever the random draws are
    assert all(sticky for _, sticky in first.values())
    for user in users[:500]:
        for _ in range(5):
            assert split_choose(snap, RequestContext(user=user), rng.random)[0] is first[user][0]
    # and users spread over the models by weight
    share_v2 = sum(1 for m, _ in first.values() if m is V2)
    assert abs(share_v2 - N * 0.1) < tolerance(N, 0.1)


def test_sticky_on_a_session_header() -> None:
    snap = split([(V1, 50), (V2, 50)], sticky_key="header:x-session-id")
    rng = random.Random(5)

    def chosen(session: str) -> ModelSnap:
        return split_choose(snap, RequestContext(headers=((b"x-session-id", session.encode()),)), rng.random)[0]

    sessions = [f"conversation-{i}" for i in range(200)]
    assert all(len({chosen(s).name for _ in range(10)}) == 1 for s in sessions)
    # both halves are used (not everyone on one model)
    assert {chosen(s).name for s in sessions} == {"chat-v1", "chat-v2"}


def test_sticky_split_without_the_key_draws_at_random() -> None:
    snap = split([(V1, 50), (V2, 50)], sticky_key="user")
    rng = random.Random(11)
    picks = [split_choose(snap, RequestContext(), rng.random) for _ in range(400)]
    assert not any(sticky for _, sticky in picks)
    assert Counter(m.name for m, _ in picks).keys() == {"chat-v1", "chat-v2"}


def test_raising_the_canary_share_only_moves_users_towards_the_canary() -> None:
    # given sticky users at 5 % chat-v2, when the canary goes to 20 %
    before = split([(V1, 95), (V2, 5)], sticky_key="user")
    after = split([(V1, 80), (V2, 20)], sticky_key="user")
    moved_back = 0
    moved_forward = 0
    for i in range(5000):
        context = RequestContext(user=f"u{i}")
        a, b = split_choose(before, context)[0], split_choose(after, context)[0]
        moved_back += a is V2 and b is V1
        moved_forward += a is V1 and b is V2
    # then nobody on the canary goes back, and about 15 % of users move to it
    assert moved_back == 0
    assert abs(moved_forward - 5000 * 0.15) < tolerance(5000, 0.15)


def test_sticky_point_is_stable_across_processes_and_salted_by_model() -> None:
    # the point is the same in another interpreter (no per-process hash seed)
    code = "from routing.traffic import sticky_point; print(repr(sticky_point('mychat', 'alice')))"
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "123"}
    )
    assert float(other.stdout) == sticky_point("mychat", "alice")
    assert 0.0 <= sticky_point("mychat", "alice") < 1.0
    # and two models' splits draw independently for the same user
    assert sticky_point("mychat", "alice") != sticky_point("otherchat", "alice")
