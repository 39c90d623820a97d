"""The worker pool: one process per device, and its lifecycle (spawn, ready, death, respawn, give-up, hang).

Runs on the server's event loop; worker pipes and process sentinels are watched with `loop.add_reader`,
so no threads and no polling (but for the once-a-second hang watchdog).

Workers that die, at any time, come back after a backoff that resets once they have been healthy for a
while; a job that runs far past its expected time has its worker killed, and its images go elsewhere
(the dispatcher requeues them). Only a worker that cannot start (its model fails to load, or it dies
while starting `max_start_failures` times in a row) is given up; when every worker is given up the
process cannot serve again, and `on_unrecoverable` tells the app to exit non-zero.

What the jobs are and where they go is the dispatcher's (dispatch.py); this room only runs processes.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Protocol

from services.generator import metrics
from services.generator.messages import (
    Fatal,
    FromWorker,
    ImageResult,
    Job,
    JobDone,
    JobError,
    Progress,
    Ready,
    Shutdown,
    ToWorker,
)
from services.generator.options import WorkerConfig, WorkerPolicy
from services.generator.worker import worker_main

log = logging.getLogger(__name__)


class WorkerState(enum.Enum):
    STARTING = "starting"  # spawned, loading and warming up
    READY = "ready"
    RESTARTING = "restarting"  # died; respawns after its backoff
    STOPPED = "stopped"  # shut down, or given up: it cannot start


class Process(Protocol):
    """The part of multiprocessing.Process the pool uses (tests drive the pool with fakes)."""

    @property
    def pid(self) -> int | None: ...

    @property
    def sentinel(self) -> int: ...

    @property
    def exitcode(self) -> int | None: ...

    def is_alive(self) -> bool: ...

    def join(self, timeout: float | None = None) -> None: ...

    def kill(self) -> None: ...


# What multiprocessing reports for a forked worker whose forkserver died: its end can no longer be reported, and
# the worker itself may still run (it would stop at its pipe's end, after its job).
FORKSERVER_LOST = 255

# Starts a worker process for a config: the process and the parent's end of its pipe.
StartProcess = Callable[[WorkerConfig], tuple[Process, Connection | None]]


def preload_modules(*pipelines: str) -> list[str]:
    """What a forkserver imports for workers of these pipeline factories ("module:callable")."""
    return ["services.generator.worker", *(p.partition(":")[0] for p in pipelines)]


def spawn_process(config: WorkerConfig) -> tuple[Process, Connection | None]:
    """Forked from a forkserver, never from the server itself: the forkserver is a fresh process (exec'd like a
    spawn) that only imports modules, so no gRPC thread and no CUDA context is ever forked (importing torch
    creates none). It imports the worker and its pipeline factory's module (torch, diffusers, peft: about 9 s
    of CPU) once; each worker, and each respawn after a crash, is a fork of it that starts in about a second.
    One forkserver per server process, started with the first worker: its imports are fixed then."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(preload_modules(config.pipeline))
    parent_conn, child_conn = ctx.Pipe(duplex=True)
    process = ctx.Process(target=worker_main, args=(config, child_conn), name=f"worker-{config.device}", daemon=True)
    process.start()
    child_conn.close()
    return process, parent_conn


@dataclass
class WorkerHandle:
    """The parent's view of one worker process. Its state changes only through WorkerPool's transitions."""

    config: WorkerConfig
    process: Process | None = None
    conn: Connection | None = None
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

    @property
    def idle(self) -> bool:
        return self.state is WorkerState.READY and self.job is None and self.conn is not None


class PoolListener(Protocol):
    """What the pool tells the dispatcher."""

    def on_capacity(self) -> None:
        """A worker became ready or idle, or one died: jobs may be handed out (or must wait)."""

    def on_job_message(self, worker: WorkerHandle, msg: Progress | ImageResult | JobError) -> None: ...

    def on_job_done(self, worker: WorkerHandle, msg: JobDone) -> None: ...

    def on_job_lost(self, worker: WorkerHandle, job: Job) -> None:
        """`worker` died (or hung and was killed) while running `job`."""

    def on_unservable(self) -> None:
        """Every worker is given up: nothing waiting can ever run."""


# The legal transitions: (from, to). Anything else is a bug, raised where it happens.
_TRANSITIONS = {
    (WorkerState.STARTING, WorkerState.READY),
    (WorkerState.STARTING, WorkerState.RESTARTING),
    (WorkerState.READY, WorkerState.RESTARTING),
    (WorkerState.RESTARTING, WorkerState.STARTING),
    *((state, WorkerState.STOPPED) for state in WorkerState),
}


class WorkerPool:
    def __init__(
        self,
        configs: list[WorkerConfig],
        policy: WorkerPolicy | None = None,
        on_health: Callable[[bool], Awaitable[None]] | None = None,
        start_timeout_s: float = 900.0,
        on_unrecoverable: Callable[[str], None] | None = None,
        start_process: StartProcess = spawn_process,
    ):
        if not configs:
            raise ValueError("no devices configured")
        self.workers = [WorkerHandle(c) for c in configs]
        self.policy = policy or WorkerPolicy()
        self.on_health = on_health
        self.start_timeout_s = start_timeout_s
        self.on_unrecoverable = on_unrecoverable
        self.listener: PoolListener | None = None
        self.model_info: Ready | None = None
        self.unrecoverable = ""
        self.respawning = True  # off once draining or stopping
        self._start_process = start_process
        self._loop: asyncio.AbstractEventLoop | None = None
        self._serving = False
        self.started = False
        self._stopping = False
        # Seconds per denoising step of one image per megapixel: the watchdog's yardstick.
        self._step_cost: float | None = None
        self._changed = asyncio.Event()
        self._start_error = ""
        self._watchdog: asyncio.Task[None] | None = None

    # State transitions: one guarded method each

    def _move(self, w: WorkerHandle, to: WorkerState) -> None:
        if w.state is not to and (w.state, to) not in _TRANSITIONS:
            raise RuntimeError(f"worker {w.device}: no transition {w.state.value} -> {to.value}")
        w.state = to
        self._changed.set()

    def _started(self, w: WorkerHandle, process: Process, conn: Connection | None) -> None:
        self._move(w, WorkerState.STARTING)
        w.process, w.conn, w.job, w.hung, w.respawn_timer = process, conn, None, False, None

    def _ready(self, w: WorkerHandle) -> None:
        self._move(w, WorkerState.READY)
        w.ready_since, w.start_failures = time.monotonic(), 0

    def _died(self, w: WorkerHandle) -> None:
        # Not ready from here on: a job handed to a dead worker would never be sent nor requeued.
        self._move(w, WorkerState.RESTARTING)
        w.job, w.job_limit = None, math.inf

    def _stopped(self, w: WorkerHandle) -> None:
        self._move(w, WorkerState.STOPPED)

    # Lifecycle

    @property
    def ready(self) -> list[WorkerHandle]:
        return [w for w in self.workers if w.state is WorkerState.READY]

    @property
    def live(self) -> list[WorkerHandle]:
        """Workers that serve, or will once started or respawned."""
        return [w for w in self.workers if w.state is not WorkerState.STOPPED]

    @property
    def idle(self) -> list[WorkerHandle]:
        return [w for w in self.workers if w.idle]

    def spawn_all(self) -> None:
        """Start every worker process; `wait_ready` waits for them."""
        self._loop = asyncio.get_running_loop()
        for w in self.workers:
            self._spawn(w)
        self._watchdog = self._loop.create_task(self._watch_jobs())

    def _spawn(self, w: WorkerHandle) -> None:
        w.respawn_timer = None
        if self._stopping:
            return
        assert self._loop is not None
        try:
            process, conn = self._start_process(w.config)
        except (OSError, EOFError) as exc:  # e.g. the forkserver died as it forked (the next start makes a new one)
            w.start_failures += 1
            log.error("worker %s did not start: %s: %s", w.device, type(exc).__name__, exc)
            if w.start_failures >= self.policy.max_start_failures:
                self._give_up(w, f"it failed to start {w.start_failures} times in a row")
                self._health_changed()
            else:
                w.respawn_timer = self._loop.call_later(self._backoff(w.start_failures), self._spawn, w)
            return
        self._started(w, process, conn)
        if conn is not None:
            self._loop.add_reader(conn.fileno(), self._on_readable, w)
        if process.sentinel >= 0:
            self._loop.add_reader(process.sentinel, self.worker_exited, w, process)

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
        self.started = True
        await self._update_health()

    async def stop(self, timeout: float = 10.0) -> None:
        self.respawning = False
        self._stopping = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        for w in self.workers:
            if w.respawn_timer is not None:
                w.respawn_timer.cancel()
            if w.state is not WorkerState.STOPPED and w.conn is not None:
                self.send(w, Shutdown())
        deadline = time.monotonic() + timeout
        for w in self.workers:
            if w.process is None:
                continue
            while w.process.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if w.process.is_alive():
                w.process.kill()  # past its time: a hung worker ignores SIGTERM as readily as Shutdown
            self._detach(w)
            self._stopped(w)
        self._serving = False

    def stop_respawning(self) -> None:
        """Draining: a worker that dies from now on stays down."""
        self.respawning = False

    # Jobs

    def assign(self, w: WorkerHandle, job: Job) -> None:
        """Hand `job` to the idle worker `w`; the watchdog times it from now."""
        if not w.idle:
            raise RuntimeError(f"worker {w.device} is not idle")
        w.job, w.job_started, w.job_limit = job, time.perf_counter(), self._job_limit(job)
        self.send(w, job)

    def send(self, w: WorkerHandle, msg: ToWorker) -> None:
        try:
            if w.conn is None:
                raise OSError("no pipe")
            w.conn.send(msg)
        except (OSError, ValueError):
            log.warning("could not reach worker %s; it will be treated as dead", w.device)

    def _job_limit(self, job: Job) -> float:
        """How long `job` may run: its steps x the measured time per step x a factor, with a floor."""
        p = self.policy
        if self._step_cost is None:
            return 10 * p.watchdog_min_s  # nothing measured yet: generous
        expected = job.settings.steps * megapixels(job) * self._step_cost
        return max(p.watchdog_min_s, p.watchdog_factor * expected)

    # Worker messages

    def _on_readable(self, w: WorkerHandle) -> None:
        try:
            while w.conn is not None and w.conn.poll():
                self.handle(w, w.conn.recv())
        except (EOFError, OSError):
            # The pipe closed: the process is exiting; its sentinel reports the death.
            if w.conn is not None and self._loop is not None:
                self._loop.remove_reader(w.conn.fileno())

    def handle(self, w: WorkerHandle, msg: FromWorker) -> None:
        """One message from worker `w`."""
        if isinstance(msg, Ready):
            self._ready(w)
            self.model_info = msg
            if self._step_cost is None and msg.warmup_seconds > 0:
                # The warm-up (2 steps, one small image) overestimates: fine for a watchdog.
                self._step_cost = msg.warmup_seconds / 2 / max(msg.warmup_megapixels, 1e-3)
            self._health_changed()
            self._notify_capacity()
        elif isinstance(msg, Fatal):
            log.error("worker %s cannot start: %s", w.device, msg.message)
            w.fatal = msg.message  # a model that fails to load will not load on retry
        elif isinstance(msg, JobDone):
            self._job_done(w, msg)
        elif self.listener is not None:
            self.listener.on_job_message(w, msg)

    def _job_done(self, w: WorkerHandle, msg: JobDone) -> None:
        job = w.job if w.job is not None and w.job.job_id == msg.job_id else None
        if job is not None:
            w.job, w.job_limit = None, math.inf
            if not msg.cancelled and msg.compute_seconds > 0:
                cost = msg.compute_seconds / (job.settings.steps * megapixels(job))
                self._step_cost = cost if self._step_cost is None else 0.8 * self._step_cost + 0.2 * cost
        metrics.DEVICE_BUSY.labels(w.device).inc(msg.compute_seconds)
        metrics.ADAPTER_CACHE.labels(w.device, "hit").inc(msg.cache_hits)
        metrics.ADAPTER_CACHE.labels(w.device, "miss").inc(msg.cache_misses)
        if self.listener is not None:
            self.listener.on_job_done(w, msg)

    def _notify_capacity(self) -> None:
        if self.listener is not None:
            self.listener.on_capacity()

    # Hung workers

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

    def worker_exited(self, w: WorkerHandle, process: Process) -> None:
        """`process` (worker `w`'s, unless already replaced) has exited."""
        if process is not w.process:
            return
        self._on_readable(w)  # whatever it sent before dying still counts
        self._detach(w)
        process.join(timeout=1.0)  # reap it, so its exit code is known
        if process.exitcode == FORKSERVER_LOST:
            _kill(process)  # counted as dead, so dead: its respawn must not share the device with it
        if self._stopping:
            self._stopped(w)
            return
        was_ready = w.state is WorkerState.READY
        cause = "was killed by the watchdog" if w.hung else _describe_exit(process.exitcode)
        log.error("worker %s %s%s", w.device, cause, "" if was_ready else " while starting")
        job = w.job
        self._died(w)
        if job is not None and self.listener is not None:
            self.listener.on_job_lost(w, job)
        if was_ready and time.monotonic() - w.ready_since >= self.policy.healthy_s:
            w.failures = 0
        w.failures += 1
        w.start_failures = 0 if was_ready else w.start_failures + 1
        if w.fatal or w.start_failures >= self.policy.max_start_failures:
            self._give_up(w, w.fatal or f"it died {w.start_failures} times in a row while starting")
        elif self.respawning:
            delay = self._backoff(w.failures)
            w.respawns += 1
            metrics.WORKER_RESTARTS.labels(w.device).inc()
            log.warning("respawning worker %s in %.1fs (respawn %d)", w.device, delay, w.respawns)
            assert self._loop is not None
            w.respawn_timer = self._loop.call_later(delay, self._spawn, w)
        else:
            self._stopped(w)
        self._health_changed()
        self._notify_capacity()

    def _backoff(self, failures: int) -> float:
        if failures <= 1:
            return 0.0
        return min(self.policy.backoff_max_s, self.policy.backoff_s * 2 ** (failures - 2))

    def _give_up(self, w: WorkerHandle, why: str) -> None:
        self._stopped(w)
        log.error("worker %s is given up: %s", w.device, why)
        if not self.started:
            self._start_error = f"worker {w.device} cannot start: {why}"
        if self.live:
            return
        # Nothing can serve again: fail what waits, and let the orchestrator restart the process.
        self.unrecoverable = f"every generator worker is given up (last: {w.device}: {why})"
        if self.listener is not None:
            self.listener.on_unservable()
        if self.started and self.on_unrecoverable is not None:
            self.on_unrecoverable(self.unrecoverable)

    def _detach(self, w: WorkerHandle) -> None:
        if self._loop is None:
            return
        if w.conn is not None:
            try:
                self._loop.remove_reader(w.conn.fileno())
            except (OSError, ValueError):
                pass
            w.conn.close()
            w.conn = None
        if w.process is not None and w.process.sentinel >= 0:
            try:
                self._loop.remove_reader(w.process.sentinel)
            except (OSError, ValueError):
                pass

    # Health

    def _health_changed(self) -> None:
        if self._loop is not None:
            self._loop.create_task(self._update_health())

    async def _update_health(self) -> None:
        metrics.WORKERS_READY.set(len(self.ready))
        serving = self.started and self.respawning and bool(self.ready)
        if serving != self._serving:
            self._serving = serving
            if self.on_health is not None:
                await self.on_health(serving)

    @property
    def serving(self) -> bool:
        return self._serving


def megapixels(job: Job) -> float:
    return len(job.indices) * job.settings.width * job.settings.height / 1e6


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "exited (code unknown)"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    if code == FORKSERVER_LOST:
        return f"exited with code {code} or was lost with its forkserver"
    return f"exited with code {code}"


def _kill(process: Any) -> None:
    try:
        os.kill(process.pid, signal.SIGKILL)
    except (ProcessLookupError, TypeError):
        pass
