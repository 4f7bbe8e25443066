"""Task helpers: stop owned tasks for sure, without swallowing our own cancellation.

Python 3.11's ``asyncio.wait_for`` (pymodbus uses it) returns the result
instead of raising when a cancellation arrives in the same moment as what it
waits for completes: the cancelled task carries on. A task still running
``insist_after_s`` after it was cancelled is therefore cancelled again, and
again, until it stops. The first cancellation gets that long to run its
cleanup undisturbed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from .logs import fields

log = logging.getLogger(__name__)

INSIST_AFTER_S = 1.0


async def cancel_all(tasks: Iterable[asyncio.Task[object]], *, insist_after_s: float = INSIST_AFTER_S) -> None:
    """Cancel ``tasks`` and wait until every one has finished.

    Their outcomes (a failure, a result) are left for their owner, such as
    the TaskGroup that made them; if the caller itself is cancelled
    meanwhile, that cancellation propagates.
    """
    pending = {task for task in tasks if not task.done()}
    for task in pending:
        task.cancel()
    while pending:
        _, pending = await asyncio.wait(pending, timeout=insist_after_s)
        for task in pending:
            log.warning(
                "task carried on after it was cancelled; cancelling it again", extra=fields(task=task.get_name())
            )
            task.cancel()


async def cancel_and_wait(task: asyncio.Task[object] | None, *, insist_after_s: float = INSIST_AFTER_S) -> None:
    """Cancel ``task`` and wait for it to finish.

    The task's CancelledError is expected and absorbed; an error it raised
    while stopping is raised here; if the caller itself is being cancelled
    meanwhile, that cancellation propagates.
    """
    if task is None or task.done():
        return
    await cancel_all([task], insist_after_s=insist_after_s)
    if not task.cancelled():
        task.result()
