"""Traffic split (canary): which model serves a request for a model whose registry entry splits its traffic.

The choice is made once, in the request's preparation (`Gateway.prepare`), on the immutable registry snapshot:
a draw in [0, 1) falls in one of the split's cumulative shares (`SplitSnap.bounds`). The draw is random per
request, or, for a sticky split, a deterministic hash of the model's name and the request's sticky key (the
`user` field or a header such as `x-session-id`), so one user or conversation always lands on the same model
while the shares stay as they are. No database, no lock: a dict lookup, a draw and a bisection.
"""

from __future__ import annotations

import functools
import hashlib
import random
from bisect import bisect_right
from collections.abc import Callable
from typing import TYPE_CHECKING

from backends.snapshot import ModelSnap, SplitSnap

if TYPE_CHECKING:
    from routing.dispatch import RequestContext

_SCALE = float(1 << 64)


def sticky_point(model: str, key: str) -> float:
    """A point in [0, 1) that depends only on the model's name and the key (stable across processes and restarts)."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8, salt=_salt(model)).digest()
    return int.from_bytes(digest, "big") / _SCALE


@functools.lru_cache(maxsize=1024)
def _salt(model: str) -> bytes:
    """blake2b's salt is at most 16 bytes: a short digest of the model's name (two splits draw independently)."""
    return hashlib.blake2b(model.encode(), digest_size=16).digest()


def split_choose(
    split: SplitSnap, context: RequestContext, rand: Callable[[], float] = random.random
) -> tuple[ModelSnap, bool]:
    """The model that serves this request, and whether the choice was sticky (a key was found)."""
    key = context.affinity_key(split.sticky_key) if split.sticky_key else None
    point = sticky_point(split.model, key) if key else rand()
    index = bisect_right(split.bounds, point)
    targets = split.targets
    return targets[index if index < len(targets) else -1], key is not None and key != ""
