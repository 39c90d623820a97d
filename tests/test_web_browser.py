"""The web page in a real browser: Debian's chromium driven by Playwright, the page served by
`python -m client.web` in a subprocess, against real generator and upscaler servers.

Screenshots go to artifacts/ (docs/screenshot.png comes from `python -m tools.screenshot`, on the demo model).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port
from tools.browser import CHROMIUM, choose, local_page

pytestmark = pytest.mark.browser

# Enough steps that 3 images take a while, so the first one can be seen before the last exists.
STEPS = 5


@asynccontextmanager
async def serve_page(generator: str, upscaler: str, tmp_path: Path) -> AsyncIterator[str]:
    """`python -m client.web` on a free port; yields its URL once it answers."""
    port = free_port()
    log = (tmp_path / f"web-{port}.log").open("w")
    env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp_path / "gradio"), "PYTHONUNBUFFERED": "1"}
    args = ["--host", "127.0.0.1", "--port", str(port), "--generator", generator, "--upscaler", upscaler]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "client.web",
        *args,
        "--health-every-s",
        "1",
        "--files-dir",
        str(tmp_path / "files"),
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=asyncio.subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.returncode is not None:
                raise RuntimeError(f"web page exited: {(tmp_path / f'web-{port}.log').read_text()[-3000:]}")
            try:
                await asyncio.to_thread(urllib.request.urlopen, url, timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"web page not up on {url}") from None
                await asyncio.sleep(0.3)
        yield url
    finally:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()
        log.close()


@pytest.fixture
async def browser_page() -> AsyncIterator:
    """A fresh headless chromium page; requests leaving this machine are blocked and recorded."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make browser` (apt-get install chromium)")
    async with local_page() as (page, external):
        yield page, external


async def gallery_count(page) -> int:
    return await page.locator("#gallery button.thumbnail-lg").count()


async def test_generate_stream_and_upscale_in_a_browser(generator, upscaler, browser_page, artifacts, tmp_path):
    page, external = browser_page
    started = time.monotonic()
    async with serve_page(f"127.0.0.1:{generator.port}", f"127.0.0.1:{upscaler.port}", tmp_path) as url:
        await page.goto(url)
        banner = page.locator("#status-banner")
        await banner.get_by_text("Generator and upscaler are ready").wait_for()

        # Product and scene; the prompt preview follows.
        await choose(page, "product", "Tiny Mug · tiny")
        await choose(page, "template", "Beach")
        preview = page.locator("#prompt-preview textarea")
        await page.wait_for_function(
            "el => el.value.includes('<tiny-mug>') && el.value.includes('beach')", arg=await preview.element_handle()
        )

        await page.locator("#num-images input[type=number]").fill("3")
        await page.locator("#num-images input[type=number]").press("Enter")
        await page.get_by_text("Advanced").click()
        await page.locator("#steps input").fill(str(STEPS))
        await page.locator("#steps input").press("Tab")

        await page.locator("#generate").click()
        # Watch the gallery while the request runs: it must hold 1 image while Stop is still enabled.
        seen: list[tuple[float, int, bool]] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            count = await gallery_count(page)
            running = await page.locator("#stop").is_enabled()
            seen.append((round(time.monotonic() - started, 2), count, running))
            if count == 3 and not running:
                break
            await asyncio.sleep(0.1)
        counts = [count for _, count, _ in seen]
        assert counts[-1] == 3, seen
        assert (1, True) in {(count, running) for _, count, running in seen}, seen
        assert counts == sorted(counts), "the gallery only grows"
        await page.get_by_text("Done: 3 image(s)").wait_for()
        await page.screenshot(path=str(artifacts / "web-generated.png"), full_page=True)

        # Select the first image: its settings show; upscale it.
        await page.locator("#gallery button.thumbnail-lg").first.click()
        details = page.locator("#details")
        await details.get_by_text("Image #1").wait_for()
        # Steps from the form, guidance left to the server (its default, 7), product tokens escaped.
        assert f"{STEPS} · 7" in await details.inner_text() and "<tiny-mug>" in await details.inner_text()
        await page.locator("#upscale").click()
        upscaled = page.locator("#upscaled img")
        await upscaled.wait_for()
        await page.locator("#upscale-status").get_by_text("Upscaled to 256 × 256").wait_for()
        width = await upscaled.evaluate("img => img.complete ? img.naturalWidth : 0")
        assert width == 256
        await page.locator("#download").wait_for()
        await page.screenshot(path=str(artifacts / "web-upscaled.png"), full_page=True)
    assert external == [], "the page must not need the internet"


async def test_page_loads_with_the_generator_down(upscaler, browser_page, artifacts, tmp_path):
    page, external = browser_page
    closed = f"127.0.0.1:{free_port()}"
    async with serve_page(closed, f"127.0.0.1:{upscaler.port}", tmp_path) as url:
        await page.goto(url)
        banner = page.locator("#status-banner")
        await banner.get_by_text("The image generator is unreachable").wait_for()
        assert closed in await banner.inner_text()
        assert "upscaler is unreachable" not in await banner.inner_text()

        await page.locator("#generate").click()
        await page.locator("#status").get_by_text("The generator is unreachable").wait_for()
        await page.screenshot(path=str(artifacts / "web-generator-down.png"), full_page=True)
        assert "Traceback" not in await page.content()
    assert external == []
