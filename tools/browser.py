"""Headless Debian chromium through Playwright, kept to this machine: shared by the browser tests
and the screenshot tool. No browser download: Playwright drives /usr/bin/chromium.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

if TYPE_CHECKING:
    from playwright.async_api import Page

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@asynccontextmanager
async def local_page(width: int = 1400, height: int = 1000) -> AsyncIterator[tuple[Page, list[str]]]:
    """A fresh page; requests leaving 127.0.0.1/localhost are blocked and listed in the second value."""
    if not Path(CHROMIUM).exists():
        raise FileNotFoundError(f"{CHROMIUM} is missing: run `make browser` (apt-get install chromium)")
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        context = await browser.new_context(viewport={"width": width, "height": height})
        external: list[str] = []

        async def local_only(route) -> None:
            host = urlparse(route.request.url).hostname
            if route.request.url.startswith(("data:", "blob:")) or host in ("127.0.0.1", "localhost"):
                await route.continue_()
            else:
                external.append(route.request.url)
                await route.abort()

        await context.route("**/*", local_only)
        page = await context.new_page()
        page.set_default_timeout(60_000)
        try:
            yield page, external
        finally:
            await context.close()
            await browser.close()


async def choose(page, elem_id: str, option: str) -> None:
    """Pick an option of a Gradio dropdown the way a user does: open it, click the option."""
    await page.locator(f"#{elem_id} input").click()
    await page.get_by_role("option", name=option, exact=True).click()
