"""Load and soak of the generator (a benchmark, not a test): many clients, many requests, one process.

    python -m benchmarks.soak --out bench-results/soak.json                       # stand-in model
    python -m benchmarks.soak --model .cache/embedded/tiny-sd --pipeline ''      # the tiny real model

The generator runs as operators run it (`python -m services.generator`, its own process, local
storage), so its memory and open files are measured apart from the clients'. Reported: latency
p50/p99, throughput, errors, every announced image read back, and the server's RSS and open file
descriptors after warm-up and at the end (the goal: RSS grows at most 10% after warm-up).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.report import save_report
from client.api import generate_request
from productinaction.v1 import generator_pb2_grpc
from testkit.standin import FACTORY

ROOT = Path(__file__).resolve().parent.parent
STANDIN = FACTORY
os.environ.setdefault("PIA_ALLOW_TEST_PIPELINES", "1")  # benchmarks run the testkit stand-in


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def wait_serving(channel: grpc.aio.Channel, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until the generator behind `channel` reports SERVING; raises if its process exits first."""
    health = health_pb2_grpc.HealthStub(channel)
    async with asyncio.timeout(timeout):
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the generator exited with {proc.returncode}")
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)


class Server:
    def __init__(self, args, storage: Path):
        self.port = _free_port()
        self.storage = storage
        embedded = ROOT / ".cache" / "embedded"
        flags = {
            "host": "127.0.0.1",
            "port": self.port,
            "model": args.model,
            "devices": args.devices,
            "products-dir": args.products_dir or embedded / "products",
            "adapters-dir": args.adapters_dir or embedded / "adapters",
            "templates-file": ROOT / "templates" / "catalog.yaml",
            "storage": storage,
            "max-queue": 4 * args.clients,
            "log-level": "WARNING",
        }
        if args.pipeline:
            flags["worker-pipeline"] = args.pipeline
        command = [sys.executable, "-m", "services.generator", *(f"--{k}={v}" for k, v in flags.items())]
        self.log = open(storage.parent / "generator.log", "wb")
        self.proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self.log)
        self.ps = psutil.Process(self.proc.pid)

    async def wait_serving(self, channel: grpc.aio.Channel, timeout: float = 300) -> None:
        await wait_serving(channel, self.proc, timeout)

    def sample(self) -> dict:
        """The parent's RSS and open fds, and the workers' RSS (with the forkserver they are forked from; pages
        they still share with it count in each)."""
        workers = [c for c in self.ps.children(recursive=True) if "resource_tracker" not in " ".join(c.cmdline())]
        return {
            "rss_mb": self.ps.memory_info().rss / 1e6,
            "fds": self.ps.num_fds(),
            "workers_rss_mb": sum(w.memory_info().rss for w in workers) / 1e6,
        }

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


async def soak(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="pia-soak-") as tmp:
        storage = Path(tmp) / "images"
        server = Server(args, storage)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        try:
            await server.wait_serving(channel)
            stub = generator_pb2_grpc.GeneratorStub(channel)
            return await _load(args, server, stub)
        finally:
            await channel.close()
            server.stop()


async def _load(args, server: Server, stub) -> dict:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    uris: list[str] = []
    done = 0
    warm_after = args.clients * args.warmup
    warm: dict = {}
    samples: list[dict] = []

    async def client(c: int) -> None:
        nonlocal done
        for i in range(args.requests):
            request = generate_request(
                product_id=args.product,
                template_id=args.template,
                num_images=args.images,
                steps=args.steps,
                width=args.size,
                height=args.size,
                seed=c * 100_000 + i,
            )
            started = time.perf_counter()
            try:
                async for event in stub.Generate(request, timeout=600):
                    if event.WhichOneof("event") == "image_ready":
                        uris.append(event.image_ready.image.uri)
                latencies.append(time.perf_counter() - started)
            except grpc.aio.AioRpcError as err:
                errors[err.code().name] = errors.get(err.code().name, 0) + 1
            done += 1
            if done == warm_after and not warm:
                warm.update(server.sample(), at_request=done)

    async def sampler() -> None:
        while True:
            samples.append(server.sample())
            await asyncio.sleep(1.0)

    watching = asyncio.create_task(sampler())
    started = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(args.clients)))
    wall = time.perf_counter() - started
    watching.cancel()
    end = server.sample()
    unreadable = sum(1 for uri in uris if not Path(urllib.parse.unquote(urllib.parse.urlparse(uri).path)).is_file())
    total = args.clients * args.requests
    growth = (end["rss_mb"] - warm["rss_mb"]) / warm["rss_mb"] * 100
    return {
        "requests": total,
        "completed": len(latencies),
        "errors": errors,
        "images_announced": len(uris),
        "images_unreadable": unreadable,
        "latency_p50_s": round(statistics.median(latencies), 4),
        "latency_p99_s": round(_percentile(latencies, 0.99), 4),
        "latency_max_s": round(max(latencies), 4),
        "throughput_rps": round(len(latencies) / wall, 2),
        "wall_s": round(wall, 1),
        "after_warmup": {k: round(v, 1) for k, v in warm.items()},
        "end": {k: round(v, 1) for k, v in end.items()},
        "peak_rss_mb": round(max(s["rss_mb"] for s in [*samples, end]), 1),
        "peak_fds": max(s["fds"] for s in [*samples, end]),
        "rss_growth_after_warmup_pct": round(growth, 1),
        "rss_goal_met": growth <= 10.0,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench-results" / "soak.json")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--requests", type=int, default=200, help="requests per client")
    p.add_argument("--warmup", type=int, default=20, help="requests per client before the RSS baseline")
    p.add_argument("--images", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--model", default="standin:step=0.002")
    p.add_argument("--pipeline", default=STANDIN, help="worker pipeline factory ('' for the real pipeline)")
    p.add_argument("--devices", default="cpu:2")
    p.add_argument("--products-dir", default="")
    p.add_argument("--adapters-dir", default="")
    p.add_argument("--product", default="tiny-star")
    p.add_argument("--template", default="beach")
    args = p.parse_args(argv)
    result = asyncio.run(soak(args))
    report = {
        "benchmark": "soak",
        "config": {k: str(v) for k, v in vars(args).items() if k != "out"},
        "machine": {"python": platform.python_version(), "cpus": psutil.cpu_count()},
        "result": result,
    }
    return save_report(args.out, report)


if __name__ == "__main__":
    main()
