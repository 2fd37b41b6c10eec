"""core.ids.random_id: 128 random bits as 32 hex digits, never repeated, across block refills, threads and forks."""

from __future__ import annotations

import os
import re
import threading
from unittest import mock

from core import ids
from core.ids import random_id


def test_ids_are_32_hex_digits_and_distinct_across_refills() -> None:
    # given more ids than one block of OS randomness holds
    made = [random_id() for _ in range(3 * 256 + 7)]
    # then each is 128 bits in lowercase hex, and none repeats
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in made)
    assert len(set(made)) == len(made)


def test_the_os_is_asked_once_per_256_ids() -> None:
    ids._forget()
    with mock.patch.object(ids.os, "urandom", wraps=os.urandom) as urandom:
        for _ in range(512):
            random_id()
    assert urandom.call_count == 2


def test_threads_draw_from_their_own_blocks() -> None:
    made: list[str] = []
    lock = threading.Lock()

    def draw() -> None:
        mine = [random_id() for _ in range(300)]
        with lock:
            made.extend(mine)

    threads = [threading.Thread(target=draw) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(made)) == len(made) == 1200


def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    random_id()  # a block is buffered
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id, to the parent
        os.close(read)
        os.write(write, random_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert re.fullmatch(r"[0-9a-f]{32}", child) and child != random_id()
