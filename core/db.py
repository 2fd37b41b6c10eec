"""Database access from async code.

Two ways, for two kinds of caller:

- `run_db(func)`: the side work a web process does while it serves traffic (the usage writer, the registry and key
  version pollers, the shadow tallies). One named thread ("db") runs all of it, one call at a time, on a connection
  it keeps open between calls: no connection is opened per flush or poll (for SQLite, whose `CONN_MAX_AGE` is 0
  here, opening and closing them was a third of the side work's CPU), and one side thread takes the GIL from the
  event loop less often than a pool of them. The connection is dropped after a database error (the next call
  reconnects, so a database that goes away and comes back is picked up again), when a call left autocommit
  changed, and when it is older than `CONN_MAX_AGE` (on SQLite, whose `CONN_MAX_AGE` is 0, `KEPT_MAX_AGE_S`; on
  PostgreSQL a `CONN_MAX_AGE` of 0 closes it after each call, as the operator asked);
  `adb_connections_close()` closes it at the lifespan shutdown.
- `db_call(func)`: a one-off sync ORM call from a worker thread of any pool (`asyncio.to_thread(db_call(f))`): stale
  connections dropped before and after, as Django does per request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from core.aio import running_loop

T = TypeVar("T")

DB_THREAD_NAME = "db"
KEPT_MAX_AGE_S = 60.0
"""Age at which the database thread reconnects on SQLite (CONN_MAX_AGE 0 here): a bound, not a cost."""
_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()
_kept_until: dict[str, tuple[object, float]] = {}  # alias: (raw connection, when to reconnect); db thread only
logger = logging.getLogger(__name__)


def db_call(func: Callable[[], T]) -> Callable[[], T]:
    """Wrap a sync ORM call for a worker thread: drop stale connections before and after, as Django does per
    request (`asyncio.to_thread(db_call(f))`)."""

    def run() -> T:
        from django.db import close_old_connections

        close_old_connections()
        try:
            return func()
        finally:
            close_old_connections()

    return run


def _db_executor() -> ThreadPoolExecutor:
    """The process's database thread (started on first use; it lives as long as the process)."""
    global _executor
    executor = _executor
    if executor is None:
        with _executor_lock:
            if _executor is None:
                _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=DB_THREAD_NAME)
            executor = _executor
    return executor


def _kept(func: Callable[[], T]) -> Callable[[], T]:
    def run() -> T:
        try:
            return func()
        finally:
            _settle_connections()

    return run


def _settle_connections() -> None:
    """After a call in the database thread: keep its connections for the next call, unless a database error
    occurred (the connection may be broken: reconnecting on the next call is cheap, and errors are rare), a call
    left autocommit changed, or the connection is older than CONN_MAX_AGE. On SQLite, whose CONN_MAX_AGE is 0 here,
    KEPT_MAX_AGE_S stands for it (opening a file is all a connection costs, and there is no request whose end would
    close it). On PostgreSQL a CONN_MAX_AGE of 0 (`DB_CONN_MAX_AGE=0`, e.g. behind PgBouncer in transaction mode)
    means what it says: the connection is closed after each call. Django's `close_if_unusable_or_obsolete` decides.
    """
    from django.db import connections

    for conn in connections.all(initialized_only=True):
        raw = conn.connection
        if raw is None:
            continue
        try:
            if conn.errors_occurred:
                conn.close()
                continue
            if conn.settings_dict["CONN_MAX_AGE"] == 0 and conn.vendor == "sqlite":
                kept = _kept_until.get(conn.alias)
                if kept is None or kept[0] is not raw:
                    kept = _kept_until[conn.alias] = (raw, time.monotonic() + KEPT_MAX_AGE_S)
                conn.close_at = kept[1]
            conn.close_if_unusable_or_obsolete()
        except Exception:  # closing a broken connection: it is gone either way, and must not hide the call's outcome
            logger.debug("closing the database thread's connection %s failed", conn.alias, exc_info=True)


async def run_db(func: Callable[[], T]) -> T:
    """Run a sync ORM call in the database thread, on its kept connection; return its result (or raise)."""
    return await running_loop().run_in_executor(_db_executor(), _kept(func))


def _close_all() -> None:
    from django.db import connections

    connections.close_all()


def db_connections_close(timeout_s: float = 10.0) -> None:
    """Close the database thread's connections, waiting up to timeout_s for a call in progress (sync)."""
    executor = _executor
    if executor is not None:
        executor.submit(_close_all).result(timeout=timeout_s)


async def adb_connections_close(timeout_s: float = 5.0) -> None:
    """Close the database thread's connections after the calls already queued (lifespan shutdown); give up after
    timeout_s, logged, when a call hangs (an unreachable database): the rest of the shutdown must go on."""
    if _executor is not None:
        try:
            await asyncio.wait_for(run_db(_close_all), timeout_s)
        except TimeoutError:
            logger.warning(
                "database thread still busy after %.0f s: its connection is left to the process exit", timeout_s
            )


def _forget_after_fork() -> None:
    """In a forked child (a Celery prefork worker): the parent's database thread did not come along, so the next
    call starts one of its own."""
    global _executor, _executor_lock
    _executor = None
    _executor_lock = threading.Lock()  # a fork during the first call would otherwise leave it held in the child
    _kept_until.clear()


os.register_at_fork(after_in_child=_forget_after_fork)
