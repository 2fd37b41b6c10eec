"""Random ids for requests, without a system call per id."""

from __future__ import annotations

import os
import threading

_BLOCK = 4096  # bytes of OS randomness read at a time: 256 ids


class _Pool(threading.local):
    buf = b""
    pos = _BLOCK


_pool = _Pool()


def random_id() -> str:
    """32 lowercase hex digits (128 bits) from the OS CSPRNG (`os.urandom`), as unguessable as
    `os.urandom(16).hex()`, but read 4 KiB at a time: one `getrandom` system call per 256 ids instead of one per id.
    Per thread, and forgotten by a forked child (which must not repeat its parent's ids)."""
    pool = _pool
    pos = pool.pos
    if pos >= _BLOCK:
        pool.buf = os.urandom(_BLOCK)
        pos = 0
    pool.pos = pos + 16
    return pool.buf[pos : pos + 16].hex()


def _forget() -> None:
    _pool.buf, _pool.pos = b"", _BLOCK


os.register_at_fork(after_in_child=_forget)
