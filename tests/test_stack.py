"""`make run`'s launcher end to end, and what CI runs."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import urllib.request

import pytest

from client.api import GeneratorClient, UpscalerClient
from tests.conftest import ROOT, free_port


@pytest.mark.parametrize("module", ["services.generator", "services.upscaler", "client.web", "client.cli"])
async def test_entry_points_have_help(module):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, "--help", stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    assert "usage" in out.decode().lower()
    if module.startswith("services."):
        assert "--port" in out.decode()


@pytest.mark.slow
async def test_run_stack_serves_all_three_and_stops_on_ctrl_c(tiny_world, tmp_path):
    ports = {name: free_port() for name in ("GENERATOR", "UPSCALER", "WEB")}
    env = dict(os.environ)
    env.update({f"PIA_{name}_PORT": str(port) for name, port in ports.items()})
    env.update(
        PIA_GENERATOR_MODEL=str(tiny_world / "tiny-sd"),
        PIA_GENERATOR_PRODUCTS_DIR=str(tiny_world / "products"),
        PIA_GENERATOR_ADAPTERS_DIR=str(tiny_world / "adapters"),
        PIA_GENERATOR_DEFAULT_SIZE="64",
        PIA_GENERATOR_DEFAULT_STEPS="4",
        PIA_GENERATOR_STORAGE=str(tmp_path / "out"),
        PIA_UPSCALER_STORAGE=str(tmp_path / "out"),
        PIA_UPSCALER_MODEL=str(tiny_world / "tiny-sr"),
        PIA_WEB_HOST="127.0.0.1",
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tools.run_stack", cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    generator = GeneratorClient(f"127.0.0.1:{ports['GENERATOR']}")
    upscaler = UpscalerClient(f"127.0.0.1:{ports['UPSCALER']}")
    try:
        for _ in range(600):
            if await generator.serving() and await upscaler.serving():
                break
            assert proc.returncode is None, (await proc.stdout.read()).decode()[-3000:]
            await asyncio.sleep(0.5)
        assert await generator.serving() and await upscaler.serving()
        assert {p.id for p in await generator.products()} == {"tiny-star", "tiny-mug"}
        page = ""
        for _ in range(120):
            try:
                page = await asyncio.to_thread(
                    lambda: urllib.request.urlopen(f"http://127.0.0.1:{ports['WEB']}/", timeout=5).read().decode()
                )
                break
            except OSError:
                await asyncio.sleep(0.5)
        assert "gradio" in page.lower()
    finally:
        await generator.close()
        await upscaler.close()
        proc.send_signal(signal.SIGINT)
        out = (await asyncio.wait_for(proc.stdout.read(), 90)).decode()
        await asyncio.wait_for(proc.wait(), 30)
    assert proc.returncode == 0, out[-3000:]
    assert "stopped" in out and "Traceback" not in out


def test_requirements_pin_torch_and_ci_runs_make_test():
    # The Dockerfiles and the requirements/ files: tests/test_docker.py.
    assert re.search(r"^torch==2\.13\.0$", (ROOT / "requirements" / "torch.txt").read_text(), re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert readme.index("make run") < readme.index("## Using it") and "make test" in readme
