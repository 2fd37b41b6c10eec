"""In-process registry snapshot, reloaded in the background when the registry version changes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar, cast

from backends.snapshot import RegistrySnapshot
from core.aio import running_loop
from core.db import db_call, run_db

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Snapshot(Protocol):
    """What a cache holds: an immutable snapshot with the version it was built at (-1: never loaded)."""

    @property
    def version(self) -> int: ...

    def describe(self) -> str: ...


S = TypeVar("S", bound=Snapshot)

__all__ = ["RegistryCache", "Snapshot", "db_call"]


class RegistryCache(Generic[S]):
    """Holds the current snapshot (registry or keys); a per-event-loop poller reloads it when the version changes.

    The request path only reads `snapshot`; it waits for the database once, for the very first load.
    """

    def __init__(
        self,
        *,
        build: Callable[[], S],
        version: Callable[[], int],
        poll_interval_s: float,
        name: str = "registry",
        empty: S | None = None,
    ) -> None:
        self.name = name
        self._build = build  # both run in the database thread (core.db.run_db)
        self._version = version
        self._poll_interval_s = poll_interval_s
        # Without `empty`, the cache is the backend registry's (RegistryCache[RegistrySnapshot]).
        self.snapshot: S = empty if empty is not None else cast(S, RegistrySnapshot.empty())
        self.last_error: str = ""
        self.last_refresh_at: float = 0.0
        self._lock: asyncio.Lock | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def static(cls, snapshot: S) -> RegistryCache[S]:
        """A cache that never touches a database (fast tests, benchmarks of the dispatch alone)."""
        cache = cls(build=lambda: snapshot, version=lambda: snapshot.version, poll_interval_s=3600.0)
        cache.snapshot = snapshot
        cache._task = None
        cache._poll_interval_s = 0.0  # marks it static: no poller
        return cache

    @property
    def loaded(self) -> bool:
        """Whether a snapshot was ever loaded."""
        return self.snapshot.version >= 0

    async def get(self) -> S:
        """Return the current snapshot, loading it the first time and keeping the poller alive on this loop."""
        if self._poll_interval_s > 0:
            loop = running_loop()
            if self._loop is not loop or self._task is None or self._task.done():
                self._start(loop)
        if not self.loaded:
            await self.refresh()
        return self.snapshot

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = asyncio.Lock()
        self._task = loop.create_task(self._poll(), name="registry-poller")

    async def refresh(self, *, force: bool = False) -> bool:
        """Reload the snapshot if the version moved (always when forced or never loaded); return whether it did."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            try:
                if self.loaded and not force:
                    current = await run_db(self._version)
                    if current == self.snapshot.version:
                        self.last_refresh_at = time.monotonic()
                        return False
                snapshot = await run_db(self._build)
            except Exception as exc:  # the database may be down: keep serving the last snapshot
                if self.last_error != str(exc):
                    logger.warning("%s refresh failed, serving version %s: %s", self.name, self.snapshot.version, exc)
                self.last_error = str(exc)
                return False
            self.snapshot = snapshot
            self.last_error = ""
            self.last_refresh_at = time.monotonic()
            logger.info("%s version %s loaded (%s)", self.name, snapshot.version, snapshot.describe())
            return True

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval_s)
            await self.refresh()

    async def aclose(self) -> None:
        """Stop the poller."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
