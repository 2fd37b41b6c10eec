"""Database access from async code: one wrapper for every sync ORM call made in a worker thread."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


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
