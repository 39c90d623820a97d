"""One device, one job at a time: a bounded FIFO on the event loop feeding one worker thread.

The model runs on a dedicated thread (torch releases the GIL in its kernels), so the event loop
stays free for gRPC, storage and health checks. A cancelled or expired job leaves the queue at
once, or stops between tiles if it is already running.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from services.common.errors import (
    Cancelled,
    DeadlineExceeded,
    Internal,
    ResourceExhausted,
    Unavailable,
)
from services.common.logs import device_var, request_id_var
from services.upscaler import metrics
from services.upscaler.engine import Engine, upscale_image, warm_up
from services.upscaler.images import to_png
from services.upscaler.messages import JobFailed, Started, TileDone, UpscaleJob, UpscaleResult
from services.upscaler.tiling import JobCancelled, plan_tiles

log = logging.getLogger(__name__)


@dataclass
class Ticket:
    """A job inside the runner. Its events go to `events`; `stop` ends it between tiles."""

    job: UpscaleJob
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    stop: threading.Event = field(default_factory=threading.Event)
    accepted_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    state: str = "queued"  # queued -> running -> done | failed

    @property
    def request_id(self) -> str:
        return self.job.request_id

    def expired(self) -> bool:
        return self.job.deadline is not None and time.monotonic() > self.job.deadline

    def should_stop(self) -> bool:
        return self.stop.is_set() or self.expired()


class DeviceRunner:
    def __init__(self, engine: Engine, max_queue: int):
        self.engine = engine
        self.max_queue = max_queue
        self.ready = False
        self.accepting = True
        self.running: Ticket | None = None
        # (request_id, outcome) of recent jobs, newest last: for logs, metrics and tests.
        self.history: deque[tuple[str, str]] = deque(maxlen=256)
        self._waiting: deque[Ticket] = deque()
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="upscaler-device")
        self._loop_task: asyncio.Task | None = None
        self._job_seconds = 2.0  # running estimate, for retry hints

    # Lifecycle

    async def start(self, timeout_s: float) -> None:
        """Load and warm the model on the worker thread, then start taking jobs."""
        loop = asyncio.get_running_loop()

        def load() -> float:
            device_var.set(self.engine.device_name)
            self.engine.load()
            return warm_up(self.engine)

        warm = await asyncio.wait_for(loop.run_in_executor(self._executor, load), timeout_s)
        log.info("%s ready on %s (x%d; warm-up %.2fs)", self.engine.model_name, self.device, self.scale, warm)
        self.ready = True
        self._loop_task = asyncio.create_task(self._run(), name="upscaler-runner")

    @property
    def device(self) -> str:
        return self.engine.device_name

    @property
    def scale(self) -> int:
        return self.engine.scale

    async def drain(self, grace_s: float) -> None:
        """Stop accepting; let queued and running jobs finish for up to `grace_s`, then cancel them."""
        self.accepting = False
        deadline = time.monotonic() + grace_s
        while (self._waiting or self.running) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for ticket in list(self._waiting):
            error = Unavailable("the server is shutting down; retry elsewhere")
            self._finish(ticket, JobFailed(ticket.request_id, error, "shutdown"))
        self._waiting.clear()
        metrics.QUEUE_DEPTH.set(0)
        if self.running is not None:
            self.running.stop.set()

    async def stop(self) -> None:
        await self.drain(0.0)
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        # The worker thread checks `stop` between tiles, so this returns within one tile.
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        self.ready = False

    # Queue

    def submit(self, job: UpscaleJob) -> Ticket:
        if not self.ready:
            raise Unavailable("the model is still loading; retry shortly")
        if not self.accepting:
            raise Unavailable("the server is shutting down; retry elsewhere")
        if len(self._waiting) >= self.max_queue:
            wait = self._job_seconds * (len(self._waiting) + 1)
            raise ResourceExhausted(f"the upscale queue is full ({self.max_queue} waiting)", retry_after_s=wait)
        ticket = Ticket(job)
        self._waiting.append(ticket)
        metrics.QUEUE_DEPTH.set(len(self._waiting))
        self._wake.set()
        return ticket

    def position_of(self, ticket: Ticket) -> int:
        """Jobs ahead of this one: 0 means it runs next (or already runs)."""
        if ticket.state != "queued":
            return 0
        ahead = next((i for i, t in enumerate(self._waiting) if t is ticket), 0)
        return ahead + (1 if self.running is not None else 0)

    def cancel(self, ticket: Ticket) -> None:
        """Drop a queued job, or stop a running one at its next tile. Idempotent."""
        if ticket.state == "queued":
            try:
                self._waiting.remove(ticket)
            except ValueError:
                pass
            metrics.QUEUE_DEPTH.set(len(self._waiting))
            self._finish(ticket, JobFailed(ticket.request_id, Cancelled("the request was cancelled"), "cancelled"))
        elif ticket.state == "running":
            ticket.stop.set()

    def _finish(self, ticket: Ticket, msg: UpscaleResult | JobFailed) -> None:
        if ticket.state in ("done", "failed"):
            return
        ticket.state = "done" if isinstance(msg, UpscaleResult) else "failed"
        self.history.append((ticket.request_id, "ok" if isinstance(msg, UpscaleResult) else msg.outcome))
        ticket.events.put_nowait(msg)

    # Worker

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            ticket = self._waiting.popleft()
            metrics.QUEUE_DEPTH.set(len(self._waiting))
            if ticket.expired():
                self._finish(ticket, JobFailed(ticket.request_id, DeadlineExceeded("the deadline passed"), "expired"))
                continue
            ticket.state, ticket.started_at = "running", time.perf_counter()
            self.running = ticket
            try:
                msg = await loop.run_in_executor(self._executor, self._compute, ticket, loop)
            finally:
                self.running = None
            metrics.DEVICE_BUSY.inc(time.perf_counter() - ticket.started_at)
            if isinstance(msg, UpscaleResult):
                self._job_seconds = 0.7 * self._job_seconds + 0.3 * msg.compute_seconds
            self._finish(ticket, msg)

    def _compute(self, ticket: Ticket, loop: asyncio.AbstractEventLoop) -> UpscaleResult | JobFailed:
        """Runs on the worker thread: upscale, encode, hand back bytes."""
        job = ticket.job
        request_id_var.set(job.request_id)
        device_var.set(self.device)
        send = ticket.events.put_nowait
        started = time.perf_counter()
        try:
            plan = plan_tiles(job.image.height, job.image.width, job.tile_size, job.tile_overlap, self.engine.align)
            loop.call_soon_threadsafe(send, Started(job.request_id, plan.total))
            image = upscale_image(
                self.engine,
                job.image,
                job.tile_size,
                job.tile_overlap,
                on_tile=lambda done, total: loop.call_soon_threadsafe(send, TileDone(job.request_id, done, total)),
                should_stop=ticket.should_stop,
            )
            png = to_png(image, job.text)
        except JobCancelled:
            if ticket.expired():
                return JobFailed(job.request_id, DeadlineExceeded("the deadline passed during the upscale"), "expired")
            return JobFailed(job.request_id, Cancelled("the request was cancelled"), "cancelled")
        except Exception as exc:
            if type(exc).__name__ == "OutOfMemoryError":
                _empty_cache()
                error = ResourceExhausted("device out of memory; try a smaller tile_size", self._job_seconds)
                return JobFailed(job.request_id, error, "oom")
            log.exception("upscale failed")
            return JobFailed(job.request_id, Internal(f"upscale failed: {type(exc).__name__}: {exc}"))
        seconds = time.perf_counter() - started
        log.info("upscaled %dx%d -> %dx%d in %.2fs", *job.image.size, *image.size, seconds)
        return UpscaleResult(job.request_id, png, image.width, image.height, seconds, self.device)


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
