"""The page's Catalogue tab in Debian's chromium: a products × scenes job started from the tab keeps
running in the web process through a page reload, is stopped and resumed from the page (rendering only
what is missing), finishes, and its zip downloads with every image.

The generator is the stand-in (fixed time per step) on a real socket; the page is `python -m client.web`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import zipfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.helpers import ROOT, free_port, standin_server, web_process
from tools.browser import CHROMIUM, choose, local_page

pytestmark = pytest.mark.browser

PRODUCTS = ("Tiny Star", "Tiny Mug")
# As listed once both products are picked: only their category's scenes, so no other "Beach" to tell apart.
SCENES = ("Beach", "Flowers")
IMAGES_PER_SCENE = 3
TOTAL = len(PRODUCTS) * len(SCENES) * IMAGES_PER_SCENE


@asynccontextmanager
async def serve_page(generator: str, tmp_path: Path) -> AsyncIterator[str]:
    """`python -m client.web` on a free port, its catalogue jobs under tmp_path/jobs; yields its URL."""
    port = free_port()
    log_path = tmp_path / "web.log"
    log = log_path.open("w")
    env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp_path / "gradio"), "PYTHONUNBUFFERED": "1"}
    args = ["--host", "127.0.0.1", "--port", str(port), "--generator", generator]
    args += ["--upscaler", f"127.0.0.1:{free_port()}", "--files-dir", str(tmp_path / "files")]
    args += ["--catalogue-dir", str(tmp_path / "jobs")]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "client.web", *args, cwd=ROOT, env=env, stdout=log, stderr=asyncio.subprocess.STDOUT
    )
    async with web_process(process, f"http://127.0.0.1:{port}/", log, log_path) as url:
        yield url


async def open_tab(page, url: str) -> None:
    await page.goto(url)
    await page.get_by_role("tab", name="Catalogue").click()


async def test_a_job_started_on_the_tab_survives_a_reload_and_its_zip_holds_every_image(
    tiny_world, tmp_path, artifacts
):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make browser` (apt-get install chromium)")
    # About 1 s an image on one worker: the job is still running after the reload, when Stop is pressed.
    async with (
        standin_server(tiny_world, tmp_path, step=0.25) as (generator, _, _),
        serve_page(f"127.0.0.1:{generator.port}", tmp_path) as url,
        local_page() as (page, external),
    ):
        await open_tab(page, url)
        for product in PRODUCTS:
            await choose(page, "cat-products", product)
        await page.keyboard.press("Escape")
        for scene in SCENES:
            await choose(page, "cat-scenes", scene)
        await page.keyboard.press("Escape")
        box = page.locator("#cat-images input[type=number]")
        await box.fill(str(IMAGES_PER_SCENE))
        await box.press("Tab")
        await page.locator("#cat-start").click()
        started = page.locator("#cat-problems").get_by_text(re.compile(r"Job \S+ started"))
        await started.wait_for(timeout=30_000)
        job = re.search(r"Job (\S+) started", await started.inner_text())[1]
        assert f"The catalogue is valid: {TOTAL} image(s)." in await page.locator("#cat-problems").inner_text()
        row = page.locator(f'#cat-jobs tr[data-job="{job}"]')
        await row.and_(page.locator('[data-state="running"]')).wait_for(timeout=30_000)

        # Reloading the page (the handler that started it is long gone) neither stops nor hides the job.
        await page.reload()
        await page.get_by_role("tab", name="Catalogue").click()
        listed = page.locator(f'#cat-jobs tr[data-job="{job}"]')
        await listed.wait_for(timeout=30_000)
        assert await listed.get_attribute("data-state") == "running"

        # Stop: the job stays listed, stopped and resumable; Resume renders only what is missing.
        await page.locator("#cat-stop").click()
        await listed.and_(page.locator('[data-state="stopped"]')).wait_for(timeout=30_000)
        folder = tmp_path / "jobs" / job
        stopped = json.loads((folder / "summary.json").read_text())
        assert stopped["interrupted"] and stopped["done"] < TOTAL
        assert "Resume renders the rest" in await page.locator("#cat-detail").inner_text()
        await page.locator("#cat-resume").click()
        await listed.and_(page.locator('[data-state="finished"]')).wait_for(timeout=60_000)
        finished = json.loads((folder / "summary.json").read_text())
        # What Stop cancelled is rendered again, once; a render that had finished as Stop came is stored by
        # the server anyway, and the resumed run finds it stored (recovered) instead of rendering it again.
        lines = [json.loads(line) for line in (folder / "index.jsonl").read_text().splitlines()]
        recovered = sum(r["recovered"] for r in {r["request_id"]: r for r in lines}.values())
        assert finished["rendered"] + recovered == TOTAL - stopped["done"], (stopped, finished, recovered)
        assert re.search(rf"{TOTAL} done, 0 failed, {TOTAL} in all", await page.locator("#cat-detail").inner_text())
        assert await page.locator('#cat-detail tr[data-state="done"]').count() == TOTAL
        thumbnails = page.locator("#cat-gallery button.thumbnail-lg")
        await thumbnails.nth(TOTAL - 1).wait_for(timeout=30_000)
        assert await thumbnails.count() == TOTAL

        zip_button = page.locator("#cat-zip")
        await zip_button.wait_for(timeout=30_000)
        async with page.expect_download() as download_info:
            await zip_button.click()
        download = await download_info.value
        saved = tmp_path / "downloaded.zip"
        await download.save_as(saved)
        with zipfile.ZipFile(saved) as zf:
            names = sorted(zf.namelist())
            assert all(zf.read(n).startswith(b"\x89PNG") for n in names)
        assert len(names) == TOTAL
        assert {n.split("/")[0] for n in names} == {"tiny-star", "tiny-mug"}
        assert {n.split("/")[1].split("-")[0] for n in names} == {"beach", "flowers"}
        await page.screenshot(path=str(artifacts / "web-catalogue.png"), full_page=True)
        assert external == [], "the page must not need the internet"
    assert "Traceback" not in (tmp_path / "web.log").read_text()
