"""The per-device worker process: load once, warm up, report ready, then compute jobs.

Workers only compute: they render, encode PNGs and send bytes back. The parent stores and
announces. A bad job becomes a `JobError`; it never takes the worker down.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing as mp
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any

from services.common.logs import configure_logging, device_var, request_id_var
from services.common.pngmeta import encode_png
from services.generator.interfaces import Frames, InvalidJob, JobCancelled, Pipeline, PipelineFactory
from services.generator.messages import (
    Cancel,
    ErrorKind,
    Fatal,
    FromWorker,
    ImageResult,
    Job,
    JobDone,
    JobError,
    Progress,
    Ready,
    Shutdown,
)
from services.generator.options import WorkerConfig

log = logging.getLogger(__name__)

Send = Callable[[FromWorker], None]


def load_pipeline(config: WorkerConfig) -> Pipeline:
    """Build the pipeline `config.pipeline` ("module:callable", a PipelineFactory) names."""
    module, _, name = config.pipeline.partition(":")
    factory: PipelineFactory = getattr(importlib.import_module(module), name)
    return factory(config)


class Inbox:
    """Reads the parent's messages on a thread, so cancels arrive while a job runs."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self.jobs: queue.Queue[Job | Shutdown] = queue.Queue()
        self.cancelled: OrderedDict[str, None] = OrderedDict()
        self.lock = threading.Lock()
        threading.Thread(target=self._run, name="inbox", daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                self.jobs.put(Shutdown())  # parent is gone
                return
            if isinstance(msg, Cancel):
                with self.lock:
                    self.cancelled[msg.ticket_key] = None
                    while len(self.cancelled) > 4096:
                        self.cancelled.popitem(last=False)
            else:
                self.jobs.put(msg)

    def is_cancelled(self, ticket_key: str) -> bool:
        with self.lock:
            return ticket_key in self.cancelled


def _out_of_memory(exc: BaseException) -> bool:
    return "OutOfMemory" in type(exc).__name__  # torch.cuda.OutOfMemoryError, torch.OutOfMemoryError


def job_error(job: Job, exc: BaseException) -> JobError:
    """What the parent is told about a job that raised: its kind, the problem, the request field at fault."""
    kind: ErrorKind
    field = ""
    if _out_of_memory(exc):
        kind, message = "resource_exhausted", "device out of memory; try fewer or smaller images"
    elif isinstance(exc, FileNotFoundError):
        kind, message = "not_found", str(exc)
    elif isinstance(exc, InvalidJob):
        kind, message, field = "invalid_argument", exc.problem, exc.field
    elif isinstance(exc, ValueError):
        kind, message = "invalid_argument", str(exc)
    else:
        kind, message = "internal", f"{type(exc).__name__}: {exc}"
    return JobError(job.ticket_key, job.job_id, kind, message, field)


def run_job(pipe: Pipeline, job: Job, send: Send, inbox: Inbox) -> None:
    """Render `job`, sending its progress and images, then JobError if it failed, then always JobDone."""
    request_id_var.set(job.ticket_key)
    started = time.perf_counter()
    hits, misses = pipe.adapters.stats.hits, pipe.adapters.stats.misses

    def report_step(indices: tuple[int, ...], step: int, total: int, frames: Frames | None) -> None:
        # Fast PNG settings: a preview lives for one step on screen.
        encoded = tuple(encode_png(im, compress_level=1) for im in frames.images()) if frames else ()
        send(Progress(job.ticket_key, job.job_id, indices, step, total, encoded))

    def render(indices: tuple[int, ...], seeds: tuple[int, ...]) -> None:
        """Render and send these images; a batch that runs out of device memory is split in two."""
        begun = time.perf_counter()
        try:
            with _InOrder() as progress:
                images = pipe(
                    job.settings,
                    seeds,
                    on_step=lambda *step: progress.submit(report_step, indices, *step),
                    preview_every=job.preview_every,
                    should_stop=lambda: inbox.is_cancelled(job.ticket_key),
                )
        except Exception as exc:
            if len(seeds) == 1 or not _out_of_memory(exc):
                raise
            _empty_device_cache()
            log.warning("a batch of %d ran out of device memory; rendering it in halves", len(seeds))
            half = len(seeds) // 2
            render(indices[:half], seeds[:half])
            render(indices[half:], seeds[half:])
            return
        compute = (time.perf_counter() - begun) / len(images)
        for index, seed, image in zip(indices, seeds, images, strict=True):
            png = encode_png(image, {**job.metadata, "seed": seed})
            w, h = image.size
            send(ImageResult(job.ticket_key, job.job_id, index, seed, png, w, h, compute, pipe.device_name))

    try:
        render(job.indices, job.seeds)
        cancelled = False
    except JobCancelled:
        cancelled = True
    except Exception as exc:
        error = job_error(job, exc)
        log.warning("job %d failed (%s): %s", job.job_id, error.kind, error.message, exc_info=error.kind == "internal")
        send(error)
        cancelled = False
        if error.kind == "resource_exhausted":
            _empty_device_cache()
    stats = pipe.adapters.stats
    send(
        JobDone(
            job.ticket_key,
            job.job_id,
            time.perf_counter() - started,
            cancelled,
            stats.hits - hits,
            stats.misses - misses,
        )
    )
    request_id_var.set("-")


class _InOrder:
    """Runs step reports on one thread, in order, off the denoising loop; leaving waits for all.

    Encoding a preview (and waiting for its copy off the GPU) then overlaps the next step.
    """

    def __enter__(self) -> _InOrder:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="progress")
        self._last: Future[None] | None = None
        return self

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        self._last = self._pool.submit(fn, *args)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._pool.shutdown(wait=True)
        if self._last is not None and kind is None:
            self._last.result()  # surface a failed report


def _empty_device_cache() -> None:
    try:
        import torch  # imported by the pipeline already; here only to free CUDA memory

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


def _exit_with_parent() -> None:
    """Exit at once when the parent dies, even mid-job or while loading: nobody would read the results."""
    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def worker_main(config: WorkerConfig, conn: Connection) -> None:
    """Entry point of a spawned worker process."""
    _exit_with_parent()
    configure_logging(config.log_level, "generator-worker")
    device_var.set(config.device)
    if config.threads > 0:
        os.environ["OMP_NUM_THREADS"] = str(config.threads)
    send_lock = threading.Lock()

    def send(msg: FromWorker) -> None:
        with send_lock:
            conn.send(msg)

    try:
        import torch  # after OMP_NUM_THREADS is set: torch reads it once, at import

        if config.threads > 0:
            torch.set_num_threads(config.threads)
        pipe = load_pipeline(config)
        warm = pipe.warmup(config.warmup_size)
    except Exception as exc:
        log.exception("worker failed to start")
        send(Fatal(config.device, f"{type(exc).__name__}: {exc}"))
        return
    log.info("ready (load %.1fs, warm-up %.1fs)", pipe.load_seconds, warm)
    warm_side = min(config.warmup_size, pipe.default_size)  # as the pipelines' warm-up renders
    send(Ready(config.device, pipe.load_seconds, warm, pipe.default_size, pipe.size_multiple, warm_side**2 / 1e6))

    inbox = Inbox(conn)
    while True:
        msg = inbox.jobs.get()
        if isinstance(msg, Shutdown):
            break
        if inbox.is_cancelled(msg.ticket_key):
            send(JobDone(msg.ticket_key, msg.job_id, 0.0, cancelled=True))
            continue
        run_job(pipe, msg, send, inbox)
    log.info("worker stopping")
