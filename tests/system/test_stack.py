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
from tests.helpers import ROOT, free_port


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


def log_problems(log: str) -> list[str]:
    """Warnings and tracebacks in a log: Python warnings, WARNING/ERROR records, 'Traceback'."""
    pattern = re.compile(r"Traceback|Warning:|\bWARNING\b|\bERROR\b|\bCRITICAL\b|warnings\.warn")
    return [line for line in log.splitlines() if pattern.search(line)]


@pytest.mark.slow
async def test_run_stack_serves_restarts_a_crash_and_stops_on_ctrl_c(tiny_world, tmp_path):
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
    log = tmp_path / "stack.log"
    with log.open("w") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tools.run_stack", cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    generator = GeneratorClient(f"127.0.0.1:{ports['GENERATOR']}")
    upscaler = UpscalerClient(f"127.0.0.1:{ports['UPSCALER']}")
    try:
        for _ in range(600):
            if await generator.serving() and await upscaler.serving():
                break
            assert proc.returncode is None, log.read_text()[-3000:]
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
        # The start-up log of `make run` is quiet: no warnings, no tracebacks.
        assert log_problems(log.read_text()) == []

        # A crashed service is restarted (with a line saying so); the others stay up meanwhile.
        pid = int(re.findall(r" upscaler\[(\d+)\]", log.read_text())[-1])
        os.kill(pid, signal.SIGKILL)
        for _ in range(60):
            if "upscaler was killed by SIGKILL; restarting it in 1 s (crash 1 in a row)" in log.read_text():
                break
            await asyncio.sleep(0.5)
        assert "upscaler was killed by SIGKILL; restarting it in 1 s" in log.read_text()
        assert proc.returncode is None and await generator.serving()
        for _ in range(600):
            if "upscaler restarted (pid" in log.read_text() and await upscaler.serving():
                break
            await asyncio.sleep(0.5)
        assert await upscaler.serving(), log.read_text()[-3000:]
    finally:
        await generator.close()
        await upscaler.close()
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 90)
    out = log.read_text()
    assert proc.returncode == 0, out[-3000:]
    assert out.rstrip().endswith("stopped") and "Traceback" not in out


def test_requirements_pin_torch_and_ci_runs_make_test():
    # The Dockerfiles and the requirements/ files: tests/deploy/test_docker.py.
    assert re.search(r"^torch==2\.13\.0$", (ROOT / "requirements" / "torch.txt").read_text(), re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert readme.index("make run") < readme.index("## Using it") and "make test" in readme
