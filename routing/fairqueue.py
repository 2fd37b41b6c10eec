"""The admission queue's discipline: priority classes, fairness between keys within a class, promotion, shedding.

A pure data structure (no I/O, no event loop; the clock is injected) that `routing.dispatch` uses when every
usable backend of a pool is at its `max_concurrent_requests`:

- **Classes**: tickets of a lower rank (0 = critical) are always served before those of a higher rank.
- **Fairness within a class**: start-time fair queuing (SFQ, Goyal et al. 1996), a weighted fair queuing that needs
  no estimate of the service time. A ticket of key k entering class c gets the start tag
  `S = max(V_c, F_c[k])` and moves k's finish tag to `F_c[k] = S + 1 / weight_k`; the class serves the smallest
  start tag and its virtual time `V_c` follows the tags it serves. A key that queued a hundred requests has tags
  far ahead; a key arriving with one is served next: each backlogged key gets answers in proportion to its
  weight, whatever the others send. The cost of a request is 1 (its length is unknown before it runs).
- **Promotion** (against starvation): when a class has had no request served for `promote_after_s` while its oldest
  ticket has waited that long, that ticket moves up one class; at most one per class per period, so a class starved
  by a flood of a higher one still gets a request through every `promote_after_s`, and a class that is being
  served (however slowly) never dilutes the one above it.
- **Shedding**: when the queue holds `max_size` tickets, the ticket that would be served last (the lowest class,
  then the largest start tag) is shed to make room; if that is the newcomer itself, the newcomer is refused. A
  flooding key thus loses its own newest requests first, and a batch request goes before an interactive one.
  Only waiting tickets are ever shed: a request holding a backend slot (streaming or not) is not in the queue.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(eq=False, slots=True)
class Ticket(Generic[T]):
    """One waiting request: its key and weight, its current class and start tag, and the caller's payload."""

    key: str
    weight: float
    rank: int
    item: T
    enqueued: float
    since: float  # when it entered its current class (promotion counts from here)
    tag: float = 0.0
    seq: int = 0
    live: bool = True
    promoted: int = field(default=0)

    def order(self) -> tuple[int, float, int]:
        """Its place in the service order: class, then start tag, then arrival."""
        return (self.rank, self.tag, self.seq)


def _current(entry: tuple[float, int, Ticket[T]], rank: int) -> bool:
    """Whether a heap entry still stands for a waiting ticket of that class (not served, removed or promoted)."""
    ticket = entry[2]
    return ticket.live and ticket.rank == rank and ticket.tag == entry[0]


class _Class(Generic[T]):
    """One class's state: its heap of (start tag, seq, ticket), arrival order, virtual time, keys' finish tags."""

    __slots__ = ("arrivals", "finish", "heap", "live", "served_at", "vtime")

    def __init__(self) -> None:
        self.heap: list[tuple[float, int, Ticket[T]]] = []
        self.arrivals: deque[Ticket[T]] = deque()  # in `since` order, for promotion
        self.finish: dict[str, float] = {}
        self.vtime = 0.0
        self.live = 0
        self.served_at = float("-inf")  # when a ticket of this class was last served (or promoted out of it)


class FairQueue(Generic[T]):
    """Bounded multi-class fair queue; see the module docstring. Not thread-safe (one event loop owns it)."""

    def __init__(
        self,
        *,
        classes: int = 3,
        max_size: int = 100,
        promote_after_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_size = max(0, max_size)
        self.promote_after_s = promote_after_s
        self.clock = clock
        self._classes: list[_Class[T]] = [_Class() for _ in range(max(1, classes))]
        self._seq = itertools.count()
        self._live = 0
        self.shed = 0
        self.refused = 0
        self.promotions = 0

    def __len__(self) -> int:
        return self._live

    def __bool__(self) -> bool:
        return self._live > 0

    def depth(self) -> list[int]:
        """Waiting tickets per class (rank order)."""
        return [c.live for c in self._classes]

    # --- arrival --------------------------------------------------------------------------------------------------

    def offer(self, key: str, rank: int, item: T, *, weight: float = 1.0) -> tuple[Ticket[T] | None, Ticket[T] | None]:
        """Queue a request. Returns (its ticket, or None when refused; the ticket shed to make room, or None).

        A shed ticket is out of the queue when this returns: the caller tells its owner (429).
        """
        now = self.clock()
        self._promote(now)
        rank = min(max(rank, 0), len(self._classes) - 1)
        weight = max(float(weight), 1e-6)
        victim: Ticket[T] | None = None
        if self._live >= self.max_size:
            worst = self._worst()
            tag = self._start_tag(self._classes[rank], key)
            if worst is None or worst.order() <= (rank, tag, 1 << 62):
                self.refused += 1
                return None, None
            self._remove(worst)
            self.shed += 1
            victim = worst
        ticket: Ticket[T] = Ticket(key, weight, rank, item, now, now, seq=next(self._seq))
        self._enter(ticket, rank)
        return ticket, victim

    # --- service ----------------------------------------------------------------------------------------------------

    def peek(self) -> Ticket[T] | None:
        """The ticket to serve next (promotions applied), without taking it."""
        self._promote(self.clock())
        for rank, cls in enumerate(self._classes):
            heap = cls.heap
            while heap:
                if _current(heap[0], rank):
                    return heap[0][2]
                heapq.heappop(heap)
        return None

    def ordered(self) -> list[Ticket[T]]:
        """Every waiting ticket in service order (for a caller that must skip tickets it cannot serve now)."""
        self._promote(self.clock())
        tickets = [e[2] for rank, cls in enumerate(self._classes) for e in cls.heap if _current(e, rank)]
        return sorted(tickets, key=Ticket.order)

    def take(self, ticket: Ticket[T]) -> None:
        """Serve this ticket: it leaves the queue and its class's virtual time advances to its start tag."""
        if not ticket.live:
            return
        cls = self._classes[ticket.rank]
        cls.vtime = max(cls.vtime, ticket.tag)
        cls.served_at = self.clock()
        self._drop(ticket)

    def remove(self, ticket: Ticket[T]) -> bool:
        """Withdraw a ticket that will not be served (its wait timed out, its client left); False if not queued."""
        if not ticket.live:
            return False
        self._remove(ticket)
        return True

    # --- internals --------------------------------------------------------------------------------------------------

    @staticmethod
    def _start_tag(cls: _Class[T], key: str) -> float:
        return max(cls.vtime, cls.finish.get(key, 0.0))

    def _enter(self, ticket: Ticket[T], rank: int) -> None:
        cls = self._classes[rank]
        ticket.rank = rank
        ticket.tag = self._start_tag(cls, ticket.key)
        cls.finish[ticket.key] = ticket.tag + 1.0 / ticket.weight
        heapq.heappush(cls.heap, (ticket.tag, ticket.seq, ticket))
        cls.arrivals.append(ticket)
        cls.live += 1
        self._live += 1
        if len(cls.finish) > 4 * cls.live + 64:  # forget keys whose finish tag the virtual time has passed
            cls.finish = {k: f for k, f in cls.finish.items() if f > cls.vtime}

    def _drop(self, ticket: Ticket[T]) -> None:
        cls = self._classes[ticket.rank]
        ticket.live = False
        cls.live -= 1
        self._live -= 1
        if cls.heap and cls.heap[0][2] is ticket:
            heapq.heappop(cls.heap)
        # Stale entries are skipped lazily; rebuild when they outnumber the live ones (bounded memory).
        if len(cls.heap) > 2 * cls.live + 32:
            rank = ticket.rank
            cls.heap = [e for e in cls.heap if _current(e, rank)]
            heapq.heapify(cls.heap)
        if len(cls.arrivals) > 2 * cls.live + 32:
            rank = ticket.rank
            cls.arrivals = deque(t for t in cls.arrivals if t.live and t.rank == rank)

    def _remove(self, ticket: Ticket[T]) -> None:
        """Out without service: give the key back the tag it took, when it was its last."""
        cls = self._classes[ticket.rank]
        if cls.finish.get(ticket.key) == ticket.tag + 1.0 / ticket.weight:
            cls.finish[ticket.key] = ticket.tag
        self._drop(ticket)

    def _worst(self) -> Ticket[T] | None:
        """The ticket that would be served last: the lowest class's largest start tag (then the latest)."""
        for rank in range(len(self._classes) - 1, -1, -1):
            cls = self._classes[rank]
            if cls.live:
                candidates = [e for e in cls.heap if _current(e, rank)]
                if candidates:
                    return max(candidates, key=lambda e: (e[0], e[1]))[2]
        return None

    def _promote(self, now: float) -> None:
        """In each class not served for `promote_after_s`, move its oldest ticket up one class if it waited as long."""
        after = self.promote_after_s
        if after <= 0:
            return
        for rank in range(1, len(self._classes)):
            cls = self._classes[rank]
            if not cls.live or now - cls.served_at < after:
                continue
            while cls.arrivals:  # (re-read each time: dropping a ticket may rebuild the deque)
                ticket = cls.arrivals[0]
                if not ticket.live or ticket.rank != rank:
                    cls.arrivals.popleft()
                    continue
                if now - ticket.since >= after:
                    cls.arrivals.popleft()
                    self._remove(ticket)  # out of this class (its tag given back), then into the next one up
                    ticket.live = True
                    ticket.since = now
                    ticket.promoted += 1
                    self.promotions += 1
                    cls.served_at = now  # the next promotion out of this class comes a period later
                    self._enter(ticket, rank - 1)
                break
