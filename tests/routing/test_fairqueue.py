"""The admission queue's discipline (routing.fairqueue) on a fixed clock: classes, fairness, promotion, shedding."""

from __future__ import annotations

from collections import Counter

from routing.fairqueue import FairQueue, Ticket

CRITICAL, STANDARD, BATCH = 0, 1, 2


class FixedClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _queue(clock: FixedClock | None = None, *, max_size: int = 100, promote_after_s: float = 0.0) -> FairQueue[str]:
    return FairQueue(classes=3, max_size=max_size, promote_after_s=promote_after_s, clock=clock or FixedClock())


def _offer(queue: FairQueue[str], key: str, rank: int = STANDARD, n: int = 1, weight: float = 1.0) -> list[Ticket[str]]:
    tickets = []
    for i in range(n):
        ticket, shed = queue.offer(key, rank, f"{key}{i}", weight=weight)
        assert ticket is not None and shed is None
        tickets.append(ticket)
    return tickets


def _serve(queue: FairQueue[str], n: int) -> list[str]:
    """Take the next n tickets; their items in service order."""
    served = []
    for _ in range(n):
        ticket = queue.peek()
        assert ticket is not None
        queue.take(ticket)
        served.append(ticket.item)
    return served


def test_a_higher_class_is_served_first_whatever_arrived_before() -> None:
    # given a standard flood queued, then one batch and one critical request
    queue = _queue()
    _offer(queue, "flood", STANDARD, n=5)
    _offer(queue, "nightly", BATCH)
    _offer(queue, "pager", CRITICAL)
    # when the queue is served
    order = _serve(queue, 7)
    # then critical first, the standard flood, batch last
    assert order == ["pager0", "flood0", "flood1", "flood2", "flood3", "flood4", "nightly0"]
    assert len(queue) == 0 and queue.peek() is None


def test_within_a_class_a_key_with_one_request_does_not_wait_behind_a_flood() -> None:
    # given key A queued six requests, then key B two
    queue = _queue()
    _offer(queue, "A", n=6)
    _offer(queue, "B", n=2)
    # when served
    order = _serve(queue, 8)
    # then A and B alternate while both wait (B is not behind A's six), then A's rest
    assert order == ["A0", "B0", "A1", "B1", "A2", "A3", "A4", "A5"]


def test_backlogged_keys_share_by_weight() -> None:
    # given two backlogged keys of weights 2 and 1
    queue = _queue()
    _offer(queue, "heavy", n=30, weight=2)
    _offer(queue, "light", n=30, weight=1)
    # when 30 requests are served
    served = Counter(item.rstrip("0123456789") for item in _serve(queue, 30))
    # then in proportion 2:1
    assert served == {"heavy": 20, "light": 10}


def test_equal_keys_share_equally_whatever_their_backlog() -> None:
    queue = _queue()
    _offer(queue, "A", n=50)
    _offer(queue, "B", n=5)
    _offer(queue, "C", n=20)
    served = Counter(item[0] for item in _serve(queue, 15))
    assert served == {"A": 5, "B": 5, "C": 5}


def test_an_idle_key_does_not_bank_credit() -> None:
    # given key A alone served for a while (the class's virtual time moved on)
    queue = _queue()
    _offer(queue, "A", n=20)
    _serve(queue, 10)
    # when key B arrives with five requests
    _offer(queue, "B", n=5)
    order = _serve(queue, 6)
    # then B shares with A from now on: it does not get its five first for having been idle
    assert Counter(item[0] for item in order) == {"A": 3, "B": 3}


def test_a_waiting_request_is_promoted_one_class_per_age_period() -> None:
    # given a batch request queued at t=0, then a standard flood at t=1.5; promotion after 2 s
    clock = FixedClock(0.0)
    queue = _queue(clock, promote_after_s=2.0)
    (nightly,) = _offer(queue, "nightly", BATCH)
    clock.now = 1.5
    _offer(queue, "flood", STANDARD, n=10)
    assert nightly.rank == BATCH
    # when 2 s have passed
    clock.now = 2.0
    # then it is standard (the flood, younger, is not promoted), sharing fairly with the flood: served next
    assert queue.peek() is nightly and nightly.rank == STANDARD and nightly.promoted == 1
    assert "nightly0" in _serve(queue, 2)
    assert queue.promotions == 1


def test_promotion_reaches_the_top_class_so_nothing_starves() -> None:
    # given a batch request and a critical flood that never ends
    clock = FixedClock(0.0)
    queue = _queue(clock, promote_after_s=1.0)
    (nightly,) = _offer(queue, "nightly", BATCH)
    _offer(queue, "pager", CRITICAL, n=50)
    # when 1 s passes it is standard (still behind critical); after 2 s it is critical and shares with the flood
    clock.now = 1.0
    head = queue.peek()
    assert head is not None and head.item == "pager0" and nightly.rank == STANDARD
    clock.now = 2.0
    queue.peek()
    assert nightly.rank == CRITICAL
    assert "nightly0" in _serve(queue, 2)


def test_a_class_that_is_being_served_is_not_promoted_so_it_does_not_dilute_the_one_above() -> None:
    # given batch requests waiting far past the age, while batch is served now and then (spare slots)
    clock = FixedClock(0.0)
    queue = _queue(clock, promote_after_s=1.5)
    batch = _offer(queue, "nightly", BATCH, n=10)
    for second in range(1, 4):
        clock.now = float(second)
        _offer(queue, "web", STANDARD)
        standard, spare = _serve(queue, 2)
        assert standard == "web0" and spare.startswith("nightly")  # standard first, then batch: it is served
    # then none of the batch requests was promoted
    assert queue.promotions == 0 and all(t.rank == BATCH for t in batch if t.live)
    # but once batch goes unserved for the age, its oldest waiting request moves up, one per period
    clock.now = 4.5
    queue.peek()
    assert queue.promotions == 1 and queue.depth() == [0, 1, 6]
    queue.peek()
    assert queue.promotions == 1
    clock.now = 6.0  # a period later: the next batch one, and the first (unserved in standard) moves on up
    queue.peek()
    assert queue.promotions == 3 and queue.depth() == [1, 1, 5]


def test_no_promotion_before_the_age() -> None:
    clock = FixedClock(0.0)
    queue = _queue(clock, promote_after_s=2.0)
    (nightly,) = _offer(queue, "nightly", BATCH)
    _offer(queue, "flood", STANDARD, n=3)
    clock.now = 1.999
    assert _serve(queue, 3) == ["flood0", "flood1", "flood2"] and nightly.rank == BATCH


def test_full_queue_sheds_the_lowest_class_first() -> None:
    # given a full queue of three: two standard, one batch
    queue = _queue(max_size=3)
    _offer(queue, "web", STANDARD, n=2)
    (nightly,) = _offer(queue, "nightly", BATCH)
    # when a standard request arrives
    ticket, shed = queue.offer("web2", STANDARD, "web2-0")
    # then the batch one is shed for it
    assert ticket is not None and shed is nightly and not nightly.live
    assert len(queue) == 3 and queue.shed == 1
    # and a batch request arriving at a full queue of standard ones is refused
    assert queue.offer("nightly", BATCH, "nightly1") == (None, None)
    assert queue.refused == 1


def test_full_queue_sheds_the_floods_newest_not_a_newcomer_with_nothing_waiting() -> None:
    # given a queue of four filled by one flooding key
    queue = _queue(max_size=4)
    flood = _offer(queue, "flood", n=4)
    # when another key of the same class arrives
    ticket, shed = queue.offer("interactive", STANDARD, "i0")
    # then the flood's newest request makes room for it, and it is served next
    assert ticket is not None and shed is flood[-1]
    assert _serve(queue, 2) == ["flood0", "i0"]
    # and once the queue is full again, the flood's own next request is refused (it would be served last)
    _offer(queue, "other", n=2)
    assert len(queue) == 4
    assert queue.offer("flood", STANDARD, "flood9") == (None, None)


def test_a_critical_newcomer_sheds_a_standard_request() -> None:
    queue = _queue(max_size=2)
    standard = _offer(queue, "web", STANDARD, n=2)
    ticket, shed = queue.offer("pager", CRITICAL, "p0")
    assert ticket is not None and shed is standard[-1]
    assert queue.peek() is ticket


def test_an_empty_queue_of_size_zero_refuses() -> None:
    queue = _queue(max_size=0)
    assert queue.offer("A", CRITICAL, "a") == (None, None)


def test_a_withdrawn_request_gives_its_place_back() -> None:
    # given key A's request withdrawn (its wait timed out) before service
    queue = _queue()
    (first,) = _offer(queue, "A")
    assert queue.remove(first) and not queue.remove(first)
    # when A and B each queue one
    _offer(queue, "B")
    _offer(queue, "A")
    # then A is not charged for the withdrawn one: the two go in arrival order
    assert _serve(queue, 2) == ["B0", "A0"] and len(queue) == 0


def test_ordered_lists_the_service_order_without_taking() -> None:
    queue = _queue()
    _offer(queue, "A", n=2)
    _offer(queue, "B", CRITICAL)
    assert [t.item for t in queue.ordered()] == ["B0", "A0", "A1"]
    assert len(queue) == 3


def test_memory_stays_bounded_under_churn() -> None:
    # given many requests that come and go without service (timeouts) while a few are served
    clock = FixedClock(0.0)
    queue = _queue(clock, max_size=50, promote_after_s=1.0)
    for i in range(5000):
        clock.now += 0.01
        tickets = _offer(queue, f"k{i % 37}", i % 3)
        if i % 5:
            queue.remove(tickets[0])
        elif i % 7 == 0:
            ticket = queue.peek()
            assert ticket is not None
            queue.take(ticket)
        while len(queue) > 40:
            queue.take(queue.peek())  # type: ignore[arg-type]
    # then the internal structures hold at most a bounded number of stale entries
    internals = queue._classes  # the bound is the property under test
    for cls in internals:
        assert len(cls.heap) <= 2 * cls.live + 33
        assert len(cls.arrivals) <= 2 * cls.live + 33
        assert len(cls.finish) <= 4 * cls.live + 65
    assert sum(queue.depth()) == len(queue)
