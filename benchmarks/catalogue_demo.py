"""The demo catalogue on the demo model, 1 replica against 2 (a benchmark, not a test).

    python -m benchmarks.catalogue_demo --out bench-results/catalogue-demo.json

`demo/catalogue.csv` (both demo products in every scene, a placed product photo; upscaling left out: this
measures generation) run by `catalogue run` against one `python -m services.generator` on the model's
defaults, then against two replicas with one CPU thread each (on a 2-core machine: the same cores, split).
Reported: seconds and images per minute for each, side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from benchmarks.report import save_report
from benchmarks.soak import ROOT, _free_port, wait_serving


async def _serving(port: int, process: subprocess.Popen) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await wait_serving(channel, process, timeout=600)


def run(replicas: int, work: Path, concurrency: int) -> dict:
    text = (ROOT / "demo" / "catalogue.csv").read_text().replace(",true\n", ",false\n")
    (work / "catalogue.csv").write_text(text.replace("catalogue-photo.png", str(ROOT / "demo" / "catalogue-photo.png")))
    ports = [_free_port() for _ in range(replicas)]
    threads = ["--cpu-threads", "1"] if replicas > 1 else []
    storage = work / "images"
    server = [sys.executable, "-m", "services.generator", f"--storage={storage}", "--log-level=WARNING", *threads]
    servers = [
        subprocess.Popen(
            [*server, f"--port={p}"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for p in ports
    ]
    try:
        for p, server in zip(ports, servers, strict=True):
            asyncio.run(_serving(p, server))
        target = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports)
        started = time.perf_counter()
        job = [f"--out={work / 'job'}", "--job=demo", f"--storage={storage}", f"--concurrency={concurrency}"]
        subprocess.run(
            [
                sys.executable,
                "-m",
                "client.cli",
                "--generator",
                target,
                "catalogue",
                "run",
                str(work / "catalogue.csv"),
                *job,
            ],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        seconds = time.perf_counter() - started
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(60)
    rendered = json.loads((work / "job" / "summary.json").read_text())["rendered"]
    return {"replicas": replicas, "seconds": seconds, "images": rendered, "images_per_minute": 60 * rendered / seconds}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench-results" / "catalogue-demo.json")
    p.add_argument("--concurrency", type=int, default=4)
    args = p.parse_args(argv)
    report = {}
    for replicas in (1, 2):
        with tempfile.TemporaryDirectory(prefix="pia-catalogue-demo-") as tmp:
            report[f"{replicas}_replicas"] = run(replicas, Path(tmp), args.concurrency)
    return save_report(args.out, report)


if __name__ == "__main__":
    main()
