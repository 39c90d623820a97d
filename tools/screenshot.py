"""Retake docs/screenshot.png: the whole `make run` stack on the demo model, driven in chromium.

    python -m tools.screenshot [--out docs/screenshot.png]

Starts tools.run_stack on free ports with a temporary output folder, generates six images of the
demo product split-star on the beach, upscales the first, and saves a full-page screenshot.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tools.browser import choose, local_page
from tools.run_stack import ROOT

PRODUCT, SCENE, IMAGES = "Split Star · demo", "Beach", 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the stack exited with code {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer in {timeout:.0f}s") from None
            time.sleep(0.5)


# Generous: on a busy 2-core machine six 20-step images can take several minutes.
TIMEOUT_MS = 900_000


async def capture(url: str, out: Path) -> None:
    async with local_page(1400, 1000) as (page, external):
        try:
            await page.goto(url)
            banner = page.locator("#status-banner")
            await banner.get_by_text("Generator and upscaler are ready").wait_for(timeout=TIMEOUT_MS)
            await choose(page, "product", PRODUCT)
            await choose(page, "template", SCENE)
            await page.locator("#num-images input[type=number]").fill(str(IMAGES))
            await page.locator("#num-images input[type=number]").press("Enter")
            await page.locator("#generate").click()
            await page.get_by_text(f"Done: {IMAGES} image(s)").wait_for(timeout=TIMEOUT_MS)
            await page.locator("#gallery button.thumbnail-lg").first.click()
            await page.locator("#upscale").click()
            await page.locator("#upscaled img").wait_for(timeout=TIMEOUT_MS)
            await page.locator("#download").wait_for()
        except Exception:
            # What the page showed when it went wrong, beside the intended file.
            await page.screenshot(path=str(out.with_name(f"{out.stem}-failed.png")), full_page=True)
            raise
        out.parent.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(out), full_page=True)
    if external:
        raise RuntimeError(f"the page asked for the internet: {external[:3]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshot.png")
    args = parser.parse_args()
    ports = {name: str(_free_port()) for name in ("GENERATOR", "UPSCALER", "WEB")}
    with tempfile.TemporaryDirectory() as outputs:
        env = {**os.environ, **{f"PIA_{name}_PORT": port for name, port in ports.items()}}
        env.update(PIA_GENERATOR_STORAGE=outputs, PIA_UPSCALER_STORAGE=outputs)
        stack = subprocess.Popen([sys.executable, "-m", "tools.run_stack"], cwd=ROOT, env=env)
        try:
            url = f"http://127.0.0.1:{ports['WEB']}/"
            _wait_http(url, stack)
            asyncio.run(capture(url, args.out))
        finally:
            stack.send_signal(signal.SIGINT)
            stack.wait(timeout=60)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
