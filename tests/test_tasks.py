"""Stopping owned tasks: a task that lets one cancellation slip through still stops.

Python 3.11's ``asyncio.wait_for`` (and libraries built on it, pymodbus among
them) returns the result instead of raising when a cancellation arrives in the
same moment as what it waits for completes. A poll loop doing that carries on
and an agent stopping waited for it for ever: SIGTERM did nothing.
"""

from __future__ import annotations

import asyncio

import pytest

from factory_edge.tasks import cancel_all, cancel_and_wait


async def loop_that_swallows_one_cancellation(swallowed: list[int]) -> None:
    while True:
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            if not swallowed:
                swallowed.append(1)  # as wait_for does when its future completed at the same moment
                continue
            raise


async def test_a_task_that_swallows_a_cancellation_is_cancelled_again_until_it_stops() -> None:
    swallowed: list[int] = []
    task = asyncio.create_task(loop_that_swallows_one_cancellation(swallowed))
    await asyncio.sleep(0.05)
    async with asyncio.timeout(5):
        await cancel_and_wait(task, insist_after_s=0.1)
    assert swallowed == [1] and task.cancelled()


async def test_cancel_all_stops_every_task_and_leaves_their_failures_to_their_owner() -> None:
    async def fails() -> None:
        raise ValueError("boom")

    swallowed: list[int] = []
    stubborn = asyncio.create_task(loop_that_swallows_one_cancellation(swallowed))
    failed = asyncio.create_task(fails())
    await asyncio.sleep(0.05)
    async with asyncio.timeout(5):
        await cancel_all([stubborn, failed], insist_after_s=0.1)
    assert stubborn.cancelled() and isinstance(failed.exception(), ValueError)


async def test_a_task_failing_while_cancelled_raises_its_error_to_the_caller() -> None:
    async def fails_on_cancel() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            raise ValueError("while closing")

    task = asyncio.create_task(fails_on_cancel())
    await asyncio.sleep(0.01)
    with pytest.raises(ValueError, match="while closing"):
        await cancel_and_wait(task)


async def test_the_callers_own_cancellation_propagates() -> None:
    async def slow_to_stop() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            await asyncio.sleep(0.3)  # cleanup under way when the caller is cancelled

    task = asyncio.create_task(slow_to_stop())
    await asyncio.sleep(0.01)
    stopper = asyncio.create_task(cancel_and_wait(task))
    await asyncio.sleep(0.05)
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper
    await asyncio.sleep(0.4)
    assert task.done()
