"""Parent-side scheduling: spawn one worker per device, spread every request's images over
them fairly, retry images lost to a dead worker, and cancel on request.

Runs on the server's event loop; worker pipes and process sentinels are watched with
`loop.add_reader`, so no threads and no polling.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import multiprocessing as mp
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from services.common.errors import (
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
    Fatal,
    ImageResult,
    Job,
    JobDone,
    JobError,
    Progress,
    Ready,
    RenderSettings,
    Shutdown,
)
from services.generator.worker import WorkerConfig, worker_main

log = logging.getLogger(__name__)

MAX_RESPAWNS = 5


@dataclass
class Unit:
    """One image of a request. Its seed is fixed at acceptance, whatever device renders it."""

    index: int
    seed: int
    attempts: int = 0


@dataclass(frozen=True)
class QueuePosition:
    position: int


@dataclass(frozen=True)
class Failed:
    error: ServiceError


@dataclass
class Ticket:
    """A request inside the scheduler. Events for its stream go to `events`."""

    key: str
    request_id: str
    settings: RenderSettings
    metadata: dict[str, Any]
    preview_every: int
    pending: deque[Unit]
    total: int
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    inflight: dict[int, tuple[Job, WorkerSlot]] = field(default_factory=dict)
    units: dict[int, Unit] = field(default_factory=dict)
    delivered: set[int] = field(default_factory=set)
    accepted_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    compute_seconds: float = 0.0
    position: int = -1
    closed: bool = False


@dataclass
class WorkerSlot:
    slot: int
    config: WorkerConfig
    process: Any = None
    conn: Any = None
    state: str = "starting"  # starting -> ready -> dead
    job: Job | None = None
    job_started: float = 0.0
    respawns: int = 0
    ready_future: asyncio.Future | None = None

    @property
    def device(self) -> str:
        return self.config.device


_ERRORS: dict[str, Callable[[JobError], ServiceError]] = {
    "invalid_argument": lambda e: InvalidArgument(e.field or "request", e.message.split(": ", 1)[-1]),
    "not_found": lambda e: NotFound("file", e.message),
    "resource_exhausted": lambda e: ResourceExhausted(e.message, retry_after_s=5.0),
    "internal": lambda e: Internal(f"generation failed: {e.message}"),
}


class Scheduler:
    def __init__(
        self,
        configs: list[WorkerConfig],
        max_queue: int = 64,
        max_batch: int = 1,
        batch_pixels: int = 0,
        on_health: Callable[[bool], Awaitable[None]] | None = None,
        start_timeout_s: float = 900.0,
    ):
        if not configs:
            raise ValueError("no devices configured")
        self.workers = [WorkerSlot(i, c) for i, c in enumerate(configs)]
        self.max_queue = max_queue
        self.max_batch = max(1, max_batch)
        self.batch_pixels = batch_pixels
        self.on_health = on_health
        self.start_timeout_s = start_timeout_s
        self.tickets: OrderedDict[str, Ticket] = OrderedDict()
        self._rr: deque[str] = deque()
        self._job_ids = itertools.count(1)
        self._keys = itertools.count(1)
        self._ctx = mp.get_context("spawn")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._serving = False
        self._started = False
        self.accepting = True
        self._stopping = False
        self._image_seconds = 1.0  # running estimate, for retry hints
        self.model_info: Ready | None = None

    # Lifecycle

    async def start(self) -> None:
        """Spawn every worker and wait until each has loaded and warmed up."""
        self.spawn_all()
        await self.wait_ready()

    def spawn_all(self) -> None:
        """Start the worker processes (spawned: no fork after gRPC or CUDA exist)."""
        self._loop = asyncio.get_running_loop()
        for w in self.workers:
            self._spawn(w)

    async def wait_ready(self) -> None:
        try:
            await asyncio.wait_for(
                asyncio.gather(*(w.ready_future for w in self.workers)), timeout=self.start_timeout_s
            )
        except BaseException:
            await self.stop()
            raise
        self._started = True
        await self._update_health()

    def _spawn(self, w: WorkerSlot) -> None:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        w.process = self._ctx.Process(
            target=worker_main, args=(w.config, child_conn), name=f"worker-{w.device}", daemon=True
        )
        w.process.start()
        child_conn.close()
        w.conn, w.state, w.job = parent_conn, "starting", None
        w.ready_future = self._loop.create_future()
        self._loop.add_reader(parent_conn.fileno(), self._on_readable, w)
        self._loop.add_reader(w.process.sentinel, self._on_exit, w, w.process)

    async def stop(self, timeout: float = 10.0) -> None:
        self.accepting = False  # also stops respawns
        self._stopping = True
        for w in self.workers:
            if w.state != "dead" and w.conn is not None:
                try:
                    w.conn.send(Shutdown())
                except (OSError, ValueError):
                    pass
        deadline = time.monotonic() + timeout
        for w in self.workers:
            if w.process is None:
                continue
            while w.process.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if w.process.is_alive():
                w.process.terminate()
            self._detach(w)
            w.state = "dead"
        self._serving = False

    async def drain(self, grace_s: float) -> None:
        """Stop accepting; let running requests finish for up to `grace_s`, then cancel the rest."""
        self.accepting = False
        deadline = time.monotonic() + grace_s
        while self.tickets and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for key in list(self.tickets):
            self._fail(self.tickets[key], Unavailable("server shut down before the request finished"))
        await self.stop()

    # Requests

    @property
    def queued_images(self) -> int:
        return sum(len(t.pending) for t in self.tickets.values())

    @property
    def ready_workers(self) -> list[WorkerSlot]:
        return [w for w in self.workers if w.state == "ready"]

    def submit(
        self,
        request_id: str,
        settings: RenderSettings,
        seeds: list[int],
        metadata: dict[str, Any],
        preview_every: int = 0,
    ) -> Ticket:
        if not self.accepting:
            raise Unavailable("server is shutting down")
        if not self.ready_workers and not any(w.state == "starting" for w in self.workers):
            raise Unavailable("no generator worker is alive")
        if any(t.request_id == request_id for t in self.tickets.values()):
            raise InvalidArgument("request_id", f"{request_id!r} is already running")
        queued = self.queued_images
        if queued + len(seeds) > self.max_queue:
            workers = max(1, len(self.ready_workers))
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
            self._send(w, Cancel(ticket.key))
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
        ready = self.ready_workers
        idle = [w for w in ready if w.job is None]
        while idle:
            ticket = self._next_ticket()
            if ticket is None:
                break
            # Spread first, batch second: never take more than this request's share of the devices
            # it is not already running on.
            free_for_it = max(1, len(ready) - len(ticket.inflight))
            take = min(self.batch_size(ticket.settings), math.ceil(len(ticket.pending) / free_for_it))
            units = [ticket.pending.popleft() for _ in range(min(take, len(ticket.pending)))]
            job = Job(
                request_id=ticket.key,
                job_id=next(self._job_ids),
                settings=ticket.settings,
                indices=tuple(u.index for u in units),
                seeds=tuple(u.seed for u in units),
                preview_every=ticket.preview_every,
                metadata=ticket.metadata,
            )
            w = idle.pop(0)
            w.job, w.job_started = job, time.perf_counter()
            ticket.inflight[job.job_id] = (job, w)
            if ticket.started_at is None:
                ticket.started_at = time.perf_counter()
            self._send(w, job)
        self._announce_positions()
        metrics.QUEUE_DEPTH.set(self.queued_images)

    def _announce_positions(self) -> None:
        positions = self._positions()
        for key, position in positions.items():
            t = self.tickets[key]
            if t.started_at is None and t.position != position:
                t.position = position
                t.events.put_nowait(QueuePosition(position))

    def _send(self, w: WorkerSlot, msg: Any) -> None:
        try:
            w.conn.send(msg)
        except (OSError, ValueError, AttributeError):
            log.warning("could not reach worker %s; it will be treated as dead", w.device)

    # Worker messages

    def _on_readable(self, w: WorkerSlot) -> None:
        try:
            while w.conn is not None and w.conn.poll():
                self._handle(w, w.conn.recv())
        except (EOFError, OSError):
            # The pipe closed: the process is exiting; its sentinel reports the death.
            if w.conn is not None:
                self._loop.remove_reader(w.conn.fileno())

    def _handle(self, w: WorkerSlot, msg: Any) -> None:
        if isinstance(msg, Ready):
            w.state = "ready"
            self.model_info = msg
            if w.ready_future and not w.ready_future.done():
                w.ready_future.set_result(msg)
            self._loop.create_task(self._update_health())
            self._dispatch()
            return
        if isinstance(msg, Fatal):
            log.error("worker %s cannot start: %s", w.device, msg.message)
            if w.ready_future and not w.ready_future.done():
                w.ready_future.set_exception(RuntimeError(f"worker {msg.device} failed to start: {msg.message}"))
            w.respawns = MAX_RESPAWNS  # a model that fails to load will not load on retry
            return
        ticket = self.tickets.get(msg.request_id)
        if isinstance(msg, JobDone):
            self._job_done(w, msg, ticket)
            return
        if ticket is None or ticket.closed:
            return
        if isinstance(msg, Progress):
            ticket.events.put_nowait(msg)
        elif isinstance(msg, ImageResult):
            if msg.index not in ticket.delivered:
                ticket.delivered.add(msg.index)
                ticket.events.put_nowait(msg)
                metrics.IMAGES.labels(w.device).inc()
        elif isinstance(msg, JobError):
            self._fail(ticket, _ERRORS[msg.kind](msg))

    def _job_done(self, w: WorkerSlot, msg: JobDone, ticket: Ticket | None) -> None:
        if w.job is not None and w.job.job_id == msg.job_id:
            w.job = None
        metrics.DEVICE_BUSY.labels(w.device).inc(msg.compute_seconds)
        metrics.ADAPTER_CACHE.labels(w.device, "hit").inc(msg.cache_hits)
        metrics.ADAPTER_CACHE.labels(w.device, "miss").inc(msg.cache_misses)
        if ticket is not None:
            job, _ = ticket.inflight.pop(msg.job_id, (None, None))
            ticket.compute_seconds += msg.compute_seconds
            if job is not None and not msg.cancelled and job.indices:
                per_image = msg.compute_seconds / len(job.indices)
                self._image_seconds = 0.8 * self._image_seconds + 0.2 * per_image
            self._forget_if_idle(ticket)
        self._dispatch()

    # Worker death

    def _on_exit(self, w: WorkerSlot, process: Any) -> None:
        if process is not w.process:
            return
        self._on_readable(w)  # whatever it sent before dying still counts
        self._detach(w)
        if self._stopping:
            w.state = "dead"
            return
        was_starting = w.state == "starting"
        w.state = "dead"
        log.error("worker %s exited (code %s)", w.device, process.exitcode)
        if w.ready_future and not w.ready_future.done():
            w.ready_future.set_exception(RuntimeError(f"worker {w.device} exited during start-up"))
        job, w.job = w.job, None
        if job is not None:
            self._requeue(job, w)
        if self.accepting and self._started and w.respawns < MAX_RESPAWNS and not was_starting:
            w.respawns += 1
            metrics.WORKER_RESTARTS.labels(w.device).inc()
            log.warning("respawning worker %s (%d/%d)", w.device, w.respawns, MAX_RESPAWNS)
            self._spawn(w)
        elif not any(x.state in ("ready", "starting") for x in self.workers):
            for ticket in list(self.tickets.values()):
                self._fail(ticket, Unavailable("every generator worker died; see the server log"))
        self._loop.create_task(self._update_health())
        self._dispatch()

    def _requeue(self, job: Job, w: WorkerSlot) -> None:
        ticket = self.tickets.get(job.request_id)
        if ticket is None:
            return
        ticket.inflight.pop(job.job_id, None)
        if ticket.closed:
            self._forget_if_idle(ticket)
            return
        lost = [ticket.units[i] for i in job.indices if i not in ticket.delivered]
        for unit in lost:
            unit.attempts += 1
        if any(u.attempts > 1 for u in lost):
            self._fail(ticket, Unavailable(f"worker {w.device} died twice while rendering this request"))
            return
        log.warning("worker %s died; retrying images %s elsewhere", w.device, [u.index for u in lost])
        ticket.pending.extendleft(reversed(lost))
        if ticket.key not in self._rr:
            self._rr.appendleft(ticket.key)

    def _detach(self, w: WorkerSlot) -> None:
        if self._loop is None:
            return
        if w.conn is not None:
            try:
                self._loop.remove_reader(w.conn.fileno())
            except (OSError, ValueError):
                pass
            w.conn.close()
            w.conn = None
        if w.process is not None:
            try:
                self._loop.remove_reader(w.process.sentinel)
            except (OSError, ValueError):
                pass

    async def _update_health(self) -> None:
        metrics.WORKERS_READY.set(len(self.ready_workers))
        serving = self._started and self.accepting and bool(self.ready_workers)
        if serving != self._serving:
            self._serving = serving
            if self.on_health is not None:
                await self.on_health(serving)
