"""Parent-side scheduling: spawn one worker per device, spread every request's images over
them fairly, retry images lost to a dead worker, and cancel on request.

Runs on the server's event loop; worker pipes and process sentinels are watched with
`loop.add_reader`, so no threads and no polling (but for the once-a-second hang watchdog).

Workers that die, at any time, come back after a backoff that resets once they have been healthy
for a while; a job that runs far past its expected time has its worker killed, and its images go
elsewhere. Only a worker that cannot start (its model fails to load, or it dies while starting
`max_start_failures` times in a row) is given up; when every worker is given up the process
cannot serve again, and `on_unrecoverable` tells the app to exit non-zero.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import math
import multiprocessing as mp
import os
import signal
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
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
    Failed,
    Fatal,
    ImageResult,
    Job,
    JobDone,
    JobError,
    Progress,
    QueuePosition,
    Ready,
    RenderSettings,
    Shutdown,
    StreamEvent,
)
from services.generator.worker import WorkerConfig, worker_main

log = logging.getLogger(__name__)


class WorkerState(enum.Enum):
    STARTING = "starting"  # spawned, loading and warming up
    READY = "ready"
    RESTARTING = "restarting"  # died; respawns after its backoff
    STOPPED = "stopped"  # shut down, or given up: it cannot start


@dataclass(frozen=True)
class WorkerPolicy:
    """How dead and hung workers are handled."""

    backoff_s: float = 1.0  # before the 2nd respawn in a row (the 1st is immediate); doubles
    backoff_max_s: float = 30.0
    healthy_s: float = 60.0  # ready this long: the backoff starts over
    max_start_failures: int = 5  # deaths before Ready, in a row, after which a worker is given up
    watchdog_factor: float = 10.0  # a job may run this many times its expected time
    watchdog_min_s: float = 60.0  # ... and at least this long (adapter loads, first-call overheads)


@dataclass
class Unit:
    """One image of a request. Its seed is fixed at acceptance, whatever device renders it."""

    index: int
    seed: int
    attempts: int = 0


class StreamEvents:
    """What a request's stream has yet to send, bounded whether or not its client reads.

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
    # Called with each image as soon as a worker sends it: storing never waits for the stream.
    on_image: Callable[[ImageResult], None] = lambda _: None
    events: StreamEvents = field(default_factory=StreamEvents)
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
    state: WorkerState = WorkerState.STARTING
    job: Job | None = None
    job_started: float = 0.0
    job_limit: float = math.inf  # seconds the watchdog lets the current job run
    ready_since: float = 0.0
    respawns: int = 0  # over the process's life (a metric too)
    failures: int = 0  # deaths since it was last healthy for policy.healthy_s
    start_failures: int = 0  # deaths before Ready, in a row
    fatal: str = ""  # why it cannot start at all
    hung: bool = False  # killed by the watchdog
    respawn_timer: asyncio.TimerHandle | None = None

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
        policy: WorkerPolicy | None = None,
        on_unrecoverable: Callable[[str], None] | None = None,
        max_progress: int = 32,
    ):
        if not configs:
            raise ValueError("no devices configured")
        self.workers = [WorkerSlot(i, c) for i, c in enumerate(configs)]
        self.max_queue = max_queue
        self.max_batch = max(1, max_batch)
        self.batch_pixels = batch_pixels
        self.on_health = on_health
        self.start_timeout_s = start_timeout_s
        self.policy = policy or WorkerPolicy()
        self.on_unrecoverable = on_unrecoverable
        self.max_progress = max_progress
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
        # Seconds per denoising step of one image per megapixel: the watchdog's yardstick.
        self._step_cost: float | None = None
        self._changed = asyncio.Event()
        self._start_error = ""
        self.unrecoverable = ""
        self._watchdog: asyncio.Task | None = None
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
        self._watchdog = self._loop.create_task(self._watch_jobs())

    async def wait_ready(self) -> None:
        """Wait until every worker is ready; raise if one cannot start (its start-up error)."""
        try:
            async with asyncio.timeout(self.start_timeout_s):
                while not all(w.state is WorkerState.READY for w in self.workers):
                    if self._start_error:
                        raise RuntimeError(self._start_error)
                    self._changed.clear()
                    await self._changed.wait()
        except BaseException:
            await self.stop()
            raise
        self._started = True
        await self._update_health()

    def _spawn(self, w: WorkerSlot) -> None:
        w.respawn_timer = None
        if self._stopping:
            return
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        w.process = self._ctx.Process(
            target=worker_main, args=(w.config, child_conn), name=f"worker-{w.device}", daemon=True
        )
        w.process.start()
        child_conn.close()
        w.conn, w.state, w.job, w.hung = parent_conn, WorkerState.STARTING, None, False
        self._loop.add_reader(parent_conn.fileno(), self._on_readable, w)
        self._loop.add_reader(w.process.sentinel, self._on_exit, w, w.process)
        self._changed.set()

    async def stop(self, timeout: float = 10.0) -> None:
        self.accepting = False  # also stops respawns
        self._stopping = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        for w in self.workers:
            if w.respawn_timer is not None:
                w.respawn_timer.cancel()
            if w.state is not WorkerState.STOPPED and w.conn is not None:
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
                w.process.kill()  # past its time: a hung worker ignores SIGTERM as readily as Shutdown
            self._detach(w)
            w.state = WorkerState.STOPPED
        self._serving = False
        self._changed.set()

    async def drain(self, grace_s: float) -> None:
        """Stop accepting; let running requests finish, then cancel the rest: all within `grace_s`."""
        self.accepting = False
        deadline = time.monotonic() + grace_s
        while self.tickets and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for key in list(self.tickets):
            self._fail(self.tickets[key], Unavailable("server shut down before the request finished"))
        await self.stop(timeout=max(1.0, deadline - time.monotonic()))

    # Requests

    @property
    def queued_images(self) -> int:
        return sum(len(t.pending) for t in self.tickets.values())

    @property
    def ready_workers(self) -> list[WorkerSlot]:
        return [w for w in self.workers if w.state is WorkerState.READY]

    @property
    def live_workers(self) -> list[WorkerSlot]:
        """Workers that serve, or will once started or respawned."""
        return [w for w in self.workers if w.state is not WorkerState.STOPPED]

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
        if not self.live_workers:
            raise Unavailable("no generator worker can run; see the server log")
        if any(t.request_id == request_id for t in self.tickets.values()):
            raise AlreadyExists(f"request_id {request_id!r} is already running; request ids are single-use")
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
        idle = [w for w in ready if w.job is None and w.conn is not None]
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
            w.job, w.job_started, w.job_limit = job, time.perf_counter(), self._job_limit(job)
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
            w.state, w.ready_since, w.start_failures = WorkerState.READY, time.monotonic(), 0
            self.model_info = msg
            if self._step_cost is None and msg.warmup_seconds > 0:
                # The warm-up (2 steps, one small image) overestimates: fine for a watchdog.
                self._step_cost = msg.warmup_seconds / 2 / max(msg.warmup_megapixels, 1e-3)
            self._changed.set()
            self._loop.create_task(self._update_health())
            self._dispatch()
            return
        if isinstance(msg, Fatal):
            log.error("worker %s cannot start: %s", w.device, msg.message)
            w.fatal = msg.message  # a model that fails to load will not load on retry
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
                ticket.on_image(msg)
                metrics.IMAGES.labels(w.device).inc()
        elif isinstance(msg, JobError):
            self._fail(ticket, _ERRORS[msg.kind](msg))

    def _job_done(self, w: WorkerSlot, msg: JobDone, ticket: Ticket | None) -> None:
        job = w.job if w.job is not None and w.job.job_id == msg.job_id else None
        if job is not None:
            w.job, w.job_limit = None, math.inf
            if not msg.cancelled and msg.compute_seconds > 0:
                cost = msg.compute_seconds / (job.settings.steps * _megapixels(job))
                self._step_cost = cost if self._step_cost is None else 0.8 * self._step_cost + 0.2 * cost
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

    # Hung workers

    def _job_limit(self, job: Job) -> float:
        """How long `job` may run: its steps x the measured time per step x a factor, with a floor."""
        p = self.policy
        if self._step_cost is None:
            return 10 * p.watchdog_min_s  # nothing measured yet: generous
        expected = job.settings.steps * _megapixels(job) * self._step_cost
        return max(p.watchdog_min_s, p.watchdog_factor * expected)

    async def _watch_jobs(self) -> None:
        interval = min(1.0, self.policy.watchdog_min_s / 4)
        while True:
            await asyncio.sleep(interval)
            now = time.perf_counter()
            for w in self.workers:
                if w.job is None or w.hung or w.state is not WorkerState.READY:
                    continue
                if now - w.job_started > w.job_limit:
                    log.error(
                        "worker %s hung: job %d has run %.0fs, limit %.0fs; killing it",
                        w.device,
                        w.job.job_id,
                        now - w.job_started,
                        w.job_limit,
                    )
                    metrics.WORKER_HANGS.labels(w.device).inc()
                    w.hung = True
                    # Its exit takes the usual path: images requeued, worker respawned.
                    _kill(w.process)

    # Worker death

    def _on_exit(self, w: WorkerSlot, process: Any) -> None:
        if process is not w.process:
            return
        self._on_readable(w)  # whatever it sent before dying still counts
        self._detach(w)
        process.join(timeout=1.0)  # reap it, so its exit code is known
        if self._stopping:
            w.state = WorkerState.STOPPED
            return
        was_ready = w.state is WorkerState.READY
        cause = "was killed by the watchdog" if w.hung else _describe_exit(process.exitcode)
        log.error("worker %s %s%s", w.device, cause, "" if was_ready else " while starting")
        job, w.job, w.job_limit = w.job, None, math.inf
        # Not ready from here on: requeueing can fail a request, whose cancel dispatches again, and a
        # job handed to this dead slot would never be sent nor requeued (the request hung until its deadline).
        w.state = WorkerState.RESTARTING
        if job is not None:
            self._requeue(job, w)
        if was_ready and time.monotonic() - w.ready_since >= self.policy.healthy_s:
            w.failures = 0
        w.failures += 1
        w.start_failures = 0 if was_ready else w.start_failures + 1
        if w.fatal or w.start_failures >= self.policy.max_start_failures:
            self._give_up(w, w.fatal or f"it died {w.start_failures} times in a row while starting")
        elif self.accepting:
            delay = self._backoff(w.failures)
            w.state = WorkerState.RESTARTING
            w.respawns += 1
            metrics.WORKER_RESTARTS.labels(w.device).inc()
            log.warning("respawning worker %s in %.1fs (respawn %d)", w.device, delay, w.respawns)
            w.respawn_timer = self._loop.call_later(delay, self._spawn, w)
        else:
            w.state = WorkerState.STOPPED
        self._changed.set()
        self._loop.create_task(self._update_health())
        self._dispatch()

    def _backoff(self, failures: int) -> float:
        if failures <= 1:
            return 0.0
        return min(self.policy.backoff_max_s, self.policy.backoff_s * 2 ** (failures - 2))

    def _give_up(self, w: WorkerSlot, why: str) -> None:
        w.state = WorkerState.STOPPED
        log.error("worker %s is given up: %s", w.device, why)
        if not self._started:
            self._start_error = f"worker {w.device} cannot start: {why}"
        if self.live_workers:
            return
        # Nothing can serve again: fail what waits, and let the orchestrator restart the process.
        self.unrecoverable = f"every generator worker is given up (last: {w.device}: {why})"
        for ticket in list(self.tickets.values()):
            self._fail(ticket, Unavailable("no generator worker can run; see the server log"))
        if self._started and self.on_unrecoverable is not None:
            self.on_unrecoverable(self.unrecoverable)

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
            how = "hung" if w.hung else "died"
            self._fail(ticket, Unavailable(f"a worker {how} twice while rendering this request (last: {w.device})"))
            return
        log.warning("worker %s lost images %s; retrying them", w.device, [u.index for u in lost])
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


def _megapixels(job: Job) -> float:
    return len(job.indices) * job.settings.width * job.settings.height / 1e6


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "exited (code unknown)"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _kill(process: Any) -> None:
    try:
        os.kill(process.pid, signal.SIGKILL)
    except (ProcessLookupError, TypeError):
        pass
