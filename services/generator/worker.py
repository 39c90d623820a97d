"""The per-device worker process: load once, warm up, report ready, then compute jobs.

Workers only compute: they render, encode PNGs and send bytes back. The parent stores and
announces. A bad job becomes a `JobError`; it never takes the worker down.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import multiprocessing as mp
import os
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection

from services.common.logs import configure_logging, device_var, request_id_var
from services.generator.compile import CompileOptions
from services.generator.messages import (
    Cancel,
    Fatal,
    ImageResult,
    Job,
    JobDone,
    JobError,
    Progress,
    Ready,
    Shutdown,
)

log = logging.getLogger(__name__)

DEFAULT_PIPELINE = "services.generator.pipeline:ProductPipeline"


@dataclass(frozen=True)
class WorkerConfig:
    model: str
    device: str
    threads: int = 0
    adapter_cache_size: int = 8
    hotswap_rank: int = 0
    warmup_size: int = 64
    log_level: str = "INFO"
    # "module:callable" building the pipeline; tests and benchmarks swap in stand-ins.
    pipeline: str = DEFAULT_PIPELINE
    # The fast path (dtype, SDPA, channels_last, torch.compile, warm shapes); None: the pipeline's defaults.
    compile: CompileOptions | None = None


def _build_pipeline(config: WorkerConfig):
    module, _, name = config.pipeline.partition(":")
    factory = getattr(importlib.import_module(module), name)
    # Stand-in pipelines take no compile options.
    params = inspect.signature(factory).parameters
    takes_compile = "compile" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    extra = {"compile": config.compile} if config.compile is not None and takes_compile else {}
    return factory(
        model=config.model,
        device=config.device,
        adapter_cache_size=config.adapter_cache_size,
        hotswap_rank=config.hotswap_rank,
        **extra,
    )


class _Inbox:
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
                    self.cancelled[msg.request_id] = None
                    while len(self.cancelled) > 4096:
                        self.cancelled.popitem(last=False)
            else:
                self.jobs.put(msg)

    def is_cancelled(self, request_id: str) -> bool:
        with self.lock:
            return request_id in self.cancelled


def _out_of_memory(exc: BaseException) -> bool:
    return "OutOfMemory" in type(exc).__name__  # torch.cuda.OutOfMemoryError, torch.OutOfMemoryError


def _error_kind(exc: BaseException) -> tuple[str, str]:
    name = type(exc).__name__
    if _out_of_memory(exc):
        return "resource_exhausted", "device out of memory; try fewer or smaller images"
    if isinstance(exc, FileNotFoundError):
        return "not_found", str(exc)
    if isinstance(exc, ValueError):
        return "invalid_argument", str(exc)
    return "internal", f"{name}: {exc}"


def run_job(pipe, job: Job, send, inbox: _Inbox) -> None:
    from services.common.pngmeta import encode_png
    from services.generator.pipeline import JobCancelled

    request_id_var.set(job.request_id)
    started = time.perf_counter()
    hits, misses = pipe.adapters.stats.hits, pipe.adapters.stats.misses

    def report_step(indices: tuple[int, ...], step: int, total: int, frames) -> None:
        # Fast PNG settings: a preview lives for one step on screen.
        encoded = tuple(encode_png(im, compress_level=1) for im in frames.images()) if frames else ()
        send(Progress(job.request_id, job.job_id, indices, step, total, encoded))

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
                    should_stop=lambda: inbox.is_cancelled(job.request_id),
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
            send(ImageResult(job.request_id, job.job_id, index, seed, png, w, h, compute, pipe.device_name))

    try:
        render(job.indices, job.seeds)
        cancelled = False
    except JobCancelled:
        cancelled = True
    except Exception as exc:
        kind, message = _error_kind(exc)
        log.warning("job %d failed (%s): %s", job.job_id, kind, message, exc_info=kind == "internal")
        field = message.split(":", 1)[0] if kind == "invalid_argument" and ":" in message else ""
        send(JobError(job.request_id, job.job_id, kind, message, field))
        cancelled = False
        if kind == "resource_exhausted":
            _empty_device_cache()
    stats = pipe.adapters.stats
    send(
        JobDone(
            job.request_id,
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

    def __enter__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="progress")
        self._last: Future | None = None
        return self

    def submit(self, fn, *args) -> None:
        self._last = self._pool.submit(fn, *args)

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True)
        if self._last is not None and exc[0] is None:
            self._last.result()  # surface a failed report


def _empty_device_cache() -> None:
    try:
        import torch

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

    def send(msg) -> None:
        with send_lock:
            conn.send(msg)

    try:
        import torch

        if config.threads > 0:
            torch.set_num_threads(config.threads)
        pipe = _build_pipeline(config)
        warm = pipe.warmup(config.warmup_size)
    except Exception as exc:
        log.exception("worker failed to start")
        send(Fatal(config.device, f"{type(exc).__name__}: {exc}"))
        return
    log.info("ready (load %.1fs, warm-up %.1fs)", pipe.load_seconds, warm)
    warm_side = min(config.warmup_size, pipe.default_size)  # as the pipelines' warm-up renders
    send(Ready(config.device, pipe.load_seconds, warm, pipe.default_size, pipe.size_multiple, warm_side**2 / 1e6))

    inbox = _Inbox(conn)
    while True:
        msg = inbox.jobs.get()
        if isinstance(msg, Shutdown):
            break
        if inbox.is_cancelled(msg.request_id):
            send(JobDone(msg.request_id, msg.job_id, 0.0, cancelled=True))
            continue
        run_job(pipe, msg, send, inbox)
    log.info("worker stopping")
