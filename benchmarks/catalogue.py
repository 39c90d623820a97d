"""Catalogue jobs (a benchmark, not a test): the runner against plain concurrent Generate calls.

    python -m benchmarks.catalogue --out bench-results/catalogue.json

Two stand-in generator replicas (`python -m services.generator`, own processes, one shared storage folder);
the same number of 1-image requests, the same steps and requests in flight, sent (a) by `catalogue run` (a
subprocess, as operators run it; `--concurrency` on each replica) and (b) as plain concurrent `Generate`
calls from one asyncio client over the round_robin channel (`--concurrency` x 2 in flight).
Reported: the runner's wall time over the plain calls' (goal <= 1.05), the runner's RSS at the 100th and
the last image (goal: <= 10% growth), and a second run of the finished job, which finds every image stored
and renders none (goal: <= 2 s per 1,000 items to find what is stored).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import psutil

from benchmarks.report import save_report
from benchmarks.soak import ROOT, STANDIN, Server
from client.api import generate_request
from productinaction.v1 import generator_pb2_grpc

TINY_SCENES = ("flowers", "beach", "dogs", "fire", "minimal")  # what ListTemplates offers the tiny products
REPLICAS = 2


def _catalogue(path: Path, per_scene: int) -> int:
    rows = [f"{p},,{';'.join(TINY_SCENES)},{per_scene},,,,false" for p in ("tiny-star", "tiny-mug")]
    path.write_text("product,photo,scenes,images,size,adapters,seed,upscale\n" + "\n".join(rows) + "\n")
    return 2 * len(TINY_SCENES) * per_scene


async def _plain(target: str, n: int, concurrency: int, tag: str) -> float:
    """n 1-image requests like the runner's (the template's steps), `concurrency` in flight, one target."""
    from client.channel import open_channel

    channel = open_channel(target)
    stub = generator_pb2_grpc.GeneratorStub(channel)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async def slot() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            scene = TINY_SCENES[i % len(TINY_SCENES)]
            request = generate_request(
                product_id=("tiny-star", "tiny-mug")[i % 2],
                template_id=scene,
                num_images=1,
                seed=i,
                request_id=f"{tag}-{i}",
            )
            async for _ in stub.Generate(request, timeout=600):
                pass

    started = time.perf_counter()
    await asyncio.gather(*(slot() for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    await channel.close()
    return seconds


def _runner(args, target: str, file: Path, out: Path, storage: Path, job: str) -> dict:
    """`catalogue run` as a subprocess; its wall time and RSS at the 100th and the last stored image."""
    command = [
        sys.executable,
        *("-m", "client.cli", "--generator", target, "catalogue", "run", str(file)),
        *(f"--out={out}", f"--job={job}", f"--storage={storage}", f"--concurrency={args.concurrency}"),
        "--log-format=json",
    ]
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ps = psutil.Process(proc.pid)
    index = out / "index.jsonl"
    rss: dict[str, float] = {}
    peak = 0.0
    while proc.poll() is None:
        try:
            now = ps.memory_info().rss / 1e6
        except psutil.NoSuchProcess:
            break
        if not now:  # exited, not yet reaped
            break
        peak = max(peak, now)
        lines = index.read_text().count("\n") if index.exists() else 0
        if lines >= 100 and "at_100_mb" not in rss:
            rss["at_100_mb"] = now
        rss["last_mb"] = now
        time.sleep(0.05)
    seconds = time.perf_counter() - started
    if proc.wait() != 0:
        raise RuntimeError(f"catalogue run exited with {proc.returncode}")
    summary = json.loads((out / "summary.json").read_text())
    return {"seconds": seconds, **rss, "peak_mb": peak, "rendered": summary["rendered"], "done": summary["done"]}


async def bench(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="pia-catalogue-") as tmp:
        root = Path(tmp)
        storage = root / "images"
        server_args = SimpleNamespace(
            model=f"standin:step={args.step}",
            devices="cpu:1",
            products_dir=args.products_dir,
            adapters_dir=args.adapters_dir,
            pipeline=STANDIN,
            clients=16 * args.concurrency,  # max-queue: never full in this benchmark
        )
        servers = [Server(server_args, storage) for _ in range(REPLICAS)]
        target = "ipv4:" + ",".join(f"127.0.0.1:{s.port}" for s in servers)
        try:
            for server in servers:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                    await server.wait_serving(channel)
            file = root / "catalogue.csv"
            n = _catalogue(file, args.per_scene)
            in_flight = args.concurrency * REPLICAS  # what the runner keeps in flight: --concurrency on each
            await _plain(target, 20, in_flight, "warm")  # both replicas and the channel
            plain_s = await _plain(target, n, in_flight, "plain")
            run = await asyncio.to_thread(_runner, args, target, file, root / "job", storage, "bench")
            again = await asyncio.to_thread(_runner, args, target, file, root / "job", storage, "bench")
        finally:
            for server in servers:
                server.stop()
    growth = run["last_mb"] / run["at_100_mb"] - 1 if run.get("at_100_mb") else None
    return {
        "images": n,
        "replicas": REPLICAS,
        "concurrency_per_replica": args.concurrency,
        "stand_in_step_s": args.step,
        "steps": 25,  # the generator's default: neither the catalogue nor the plain calls set any
        "plain_generate_s": plain_s,
        "runner_s": run["seconds"],
        "runner_over_plain": run["seconds"] / plain_s,
        "runner_rendered": run["rendered"],
        "runner_rss_at_100_mb": run.get("at_100_mb"),
        "runner_rss_last_mb": run.get("last_mb"),
        "runner_rss_growth": growth,
        "resume_all_stored_s": again["seconds"],
        "resume_rendered": again["rendered"],  # must be 0: every image was stored
        "resume_done": again["done"],
        "resume_s_per_1000_items": again["seconds"] * 1000 / n,
        "goals": {"runner_over_plain": "<= 1.05", "runner_rss_growth": "<= 0.10", "resume_s_per_1000_items": "<= 2"},
        "host": platform.node(),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench-results" / "catalogue.json")
    p.add_argument("--per-scene", type=int, default=100, help="images per product and scene (2 x 5 x this)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight on each replica")
    p.add_argument("--step", type=float, default=0.002, help="the stand-in's seconds per step (25 steps an image)")
    p.add_argument("--products-dir", default=None)
    p.add_argument("--adapters-dir", default=None)
    args = p.parse_args(argv)
    report = asyncio.run(bench(args))
    return save_report(args.out, report)


if __name__ == "__main__":
    main()
