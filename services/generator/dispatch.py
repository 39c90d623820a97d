"""The dispatcher: every request's images, spread over the ready workers fairly, retried when a worker
dies, cancelled on request. A request inside the parent is a `Ticket`.

Spread first, batch second: a request never takes more than its share of the devices it is not already
running on, and round robin between requests means a big request never starves a later small one. The
worker processes themselves are the pool's (workers.py); the stream's buffer is stream_events.py.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.common.errors import (
    AlreadyExists,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from services.generator import metrics
from services.generator.messages import (
    Cancel,
    ErrorKind,
    Failed,
    ImageResult,
    Job,
    JobDone,
    JobError,
    Progress,
    QueuePosition,
    RenderSettings,
)
from services.generator.stream_events import StreamEvents
from services.generator.workers import WorkerHandle, WorkerPool

log = logging.getLogger(__name__)


@dataclass
class Unit:
    """One image of a request. Its seed is fixed at acceptance, whatever device renders it."""

    index: int
    seed: int
    attempts: int = 0
    lost_on: str = ""  # the device whose worker died or hung rendering it: its retry goes elsewhere if it can


def may_run(unit: Unit, device: str, live_devices: set[str]) -> bool:
    """A lost image is retried on another device while one lives (a respawned worker is back in about a
    second, so "retry" alone would often hand a poison image to the device it just killed)."""
    return unit.lost_on != device or live_devices <= {device}


@dataclass
class Ticket:
    """A request inside the dispatcher. Events for its stream go to `events`."""

    key: str  # "request_id~n": tags its jobs, so a reused request id never mixes with a finished ticket
    request_id: str
    settings: RenderSettings
    metadata: dict[str, Any]
    preview_every: int
    pending: deque[Unit]
    total: int
    # Called with each image as soon as a worker sends it: storing never waits for the stream.
    on_image: Callable[[ImageResult], None] = lambda _: None
    events: StreamEvents = field(default_factory=StreamEvents)
    inflight: dict[int, tuple[Job, WorkerHandle]] = field(default_factory=dict)
    units: dict[int, Unit] = field(default_factory=dict)
    delivered: set[int] = field(default_factory=set)
    accepted_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    compute_seconds: float = 0.0
    position: int = -1
    closed: bool = False


_ERRORS: dict[ErrorKind, Callable[[JobError], ServiceError]] = {
    "invalid_argument": lambda e: InvalidArgument(e.field or "request", e.message),
    "not_found": lambda e: NotFound("file", e.message),
    "resource_exhausted": lambda e: ResourceExhausted(e.message, retry_after_s=5.0),
    "internal": lambda e: Internal(f"generation failed: {e.message}"),
}


class Dispatcher:
    """Queue, fairness, shares, batching and requeue over a WorkerPool (it listens to the pool)."""

    def __init__(
        self,
        pool: WorkerPool,
        max_queue: int = 64,
        max_batch: int = 1,
        batch_pixels: int = 0,
        max_progress: int = 32,
    ):
        self.pool = pool
        pool.listener = self
        self.max_queue = max_queue
        self.max_batch = max(1, max_batch)
        self.batch_pixels = batch_pixels
        self.max_progress = max_progress
        self.tickets: OrderedDict[str, Ticket] = OrderedDict()
        self.accepting = True
        self._rr: deque[str] = deque()
        self._job_ids = itertools.count(1)
        self._keys = itertools.count(1)
        self._image_seconds = 1.0  # running estimate, for retry hints

    # Requests

    @property
    def queued_images(self) -> int:
        return sum(len(t.pending) for t in self.tickets.values())

    def submit(
        self,
        request_id: str,
        settings: RenderSettings,
        seeds: list[int],
        metadata: dict[str, Any],
        preview_every: int = 0,
        on_image: Callable[[ImageResult], None] = lambda _: None,
    ) -> Ticket:
        if not self.accepting:
            raise Unavailable("server is shutting down")
        if not self.pool.live:
            raise Unavailable("no generator worker can run; see the server log")
        if any(t.request_id == request_id for t in self.tickets.values()):
            raise AlreadyExists(
                f"request_id {request_id!r} is already running; request ids are single-use", "REQUEST_RUNNING"
            )
        queued = self.queued_images
        if queued + len(seeds) > self.max_queue:
            workers = max(1, len(self.pool.ready))
            retry = max(1.0, self._image_seconds * (queued + len(seeds)) / workers)
            raise ResourceExhausted(
                f"queue full ({queued} images waiting, limit {self.max_queue})", retry_after_s=retry
            )
        units = [Unit(i, s) for i, s in enumerate(seeds)]
        ticket = Ticket(
            key=f"{request_id}~{next(self._keys)}",
            request_id=request_id,
            settings=settings,
            metadata=metadata,
            preview_every=preview_every,
            pending=deque(units),
            total=len(units),
            units={u.index: u for u in units},
            on_image=on_image,
            events=StreamEvents(self.max_progress),
        )
        self.tickets[ticket.key] = ticket
        self._rr.append(ticket.key)
        self._dispatch()
        return ticket

    def _positions(self) -> dict[str, int]:
        # Round-robin order: a ticket's position is how many dispatches come before its next one.
        waiting = [k for k in self._rr if k in self.tickets and self.tickets[k].pending]
        return {key: i for i, key in enumerate(waiting)}

    def position_of(self, ticket: Ticket) -> int:
        """Requests that get a device before this one's next image (0: next to be served)."""
        return self._positions().get(ticket.key, 0)

    def cancel(self, ticket: Ticket) -> None:
        """Drop queued images; running ones stop at their next denoising step."""
        if ticket.closed:
            return
        ticket.closed = True
        ticket.pending.clear()
        for _, w in ticket.inflight.values():
            self.pool.send(w, Cancel(ticket.key))
        self._forget_if_idle(ticket)
        self._dispatch()

    def finish(self, ticket: Ticket) -> None:
        """The stream is done with this ticket (all delivered, failed or cancelled)."""
        self.cancel(ticket)

    def _fail(self, ticket: Ticket, error: ServiceError) -> None:
        if not ticket.closed:
            ticket.events.put_nowait(Failed(error))
        self.cancel(ticket)

    def _forget_if_idle(self, ticket: Ticket) -> None:
        if ticket.closed and not ticket.inflight:
            self.tickets.pop(ticket.key, None)
            if ticket.key in self._rr:
                self._rr.remove(ticket.key)
        metrics.QUEUE_DEPTH.set(self.queued_images)

    async def drain(self, grace_s: float) -> None:
        """Stop accepting; let running requests finish, then cancel the rest: all within `grace_s`."""
        self.accepting = False
        self.pool.stop_respawning()
        deadline = time.monotonic() + grace_s
        while self.tickets and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for key in list(self.tickets):
            self._fail(self.tickets[key], Unavailable("server shut down before the request finished"))
        await self.pool.stop(timeout=max(1.0, deadline - time.monotonic()))

    # Dispatch

    def _next_ticket(self) -> Ticket | None:
        for _ in range(len(self._rr)):
            key = self._rr.popleft()
            ticket = self.tickets.get(key)
            if ticket is None or not ticket.pending:
                continue
            self._rr.append(key)  # round robin: a big request never starves a later small one
            return ticket
        return None

    def batch_size(self, settings: RenderSettings) -> int:
        if not self.batch_pixels:
            return self.max_batch
        return max(1, min(self.max_batch, self.batch_pixels // (settings.width * settings.height)))

    def _dispatch(self) -> None:
        ready = self.pool.ready
        idle = self.pool.idle
        live = {w.device for w in self.pool.live}
        passed_over = 0  # tickets in a row that no idle worker may take: after a full round, stop
        while idle and passed_over <= len(self._rr):
            ticket = self._next_ticket()
            if ticket is None:
                break
            w = next((w for w in idle if may_run(ticket.pending[0], w.device, live)), None)
            if w is None:
                passed_over += 1
                continue
            passed_over = 0
            # Spread first, batch second: never take more than this request's share of the devices
            # it is not already running on.
            free_for_it = max(1, len(ready) - len(ticket.inflight))
            take = min(self.batch_size(ticket.settings), math.ceil(len(ticket.pending) / free_for_it))
            units: list[Unit] = []
            while ticket.pending and len(units) < take and may_run(ticket.pending[0], w.device, live):
                units.append(ticket.pending.popleft())
            job = Job(
                ticket_key=ticket.key,
                job_id=next(self._job_ids),
                settings=ticket.settings,
                indices=tuple(u.index for u in units),
                seeds=tuple(u.seed for u in units),
                preview_every=ticket.preview_every,
                metadata=ticket.metadata,
            )
            idle.remove(w)
            ticket.inflight[job.job_id] = (job, w)
            if ticket.started_at is None:
                ticket.started_at = time.perf_counter()
            self.pool.assign(w, job)
        self._announce_positions()
        metrics.QUEUE_DEPTH.set(self.queued_images)

    def _announce_positions(self) -> None:
        positions = self._positions()
        for key, position in positions.items():
            t = self.tickets[key]
            if t.started_at is None and t.position != position:
                t.position = position
                t.events.put_nowait(QueuePosition(position))

    # What the pool reports (PoolListener)

    def on_capacity(self) -> None:
        self._dispatch()

    def on_job_message(self, worker: WorkerHandle, msg: Progress | ImageResult | JobError) -> None:
        ticket = self.tickets.get(msg.ticket_key)
        if ticket is None:
            return
        if isinstance(msg, ImageResult):
            # Stored even when the request was cancelled as its last step ran (a client gone, a server
            # stopping): the render is done, and a retry under the same id then finds it (ALREADY_EXISTS)
            # instead of rendering it again.
            if msg.index not in ticket.delivered:
                ticket.delivered.add(msg.index)
                ticket.on_image(msg)
                metrics.IMAGES.labels(worker.device).inc()
        elif ticket.closed:
            return
        elif isinstance(msg, Progress):
            ticket.events.put_nowait(msg)
        else:
            self._fail(ticket, _ERRORS[msg.kind](msg))

    def on_job_done(self, worker: WorkerHandle, msg: JobDone) -> None:
        ticket = self.tickets.get(msg.ticket_key)
        if ticket is not None:
            job, _ = ticket.inflight.pop(msg.job_id, (None, None))
            ticket.compute_seconds += msg.compute_seconds
            if job is not None and not msg.cancelled and job.indices:
                per_image = msg.compute_seconds / len(job.indices)
                self._image_seconds = 0.8 * self._image_seconds + 0.2 * per_image
            self._forget_if_idle(ticket)
        self._dispatch()

    def on_job_lost(self, worker: WorkerHandle, job: Job) -> None:
        ticket = self.tickets.get(job.ticket_key)
        if ticket is None:
            return
        ticket.inflight.pop(job.job_id, None)
        if ticket.closed:
            self._forget_if_idle(ticket)
            return
        lost = [ticket.units[i] for i in job.indices if i not in ticket.delivered]
        for unit in lost:
            unit.attempts += 1
            unit.lost_on = worker.device
        if any(u.attempts > 1 for u in lost):
            how = "hung" if worker.hung else "died"
            self._fail(
                ticket, Unavailable(f"a worker {how} twice while rendering this request (last: {worker.device})")
            )
            return
        log.warning("worker %s lost images %s; retrying them", worker.device, [u.index for u in lost])
        ticket.pending.extendleft(reversed(lost))
        if ticket.key not in self._rr:
            self._rr.appendleft(ticket.key)

    def on_unservable(self) -> None:
        for ticket in list(self.tickets.values()):
            self._fail(ticket, Unavailable("no generator worker can run; see the server log"))
