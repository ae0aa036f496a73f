"""Which worker takes a new session: the least loaded one with room.

Load is the share of a worker's sessions taken (sessions / capacity), so a worker that
holds more sessions (a larger GPU) fills at the same pace as the others; equal shares go
to the worker with fewer sessions, then to the one that joined first.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerLoad:
    """A worker as placement sees it: `sessions` placed on it (open or about to be),
    `capacity` (sessions its engine runs at once), `order` (joined order, 0 first)."""

    name: str
    sessions: int
    capacity: int
    order: int

    @property
    def room(self) -> int:
        return max(0, self.capacity - self.sessions)


def pick_worker(workers: list[WorkerLoad]) -> str | None:
    """The name of the least-loaded worker with room, None when every worker is full (or
    there is none): the front answers `busy`."""
    free = [w for w in workers if w.room > 0]
    if not free:
        return None
    best = min(free, key=lambda w: (w.sessions / w.capacity, w.sessions, w.order))
    return best.name
