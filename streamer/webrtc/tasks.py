"""The background asyncio tasks of one owner (a signalling session, a peer session, a
server): started into the owner's set, forgotten when done, cancelled together on close."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


def spawn(tasks: set[asyncio.Task[Any]], coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    """Run `coro` as a task held in `tasks` (so it is not garbage-collected mid-way) until
    it is done."""
    task = asyncio.ensure_future(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    return task


def cancel_others(tasks: set[asyncio.Task[Any]]) -> None:
    """Cancel every task in `tasks` but the calling one (a close run from one of the
    owner's own tasks must not cancel itself)."""
    current = asyncio.current_task()
    for task in list(tasks):
        if task is not current:
            task.cancel()
