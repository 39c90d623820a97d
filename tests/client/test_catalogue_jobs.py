"""The web page's job registry (client.catalogue.jobs) against a stand-in generator on a real socket: a job
outlives whoever started it, two run at once, a stopped one resumes with only what is missing, and a new
registry (a restarted web process) lists the jobs it finds on disk."""

from __future__ import annotations

import asyncio
import gc
import zipfile
from pathlib import Path

import pytest

from client.api import GeneratorClient
from client.catalogue.commands import JobOptions
from client.catalogue.jobs import ItemState, JobRegistry, JobState
from client.catalogue.results import JobDir
from client.catalogue.runner import FlowControl
from tests.helpers import standin_server, until


@pytest.fixture(scope="module")
async def generator_target(tiny_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("jobs-generator")
    async with standin_server(tiny_world, root, step=0.04) as (app, _, _):
        yield f"127.0.0.1:{app.port}"


@pytest.fixture
async def client(generator_target):
    client = GeneratorClient(generator_target)
    yield client
    await client.close()


def registry(root: Path, client: GeneratorClient) -> JobRegistry:
    return JobRegistry(root, lambda: client, JobOptions(flow=FlowControl(concurrency=2), zip=True))


def catalogue(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def zipped(folder: Path) -> list[str]:
    with zipfile.ZipFile(JobDir(folder).zip_file) as zf:
        return sorted(zf.namelist())


async def test_a_job_outlives_its_caller_and_two_run_at_once(client, tmp_path):
    jobs = registry(tmp_path / "jobs", client)
    first = catalogue(tmp_path, "first.csv", "product,scenes,images\ntiny-star,beach;flowers,2\n")
    second = catalogue(tmp_path, "second.yaml", "- {product: tiny-mug, scenes: [beach, dogs], images: 1}\n")

    async def handler() -> str:
        """A page's event handler: it starts a job and returns (its task ends, its tab may close)."""
        return jobs.start(first)

    caller = asyncio.create_task(handler())
    a = await caller
    del caller
    gc.collect()
    b = jobs.start(second)
    assert {v.job for v in jobs.jobs()} == {a, b}
    await until(lambda: all(v.state == JobState.RUNNING for v in jobs.jobs()), 30, "both jobs running")
    done_a, done_b = await asyncio.gather(jobs.wait(a), jobs.wait(b))
    assert (done_a.state, done_a.done, done_a.total, done_a.failed) == (JobState.FINISHED, 4, 4, 0)
    assert (done_b.state, done_b.done, done_b.total) == (JobState.FINISHED, 2, 2)
    assert all(i.state == ItemState.DONE for i in done_a.items) and len(done_a.items) == 4
    assert done_a.images_per_minute > 0
    records = JobDir(done_a.folder).read_index().values()
    assert {(r.scene, r.index) for r in records} == {(s, i) for s in ("beach", "flowers") for i in range(2)}
    assert zipped(done_a.folder) == sorted(f"tiny-star/{r.scene}-{r.index}-{r.seed}.png" for r in records)
    assert len(zipped(done_b.folder)) == 2
    # The catalogue file travels with the job: its folder holds what a resume needs.
    assert (done_b.folder / "catalogue.yaml").read_text() == second.read_text()


async def test_a_stopped_job_resumes_with_only_what_is_missing(client, tmp_path):
    jobs = registry(tmp_path / "jobs", client)
    path = catalogue(tmp_path, "big.csv", "product,scenes,images\ntiny-star,beach;flowers;dogs,4\n")
    job = jobs.start(path)
    await until(lambda: 2 <= (jobs.view(job).done or 0), 60, "two images stored")
    assert jobs.stop(job)
    stopped = await jobs.wait(job)
    assert stopped.state == JobState.STOPPED and stopped.done < stopped.total == 12
    assert "Resume" in stopped.message
    stored_before = set(JobDir(stopped.folder).read_index())
    assert len(stored_before) == stopped.done and JobDir(stopped.folder).read_summary().interrupted
    assert not jobs.stop(job), "a stopped job is not running"

    # A restarted web process: a new registry finds the job on disk, stopped, and resumes it.
    again = registry(tmp_path / "jobs", client)
    found = again.view(job)
    assert found is not None and found.state == JobState.STOPPED and found.done == len(stored_before)
    assert [v.job for v in again.jobs()] == [job]
    assert again.resume(job) == job
    finished = await again.wait(job)
    assert (finished.state, finished.done, finished.total) == (JobState.FINISHED, 12, 12)
    summary = JobDir(finished.folder).read_summary()
    assert summary.rendered == 12 - len(stored_before), "only the missing images render"
    assert finished.rendered == summary.rendered
    assert len(zipped(finished.folder)) == 12
    with pytest.raises(ValueError, match="no job"):
        again.resume("nothing-here")


async def test_bad_rows_are_reported_at_once_and_nothing_starts(client, tmp_path):
    jobs = registry(tmp_path / "jobs", client)
    path = catalogue(
        tmp_path, "bad.csv", "product,scenes,images\nno-such,beach,1\ntiny-star,beach,0\ntiny-mug,volcano,1\n"
    )
    problems, images = await jobs.validate(path)
    assert [p.split(",")[0] for p in problems] == ["row 1 (line 2)", "row 2 (line 3)", "row 3 (line 4)"]
    assert "unknown product 'no-such'" in problems[0] and images == 0
    job = jobs.start(path)  # the runner checks again: a bad file never renders
    view = await jobs.wait(job)
    assert view.state == JobState.FAILED and len(view.problems) >= 3 and view.total == 0
