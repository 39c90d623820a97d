"""What a request's stream has yet to send: a bounded buffer between the dispatcher, storage and the stream."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from services.generator.messages import Progress, QueuePosition, StreamEvent


class StreamEvents:
    """Bounded whether or not the client reads.

    Progress is a notification: beyond `max_progress` unsent ones the oldest are dropped, and only
    the latest queue position is kept. Stored images (one per image) and the failure are kept.
    """

    def __init__(self, max_progress: int = 32):
        self.max_progress = max_progress
        self._items: deque[StreamEvent] = deque()
        self._progress = 0
        self._ready = asyncio.Event()

    def put_nowait(self, item: StreamEvent) -> None:
        if isinstance(item, QueuePosition):
            self._drop(lambda x: isinstance(x, QueuePosition))
        elif isinstance(item, Progress):
            if self._progress >= self.max_progress:
                self._drop(lambda x: isinstance(x, Progress), first_only=True)
            self._progress += 1
        self._items.append(item)
        self._ready.set()

    def _drop(self, match: Callable[[StreamEvent], bool], first_only: bool = False) -> None:
        for item in list(self._items):
            if match(item):
                self._items.remove(item)
                self._progress -= isinstance(item, Progress)
                if first_only:
                    return

    async def get(self) -> StreamEvent:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        self._progress -= isinstance(item, Progress)
        return item

    def __len__(self) -> int:
        return len(self._items)
