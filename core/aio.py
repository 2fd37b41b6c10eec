"""The running event loop, for code that looks it up on every request.

On Python 3.11, `asyncio.get_running_loop()`, `asyncio.current_task()` without a loop and the private
`asyncio.events._get_running_loop()` each make a `getpid()` system call (to tell a forked child from its parent;
3.12 dropped the check): 4.5 of them per proxied request, measured with `perf trace` (docs/performance.md). These
helpers remember the loop per thread instead. A loop runs in one thread, one at a time, and nowhere else, so the
loop remembered for this thread is the running one exactly when it is running (a thread whose loop stopped,
e.g. after an `asyncio.run` in a test, looks it up again); a forked child forgets what its parent remembered.
Remembered in a `threading.local`: a thread's entry goes with the thread (no entry outlives it, and a new thread
that gets a dead one's id starts empty). Not supported: a loop stopped without being closed in one thread and run
again in another while the first thread runs a loop of its own (nothing here does that).
"""

from __future__ import annotations

import asyncio
import os
import threading

_local = threading.local()


def running_loop() -> asyncio.AbstractEventLoop:
    """`asyncio.get_running_loop()`, without its system call on a hit; RuntimeError outside a running loop."""
    loop: asyncio.AbstractEventLoop | None = getattr(_local, "loop", None)
    if loop is not None and loop.is_running():
        return loop
    loop = _local.loop = asyncio.get_running_loop()
    return loop


def running_loop_or_none() -> asyncio.AbstractEventLoop | None:
    """The running loop of this thread, or None outside one."""
    loop: asyncio.AbstractEventLoop | None = getattr(_local, "loop", None)
    if loop is not None and loop.is_running():
        return loop
    try:
        loop = _local.loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    return loop


def _forget_after_fork() -> None:
    global _local
    _local = threading.local()


os.register_at_fork(after_in_child=_forget_after_fork)
