"""Catalogue jobs owned by a long-lived process (the web page): started, watched, stopped and resumed.

Each job runs as an asyncio task on the loop that started it (the web server's own), held by the
`JobRegistry`, never by whoever asked for it: a browser tab that closes or reloads, or an event handler
that returns, leaves it running. Each job has its folder `{root}/{job id}` (results.JobDir, with a copy of
its catalogue file), so the registry lists the jobs it runs from memory and every other job folder it
finds under `root` from disk: a page reload, or a restarted web process, shows them all.

Stopping a job is the CLI's Ctrl-C (`Runner.stop`): calls in flight are cancelled, the summary says
`interrupted`, and starting the job again (`resume`) renders only what is not stored.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from client.api import GeneratorClient, describe_error
from client.catalogue import commands
from client.catalogue.commands import JobOptions, run_job
from client.catalogue.plan import Item, check_job_id
from client.catalogue.results import JobDir
from client.catalogue.runner import Event, Finished, ImageDone, ItemFailed, Retrying, Runner, Started

log = logging.getLogger(__name__)


class JobState(enum.Enum):
    CHECKING = "checking"  # reading the file, asking the generator what it offers, planning
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"  # stopped from the page, or the process ended mid-run: resume renders the rest
    FINISHED = "finished"  # every image stored
    FAILED = "failed"  # some images failed, or the job could not start (see the message)

    @property
    def active(self) -> bool:
        return self in (JobState.CHECKING, JobState.RUNNING, JobState.STOPPING)


class ItemState(enum.Enum):
    PENDING = "pending"
    RETRYING = "retrying"
    DONE = "done"
    FAILED = "failed"


@dataclass
class ItemView:
    request_id: str
    subject: str
    scene: str
    index: int
    state: ItemState
    note: str = ""  # a failure's or a retry's reason


@dataclass
class JobView:
    """One job as the page shows it."""

    job: str
    folder: Path
    state: JobState
    total: int = 0
    done: int = 0
    failed: int = 0
    rendered: int = 0  # by this process's run (the rest were stored before)
    images_per_minute: float = 0.0
    started: float = 0.0  # wall-clock time of its start (live) or of its folder's last change (from disk)
    message: str = ""
    problems: list[str] = field(default_factory=list)
    items: list[ItemView] = field(default_factory=list)  # live jobs: every item; from disk: stored and failed

    @property
    def zip_file(self) -> Path | None:
        path = JobDir(self.folder).zip_file
        return path if path.exists() and not self.state.active else None


class _Live:
    """A job this process runs: its task, its runner once planned, and what the runner reported."""

    def __init__(self, job: str, folder: Path):
        self.view = JobView(job, folder, JobState.CHECKING, started=time.time())
        self.task: asyncio.Task[None] | None = None
        self.runner: Runner | None = None
        self.stop_requested = False
        self._items: dict[str, ItemView] = {}
        self._run_started = 0.0

    def planned(self, runner: Runner, items: list[Item], indexed: set[str]) -> None:
        self.runner = runner
        if self.stop_requested:
            runner.stop()
        for item in items:
            state = ItemState.DONE if item.request_id in indexed else ItemState.PENDING
            self._items[item.request_id] = ItemView(item.request_id, item.row.subject, item.scene, item.index, state)
        self.view.items = list(self._items.values())
        self.view.total = len(items)

    def report(self, event: Event) -> None:
        v = self.view
        if isinstance(event, Started):
            v.state = JobState.STOPPING if self.stop_requested else JobState.RUNNING
            v.done = event.done
            self._run_started = time.monotonic()
        elif isinstance(event, ImageDone):
            v.done = event.done
            v.rendered += not event.stored.recovered
            self._set(event.stored.item, ItemState.DONE)
        elif isinstance(event, ItemFailed):
            v.failed += 1
            self._set(event.failure.item, ItemState.FAILED, event.failure.reason)
        elif isinstance(event, Retrying):
            self._set(event.item, ItemState.RETRYING, event.reason)
        elif isinstance(event, Finished):
            v.done = event.done
        elapsed = time.monotonic() - self._run_started
        v.images_per_minute = 60.0 * v.rendered / elapsed if self._run_started and elapsed > 0 else 0.0

    def _set(self, item: Item, state: ItemState, note: str = "") -> None:
        view = self._items.get(item.request_id)
        if view is not None:
            view.state, view.note = state, note


class JobRegistry:
    """The jobs of one process. Call its methods on the event loop that runs the jobs (the web server's)."""

    def __init__(self, root: Path, generator: Callable[[], GeneratorClient], options: JobOptions | None = None):
        self.root = Path(root)
        self.generator = generator  # called on the loop: grpc.aio channels belong to a loop
        self.options = options or JobOptions(zip=True)
        self._live: dict[str, _Live] = {}
        self._disk: dict[str, tuple[tuple[int, ...], JobView]] = {}

    async def validate(self, path: Path) -> tuple[list[str], int]:
        """Every problem of the file, one line each (spec's own sentences), checked against the generator,
        and how many images its good rows make."""
        catalogue = await commands.check(Path(path), self.generator())
        good = [r for r in catalogue.rows if r.number not in catalogue.bad_rows]
        return [str(p) for p in catalogue.problems], sum(len(r.scenes) * r.images for r in good)

    def start(self, path: Path, job: str | None = None) -> str:
        """Start a job from a catalogue file (copied into its folder); returns its id. `job` resumes one."""
        job = check_job_id(job) if job else commands.new_job_id(Path(path))
        live = self._live.get(job)
        if live is not None and live.view.state.active:
            raise ValueError(f"job {job} is running already")
        folder = self.root / job
        folder.mkdir(parents=True, exist_ok=True)
        copy = folder / f"catalogue{Path(path).suffix.lower() or '.csv'}"
        if Path(path).resolve() != copy.resolve():
            shutil.copyfile(path, copy)
        live = _Live(job, folder)
        self._live[job] = live
        live.task = asyncio.get_running_loop().create_task(self._run(live, copy), name=f"catalogue-{job}")
        return job

    def resume(self, job: str) -> str:
        """Start a stopped (or failed) job again: only what is not stored renders."""
        info = JobDir(self.root / check_job_id(job)).load_job()
        if info is None:
            raise ValueError(f"no job {job} under {self.root}")
        return self.start(Path(info.catalogue), job)

    def stop(self, job: str) -> bool:
        """Cancel the job's calls in flight and send nothing more; False when it is not running here."""
        live = self._live.get(job)
        if live is None or not live.view.state.active:
            return False
        live.stop_requested = True
        live.view.state = JobState.STOPPING
        if live.runner is not None:
            live.runner.stop()
        elif live.task is not None:
            live.task.cancel()  # still checking the file: nothing in flight yet
        return True

    async def wait(self, job: str) -> JobView:
        live = self._live[job]
        if live.task is not None:
            await asyncio.shield(live.task)
        return live.view

    async def close(self) -> None:
        """Stop every job and wait for them (each writes its summary: resumable)."""
        for job in list(self._live):
            self.stop(job)
        await asyncio.gather(*(live.task for live in self._live.values() if live.task), return_exceptions=True)

    def jobs(self) -> list[JobView]:
        """Every job: those running here, then every job folder under `root`; newest first."""
        views = {job: live.view for job, live in self._live.items()}
        if self.root.is_dir():
            for folder in self.root.iterdir():
                if folder.name not in views and (folder / "job.json").is_file():
                    views[folder.name] = self._cached(folder)
        return sorted(views.values(), key=lambda v: v.started, reverse=True)

    def view(self, job: str) -> JobView | None:
        live = self._live.get(job)
        if live is not None:
            return live.view
        folder = self.root / job
        return self._cached(folder) if (folder / "job.json").is_file() else None

    def _cached(self, folder: Path) -> JobView:
        """`_from_disk`, read again only when one of the folder's files changed (the page asks every second)."""
        jobdir = JobDir(folder)
        stamp = tuple(
            p.stat().st_mtime_ns if p.exists() else 0 for p in (jobdir.job_file, jobdir.index_file, jobdir.summary_file)
        )
        cached = self._disk.get(folder.name)
        if cached is None or cached[0] != stamp:
            cached = self._disk[folder.name] = (stamp, self._from_disk(folder))
        return cached[1]

    async def _run(self, live: _Live, path: Path) -> None:
        view = live.view
        try:
            outcome = await run_job(
                self.generator(),
                path,
                JobDir(view.folder),
                view.job,
                self.options,
                live.report,
                on_plan=live.planned,
                problems=view.problems.append,
            )
        except asyncio.CancelledError:
            view.state, view.message = JobState.STOPPED, "Stopped before anything rendered."
            return
        except Exception as exc:
            log.exception("catalogue job %s", view.job)
            view.state, view.message = JobState.FAILED, f"Could not run: {describe_error(exc)}"
            return
        summary = outcome.summary
        if summary is None:
            view.state, view.message = JobState.FAILED, "The file has bad rows: nothing ran."
        elif summary.interrupted:
            view.state = JobState.STOPPED
            view.message = f"Stopped: {summary.done} of {summary.total} stored. Resume renders the rest."
        elif summary.failed or summary.done < summary.total:
            view.state = JobState.FAILED
            view.message = f"{len(summary.failed)} of {summary.total} images failed; resume tries them again."
        else:
            view.state = JobState.FINISHED
            view.message = f"Finished: {summary.total} images, {summary.rendered} rendered in {summary.seconds:.1f} s."
        if summary is not None:
            view.done, view.total = summary.done, summary.total

    def _from_disk(self, folder: Path) -> JobView:
        """A job folder this process does not run: its last summary and its index."""
        jobdir = JobDir(folder)
        info = jobdir.load_job()
        summary = jobdir.read_summary()
        records = jobdir.read_index()
        stamp = max((p.stat().st_mtime for p in (jobdir.job_file, jobdir.index_file) if p.exists()), default=0.0)
        view = JobView(info.job if info else folder.name, folder, JobState.STOPPED, done=len(records), started=stamp)
        view.items = [
            ItemView(r.request_id, r.subject, r.scene, r.index, ItemState.DONE)
            for r in sorted(records.values(), key=lambda r: (r.row, r.scene, r.index))
        ]
        if summary is None:
            view.message = "The web process ended during its first run; resume renders the rest."
            view.total = len(records)
            return view
        view.total, view.failed = summary.total, len(summary.failed)
        view.done = min(view.done, summary.total)
        view.items += [
            ItemView(f["request_id"], f["subject"], f["scene"], f["index"], ItemState.FAILED, f["reason"])
            for f in summary.failed
        ]
        if summary.seconds and summary.rendered:
            view.images_per_minute = 60.0 * summary.rendered / summary.seconds
        if summary.interrupted or (view.done < summary.total and not summary.failed):
            view.message = f"Stopped: {view.done} of {summary.total} stored. Resume renders the rest."
        elif summary.failed:
            view.state = JobState.FAILED
            view.message = f"{len(summary.failed)} of {summary.total} images failed; resume tries them again."
        else:
            view.state = JobState.FINISHED
            view.message = f"Finished: {summary.total} images."
        return view
