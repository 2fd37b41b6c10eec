"""A vLLM-like automatic prefix cache for the mock: LRU over chained hashes of full token blocks.

vLLM (v1) splits a prompt into blocks of ``block_size`` tokens and hashes each FULL block together
with the hash of the block before it, so a block only matches after the very same prefix. On
admission it counts how many leading blocks are already cached (never the whole prompt: the last
token is always recomputed to get logits, so at most ``(n - 1) // block_size`` blocks hit), and
once the request has run, its blocks stay cached until evicted, least recently used first. When a
request finishes vLLM frees its blocks tail first, so a prompt's first blocks (the part most
likely shared) are evicted last; `PrefixCache` touches a prompt's blocks in that order too.

Observed on the real vLLM 0.32 CPU build (block_size 128 there; 16 on GPUs): a 256-token chat
prompt sent twice gave ``vllm:prefix_cache_queries_total`` +256 both times and
``vllm:prefix_cache_hits_total`` +0 then +128 (not 256: the last-token rule above).

Tokens are any hashable values (the mock tokenizer's strings, or token ids); a block's key is
Python's hash of ``(parent_hash, *block_tokens)``, computed per block (C-level tuple hashing, no
per-token Python loop). Memory is bounded by ``capacity`` ints.

When ``journal`` is a list, each change is appended to it, in order, for the mock's KV-cache events
(``kv_events.py``): ``("stored", parent hash or None, [new block hashes], index of the first one)`` for
each run of newly cached blocks, ``("removed", [hashes])`` for evictions, ``("cleared",)``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any

__all__ = ["MAX_PREFIX_CACHE_BLOCKS", "PrefixCache"]

MAX_PREFIX_CACHE_BLOCKS = 1 << 20
"""Upper bound of the capacity, whatever the configuration asks (about 100 MB of hashes)."""

_ROOT_HASH = 0x5EED_CAFE  # the parent hash of a prompt's first block


class PrefixCache:
    """LRU set of chained block hashes; see the module docstring."""

    __slots__ = ("_blocks", "block_size", "capacity", "journal")

    def __init__(self, capacity: int, block_size: int = 16) -> None:
        """Create an empty cache holding at most capacity blocks of block_size tokens (0: disabled)."""
        self._blocks: OrderedDict[int, None] = OrderedDict()
        self.journal: list[tuple[Any, ...]] | None = None
        self.capacity = 0
        self.block_size = 1
        self.configure(capacity, block_size)

    def configure(self, capacity: int, block_size: int) -> None:
        """Apply a (possibly changed) size; a new block size empties the cache, a smaller capacity evicts."""
        block_size = max(1, int(block_size))
        if block_size != self.block_size:
            self.clear()
            self.block_size = block_size
        self.capacity = min(max(0, int(capacity)), MAX_PREFIX_CACHE_BLOCKS)
        self._evict()

    def __len__(self) -> int:
        """Return the number of cached blocks."""
        return len(self._blocks)

    def clear(self) -> None:
        """Forget every cached block."""
        self._blocks.clear()
        if self.journal is not None:
            self.journal.append(("cleared",))

    def block_hashes(self, tokens: Sequence[Hashable]) -> list[int]:
        """Return the chained hashes of the full blocks of tokens (a partial last block has none)."""
        size = self.block_size
        hashes: list[int] = []
        parent = _ROOT_HASH
        for start in range(0, len(tokens) - size + 1, size):
            parent = hash((parent, *tokens[start : start + size]))
            hashes.append(parent)
        return hashes

    def match_and_insert(self, tokens: Sequence[Hashable]) -> int:
        """Count the prompt's cached prefix tokens (hit tokens), then cache its full blocks.

        Returns 0 and caches nothing when the cache is disabled (capacity 0).
        """
        if self.capacity <= 0:
            return 0
        hashes = self.block_hashes(tokens)
        if not hashes:
            return 0
        blocks = self._blocks
        hit = 0
        for block_hash in hashes[: (len(tokens) - 1) // self.block_size]:
            if block_hash not in blocks:
                break
            hit += 1
        if self.journal is not None:
            self._journal_stored(hashes)
        for block_hash in reversed(hashes):  # tail first: the first blocks end up most recently used
            if block_hash in blocks:
                blocks.move_to_end(block_hash)
            else:
                blocks[block_hash] = None
        self._evict()
        return hit * self.block_size

    def _journal_stored(self, hashes: list[int]) -> None:
        """Note each run of blocks about to be newly cached, with the block before it (its parent)."""
        assert self.journal is not None
        blocks = self._blocks
        start = None
        for i, block_hash in enumerate([*hashes, None]):
            new = block_hash is not None and block_hash not in blocks
            if new and start is None:
                start = i
            elif not new and start is not None:
                self.journal.append(("stored", hashes[start - 1] if start else None, hashes[start:i], start))
                start = None

    def _evict(self) -> None:
        """Drop least recently used blocks until the cache fits its capacity."""
        blocks = self._blocks
        excess = len(blocks) - self.capacity
        evicted = [blocks.popitem(last=False)[0] for _ in range(max(0, excess))]
        if evicted and self.journal is not None:
            self.journal.append(("removed", evicted))
