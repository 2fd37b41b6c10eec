"""core.aio: the running loop remembered per thread is always the one asyncio would return."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from core.aio import running_loop, running_loop_or_none


async def _both() -> tuple[asyncio.AbstractEventLoop, asyncio.AbstractEventLoop | None, asyncio.AbstractEventLoop]:
    return running_loop(), running_loop_or_none(), asyncio.get_running_loop()


def test_outside_a_loop_there_is_none() -> None:
    with pytest.raises(RuntimeError):
        running_loop()
    assert running_loop_or_none() is None


@pytest.mark.parametrize("runner", [asyncio.run, uvloop.run])
def test_each_new_loop_of_a_thread_is_seen_and_another_thread_has_its_own(runner: object) -> None:
    run = runner  # asyncio's loop and uvloop's (what the server runs)
    results = [run(_both()) for _ in range(3)]  # type: ignore[operator]
    results.append(run(asyncio.to_thread(asyncio.run, _both())))  # type: ignore[operator]
    for remembered, or_none, actual in results:
        assert remembered is or_none is actual
    assert len({id(loop) for loop, _, _ in results}) == len(results)  # a stopped loop is not taken for the next
    assert running_loop_or_none() is None
