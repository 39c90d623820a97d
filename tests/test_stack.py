"""`make run`'s launcher end to end, and the packaging that is linted rather than built."""

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


def _dockerfile(name: str) -> list[tuple[str, str]]:
    text = (ROOT / name).read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


@pytest.mark.parametrize(
    ("name", "port", "module"),
    [
        ("Dockerfile.generator", "50051", "services.generator"),
        ("Dockerfile.upscaler", "50052", "services.upscaler"),
    ],
)
def test_dockerfiles_are_valid(name, port, module):
    instructions = _dockerfile(name)
    known = {
        "FROM",
        "ARG",
        "ENV",
        "RUN",
        "COPY",
        "WORKDIR",
        "USER",
        "EXPOSE",
        "HEALTHCHECK",
        "ENTRYPOINT",
        "CMD",
        "VOLUME",
        "STOPSIGNAL",
        "LABEL",
    }
    assert {op for op, _ in instructions} <= known
    ops = [op for op, _ in instructions]
    assert ops[0] in ("ARG", "FROM") and "FROM" in ops
    args = dict(i.split("=", 1) if "=" in i else (i, "") for op, i in instructions if op == "ARG")
    assert args.get("TORCH_VERSION") == "2.13.0"  # pinned, like requirements.txt
    for op, rest in instructions:
        if op == "COPY" and "--from=" not in rest:
            sources = [s for s in rest.split()[:-1] if not s.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), f"{name}: COPY source {source} is missing"
    assert any(op == "EXPOSE" and port in rest for op, rest in instructions)
    user = [rest for op, rest in instructions if op == "USER"]
    assert user and not user[-1].startswith(("root", "0"))
    assert any(op == "HEALTHCHECK" and "grpc_health" in rest for op, rest in instructions)
    assert any(op == "ENTRYPOINT" and module in rest for op, rest in instructions)


def test_requirements_pin_torch_and_ci_runs_make_test():
    assert re.search(r"^torch==2\.13\.0$", (ROOT / "requirements.txt").read_text(), re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert readme.index("make run") < readme.index("## Using it") and "make test" in readme
