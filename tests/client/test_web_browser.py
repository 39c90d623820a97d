"""The web page in a real browser: Debian's chromium driven by Playwright.

Most cases share one `make run`-style stack (tools.run_stack on free ports, on the shipped demo
model: 32 × 32 images, fast on a CPU), in this order: a run with a style adapter (preview, sizes,
upscale, the start-up log), out-of-range numbers, Stop, a closed tab, and last the generator
killed under the launcher. Screenshots go to artifacts/ (docs/screenshot.png comes from
`python -m tools.screenshot`).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.async_api import TimeoutError as PlaywrightTimeout

from tests.helpers import ROOT, free_port, until, web_process
from tools.browser import CHROMIUM, choose, local_page

pytestmark = pytest.mark.browser

PRODUCT, SCENE, STYLE = "Split Star · demo", "Beach", "Night"


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
    async with web_process(process, f"http://127.0.0.1:{port}/", log, (tmp_path / f"web-{port}.log")) as url:
        yield url


@pytest.fixture
async def browser_page() -> AsyncIterator:
    """A fresh headless chromium page; requests leaving this machine are blocked and recorded."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make browser` (apt-get install chromium)")
    async with local_page() as (page, external):
        yield page, external


@dataclass
class Stack:
    """tools.run_stack running on free ports; everything it prints goes to `log`."""

    process: subprocess.Popen
    url: str
    log: Path
    metrics_port: int

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def metric(self, name: str, labels: str = "") -> float:
        """A counter of the generator's Prometheus endpoint (summed over label sets matching `labels`)."""
        body = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        pattern = re.compile(rf"^{name}\{{([^}}]*)\}} ([0-9.e+]+)$", re.M)
        return sum(float(value) for found, value in pattern.findall(body) if labels in found)

    def generator_pid(self) -> int:
        return int(re.findall(r" generator\[(\d+)\]", self.text())[-1])


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    """One `make run` stack for the module (the shipped demo models, a temporary output folder)."""
    folder = tmp_path_factory.mktemp("stack")
    ports = {name: free_port() for name in ("GENERATOR", "UPSCALER", "WEB")}
    metrics_port = free_port()
    env = {**os.environ, **{f"PIA_{name}_PORT": str(port) for name, port in ports.items()}}
    env.update(
        PIA_GENERATOR_STORAGE=str(folder / "out"),
        PIA_UPSCALER_STORAGE=str(folder / "out"),
        PIA_GENERATOR_METRICS_PORT=str(metrics_port),
        PIA_WEB_HEALTH_EVERY_S="1",
        PIA_WEB_FILES_DIR=str(folder / "files"),
        GRADIO_TEMP_DIR=str(folder / "gradio"),
        PYTHONUNBUFFERED="1",
    )
    log = folder / "stack.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "tools.run_stack"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    stack = Stack(process, f"http://127.0.0.1:{ports['WEB']}/", log, metrics_port)
    try:
        deadline = time.monotonic() + 240
        while "services.generator.app: serving" not in stack.text() or "upscaler.app: serving" not in stack.text():
            assert process.poll() is None, stack.text()[-3000:]
            assert time.monotonic() < deadline, stack.text()[-3000:]
            time.sleep(0.5)
        yield stack
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode == 0 and stack.text().rstrip().endswith("stopped"), stack.text()[-2000:]


async def open_page(page, stack: Stack) -> None:
    await page.goto(stack.url)
    await page.locator("#status-banner").get_by_text("Generator and upscaler are ready").wait_for(timeout=120_000)
    await choose(page, "product", PRODUCT)
    await choose(page, "template", SCENE)


async def set_number(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    await box.fill(value)
    await box.press("Tab")


async def advanced(page, steps: int) -> None:
    await page.get_by_text("Advanced").click()
    await set_number(page, "steps", str(steps))


async def status_text(page) -> str:
    return await page.locator("#status").inner_text()


def problems(log: str) -> list[str]:
    """Warnings and tracebacks in a log: Python warnings, WARNING/ERROR records, 'Traceback'."""
    pattern = re.compile(r"Traceback|Warning:|\bWARNING\b|\bERROR\b|\bCRITICAL\b|warnings\.warn")
    return [line for line in log.splitlines() if pattern.search(line)]


async def test_style_run_preview_sizes_and_upscale(stack, browser_page, artifacts):
    page, external = browser_page
    await open_page(page, stack)
    await advanced(page, steps=4)
    await choose(page, "style", STYLE)
    preview = page.locator("#prompt-preview textarea")
    await page.wait_for_function("el => el.value.endsWith(', at night')", arg=await preview.element_handle())
    final_prompt = await preview.input_value()
    assert final_prompt == "a photo of <split-star> on the beach, at night"

    await set_number(page, "num-images", "2")
    await page.locator("#generate").click()
    # The gallery grows while the request runs: one image shown while Stop is still enabled.
    seen: set[tuple[int, bool]] = set()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        count = await page.locator("#gallery button.thumbnail-lg").count()
        running = await page.locator("#stop").is_enabled()
        seen.add((count, running))
        if count == 2 and not running:
            break
        await asyncio.sleep(0.1)
    assert (1, True) in seen and (2, False) in seen, seen
    await page.get_by_text("Done: 2 image(s)").wait_for()

    # The stored image's prompt is the preview, word for word; names up front, ids under Technical details.
    await page.locator("#gallery button.thumbnail-lg").first.click()
    details = page.locator("#details")
    await details.get_by_text("Image #1").wait_for()
    summary = await details.inner_text()
    assert final_prompt in summary
    assert "Split Star" in summary and "Beach" in summary and "Night × 1" in summary
    assert "demo-beach" not in summary and "cpu" not in summary and "file://" not in summary
    await page.get_by_text("Technical details").click()
    technical = await page.locator("#technical").inner_text()
    assert "demo-beach" in technical and "file://" in technical and "cpu" in technical
    # "Random seed" was ticked: the Seed box shows the seed this run used.
    seed = int(re.search(r"Seed\s+(\d+)", summary)[1])
    assert await page.locator("#seed input").input_value() == str(seed)

    # True sizes are written beside the images, which are scaled only with a pixel-exact filter.
    assert "32 × 32 px" in await page.locator("#gallery").inner_text()
    assert "32 × 32 px" in summary
    await page.locator("#upscale").click()
    await page.locator("#upscale-status").get_by_text("Upscaled to 128 × 128 px (from 32 × 32 px)").wait_for()
    upscaled = page.locator("#upscaled img")
    await upscaled.wait_for()
    await page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=await upscaled.element_handle())
    assert await upscaled.evaluate("img => img.naturalWidth") == 128
    shown = await page.locator("#gallery img").evaluate_all(
        "imgs => imgs.map(i => [i.getBoundingClientRect().width, getComputedStyle(i).imageRendering])"
    )
    up_width, up_rendering = await upscaled.evaluate(
        "img => [img.getBoundingClientRect().width, getComputedStyle(img).imageRendering]"
    )
    assert shown and all(rendering == "pixelated" for _, rendering in shown), shown
    assert up_rendering == "pixelated"
    assert up_width >= max(width for width, _ in shown) > 0, (up_width, shown)
    await page.screenshot(path=str(artifacts / "web-upscaled.png"), full_page=True)

    # A new run clears the previous upscale and its download button.
    await set_number(page, "num-images", "1")
    await page.locator("#generate").click()
    await page.get_by_text("Done: 1 image(s)").wait_for(timeout=120_000)
    assert await page.locator("#upscaled img").count() == 0
    assert not await page.locator("#download").is_visible()
    assert await page.locator("#upscale-status").inner_text() == ""
    assert external == [], "the page must not need the internet"

    # `make run`'s log, start-up and first use (two adapters stacked, an upscale) included: no warnings.
    assert problems(stack.text()) == []


async def test_numbers_out_of_range_are_said_on_the_page(stack, browser_page):
    page, _ = browser_page
    await open_page(page, stack)
    before = stack.text()
    await set_number(page, "num-images", "1000")
    await page.locator("#generate").click()
    message = "Number of images must be between 1 and 16; you typed 1000."
    await page.locator("#status").get_by_text(message).wait_for()
    await set_number(page, "num-images", "1")
    await advanced(page, steps=1000)
    await page.locator("#generate").click()
    await page.locator("#status").get_by_text("Steps must be between 1 and 150, got 1000.").wait_for()
    await asyncio.sleep(1)  # anything the server would print about it
    assert problems(stack.text()[len(before) :]) == []


async def test_keeping_the_exact_product_previews_the_scene_prompt(stack, browser_page, tmp_path):
    from demo.placement_eval import product_photo

    page, _ = browser_page
    await open_page(page, stack)
    photo = tmp_path / "star.png"
    product_photo("split-star", "white", size=64)[0].save(photo)
    await page.get_by_text("Keep my exact product (use a photo)").click()
    await page.locator("#keep-product input").check()
    await page.locator("#product-photo input[type=file]").set_input_files(str(photo))
    preview = page.locator("#prompt-preview textarea")
    expected = "Around your exact product: on the beach, empty"  # the demo beach's scene prompt and backdrop
    handle = await preview.element_handle()
    await page.wait_for_function("([el, want]) => el.value === want", arg=[handle, expected])
    await page.locator("#keep-product input").uncheck()
    await page.wait_for_function("el => el.value.startsWith('a photo of <split-star>')", arg=handle)


async def test_stop_says_how_many_images_were_kept(stack, browser_page):
    page, _ = browser_page
    await open_page(page, stack)
    cancelled = stack.metric("pia_requests_total", 'outcome="cancelled"')
    # Long enough that Stop always lands mid-run: 4 images of 20 steps finished within the checks below
    # on a fast CI machine (the run said "Done" before Stop was pressed).
    await set_number(page, "num-images", "16")
    await advanced(page, steps=150)
    await page.get_by_text("Show step previews while generating").click()
    await page.locator("#generate").click()
    await page.locator("#status").get_by_text(re.compile(r"Image \d+ of 16: step")).wait_for(timeout=120_000)
    # The live preview's frame is the preview itself, enlarged by a whole number with a pixel-exact filter.
    live = page.locator("#preview img")
    await live.wait_for(timeout=60_000)
    caption = await page.locator("#preview figcaption").inner_text()
    side, factor = map(int, re.search(r"(\d+) × \d+ px, shown ×(\d+)", caption).groups())
    box = await live.bounding_box()
    assert (box["width"], box["height"]) == (side * factor, side * factor) and 128 <= side * factor <= 256, caption
    assert await live.evaluate("img => getComputedStyle(img).imageRendering") == "pixelated"
    await page.locator("#stop").click()
    stopped = re.compile(r"Stopped after ([0-9]|1[0-5]) of 16 images")
    try:
        await page.locator("#status").get_by_text(stopped).wait_for(timeout=120_000)
    except PlaywrightTimeout:
        # Once seen with the suite's other worker busy: say what the page said instead.
        raise AssertionError(f"status after Stop: {await page.locator('#status').inner_text()!r}") from None
    assert await page.locator("#generate").is_enabled() and not await page.locator("#stop").is_enabled()
    for _ in range(100):
        if stack.metric("pia_requests_total", 'outcome="cancelled"') > cancelled:
            break
        await asyncio.sleep(0.2)
    assert stack.metric("pia_requests_total", 'outcome="cancelled"') == cancelled + 1


async def test_closing_the_tab_cancels_its_run(stack, browser_page):
    page, _ = browser_page
    await open_page(page, stack)
    cancelled = stack.metric("pia_requests_total", 'outcome="cancelled"')
    images = stack.metric("pia_images_generated_total")
    await set_number(page, "num-images", "8")
    await advanced(page, steps=150)  # a run that cannot finish before the tab closes
    await page.locator("#generate").click()
    await page.locator("#status").get_by_text(re.compile(r"Image \d of 8: step")).wait_for(timeout=120_000)
    await page.close()
    # The generator drops the request at its next step: seen in its metrics, and in the page's log.
    for _ in range(150):
        if stack.metric("pia_requests_total", 'outcome="cancelled"') > cancelled:
            break
        await asyncio.sleep(0.2)
    assert stack.metric("pia_requests_total", 'outcome="cancelled"') == cancelled + 1
    # The page's unload ran; it cancels the run, unless Gradio already cancelled the handler when the page
    # went (then "nothing running"): either way the request above was cancelled, once.
    await until(lambda: "a tab closed" in stack.text(), 20, "the page's unload logged")
    assert re.search(r"a tab closed(: nothing running| during a run: cancelling its requests)", stack.text())
    await asyncio.sleep(3)
    assert stack.metric("pia_images_generated_total") - images < 8


async def test_generator_killed_under_the_launcher_comes_back(stack, browser_page, artifacts):
    page, _ = browser_page
    await open_page(page, stack)
    os.kill(stack.generator_pid(), signal.SIGKILL)
    banner = page.locator("#status-banner")
    await banner.get_by_text("The image generator is unreachable").wait_for(timeout=30_000)
    await page.screenshot(path=str(artifacts / "web-generator-restarting.png"), full_page=True)
    assert "generator was killed by SIGKILL; restarting it in 1 s" in stack.text()
    assert stack.process.poll() is None, "the launcher keeps the page and the upscaler up"
    await banner.get_by_text("Generator and upscaler are ready").wait_for(timeout=180_000)
    assert "generator restarted (pid " in stack.text()
    # Products reloaded by themselves; Generate works again.
    await choose(page, "product", PRODUCT)
    await set_number(page, "num-images", "1")
    await advanced(page, steps=2)
    await page.locator("#generate").click()
    await page.get_by_text("Done: 1 image(s)").wait_for(timeout=180_000)


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
