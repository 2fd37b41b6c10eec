"""The running event loop, for code that looks it up on every request.

On Python 3.11, `asyncio.get_running_loop()`, `asyncio.current_task()` without a loop and the private
`asyncio.events._get_running_loop()` each make a `getpid()` system call (to tell a forked child from its parent;
3.12 dropped the check): 4.5 of them per proxied request, measured with `perf trace` (docs/performance.md). These
helpers remember the loop per thread instead. A loop runs in one thread, one at a time, and nowhere else, so the
loop remembered for this thread is the running one exactly when it is running (a thread whose loop stopped,
e.g. after an `asyncio.run` in a test, looks it up again); a forked child forgets what its parent remembered.
"""

from __future__ import annotations

import asyncio
import os
from threading import get_ident

_loops: dict[int, asyncio.AbstractEventLoop] = {}


def running_loop() -> asyncio.AbstractEventLoop:
    """`asyncio.get_running_loop()`, without its system call on a hit; RuntimeError outside a running loop."""
    loop = _loops.get(get_ident())
    if loop is not None and loop.is_running():
        return loop
    loop = asyncio.get_running_loop()
    _loops[get_ident()] = loop
    return loop


def running_loop_or_none() -> asyncio.AbstractEventLoop | None:
    """The running loop of this thread, or None outside one."""
    loop = _loops.get(get_ident())
    if loop is not None and loop.is_running():
        return loop
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    _loops[get_ident()] = loop
    return loop


os.register_at_fork(after_in_child=_loops.clear)
