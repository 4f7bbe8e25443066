"""Task helpers: cancel an owned task without swallowing our own cancellation."""

from __future__ import annotations

import asyncio


async def cancel_and_wait(task: asyncio.Task[object] | None) -> None:
    """Cancel ``task`` and wait for it to finish.

    The task's CancelledError is expected and absorbed; if the caller itself
    is being cancelled meanwhile, that cancellation propagates.
    """
    if task is None or task.done():
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
