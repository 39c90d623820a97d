"""The generator as operators run it (`python -m services.generator`, a stand-in model), under clients
that stop reading, SIGTERM, a SIGKILLed parent and workers that can never start again.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from productinaction.v1 import generator_pb2_grpc
from tests.helpers import ROOT, STANDIN, free_port, images, request, run, until

pytestmark = pytest.mark.slow

SIDE = 384
PNG_BYTES = SIDE * SIDE * 3  # a stand-in noise image barely compresses
# A client that reads nothing: a 64 KB window that never grows, so the server's first big write waits.
STALLED_CLIENT = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 65536)]


@asynccontextmanager
async def generator_process(world: Path, tmp_path: Path, model: str = "standin:step=0.005,noise=1", **flags):
    """`python -m services.generator` on a free port; yields (process, stub, storage dir) once SERVING."""
    port = free_port()
    storage = tmp_path / "images"
    args = {
        "host": "127.0.0.1",
        "port": port,
        "model": model,
        "worker-pipeline": STANDIN,
        "devices": "cpu:1",
        "products-dir": world / "products",
        "adapters-dir": world / "adapters",
        "templates-file": ROOT / "templates" / "catalog.yaml",
        "storage": storage,
        "default-steps": 1,
        "log-level": "WARNING",
        **{k.replace("_", "-"): v for k, v in flags.items()},
    }
    command = [sys.executable, "-m", "services.generator", *(f"--{k}={v}" for k, v in args.items())]
    log = open(tmp_path / "generator.log", "wb")  # a file, not a pipe: a full pipe would block the server
    proc = await asyncio.to_thread(subprocess.Popen, command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
    proc.log = tmp_path / "generator.log"
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        health = health_pb2_grpc.HealthStub(channel)
        async with asyncio.timeout(120):
            while True:
                assert proc.poll() is None, proc.log.read_text()[-2000:]
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.2)
        stub = generator_pb2_grpc.GeneratorStub(channel)
        stub.port = f"127.0.0.1:{port}"
        yield proc, stub, storage
    finally:
        await channel.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        log.close()


def workers(proc) -> list[psutil.Process]:
    """The generator's live worker processes: the children of its forkserver (the server's own children are the
    forkserver and the resource tracker). A killed worker stays a zombie until it is reaped."""
    live = []
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if child.ppid() != proc.pid and child.status() != psutil.STATUS_ZOMBIE:
                live.append(child)
        except psutil.NoSuchProcess:  # includes ZombieProcess
            continue
    return live


def gone(p: psutil.Process) -> bool:
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # includes ZombieProcess, raised by some calls on a zombie
        return True


def helpers(proc) -> list[psutil.Process]:
    """The server's own children: its forkserver and the resource tracker."""
    return psutil.Process(proc.pid).children()


def stored(storage: Path) -> int:
    return sum(1 for _ in storage.rglob("*.png"))


def rss(proc) -> int:
    return psutil.Process(proc.pid).memory_info().rss


def big_request(n: int = 16):
    return request(n=n, steps=1, width=SIDE, height=SIDE, inline_images=True)


async def test_stalled_readers_images_stored_memory_bounded_streams_closed(tiny_world, tmp_path):
    streams = 4
    async with generator_process(tiny_world, tmp_path, stall_timeout_s=10, max_queue=128) as (proc, stub, storage):
        # Warm every buffer with the same load, read: the heap reaches its size for 4 streams at once (glibc
        # keeps freed 0.4 MB blocks for reuse), so the growth below is what the stalled streams hold.
        async def drain() -> None:
            async for _ in stub.Generate(big_request(), timeout=120):
                pass

        await asyncio.gather(*(drain() for _ in range(streams)))
        baseline = rss(proc)
        async with grpc.aio.insecure_channel(stub.port, options=STALLED_CLIENT) as channel:
            stalled = generator_pb2_grpc.GeneratorStub(channel)
            calls = [stalled.Generate(big_request(), timeout=300) for _ in range(streams)]
            for call in calls:
                assert (await call.read()).WhichOneof("event") == "accepted"  # then: never read again
            # Storage is the contract: every image is stored although nobody reads the streams.
            await until(lambda: stored(storage) == 16 * (2 * streams), 60, "every image stored")
            held = rss(proc) - baseline
            # Holding the stalled streams' images would take streams * 16 * PNG_BYTES (28 MB). What is held is
            # each stream's message in flight and gRPC's buffers: 8.4 MB on a quiet machine, up to 10.8 MB with
            # the suite's other worker busy (its timing decides how much is mid-write), so the bar is half.
            assert held < streams * 16 * PNG_BYTES / 2, f"parent grew {held / 1e6:.1f} MB"
            closed = "closing the stream: the client read nothing"
            await until(lambda: proc.log.read_text().count(closed) == streams, 60, "stalled streams closed")
            for call in calls:  # what was sent before is still readable, then the status
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    while await call.read() is not grpc.aio.EOF:
                        pass
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.value
                assert "read nothing" in err.value.details()
        async for event in stub.Generate(request(n=1, steps=1, width=64, height=64), timeout=60):
            last = event
        assert last.WhichOneof("event") == "completed"


async def test_shutdown_with_a_stalled_reader_takes_one_grace_period(tiny_world, tmp_path):
    grace = 5.0
    async with generator_process(tiny_world, tmp_path, grace_period_s=grace, stall_timeout_s=120) as (
        proc,
        stub,
        storage,
    ):
        async with grpc.aio.insecure_channel(stub.port, options=STALLED_CLIENT) as channel:
            call = generator_pb2_grpc.GeneratorStub(channel).Generate(big_request(), timeout=300)
            await call.read()
            await until(lambda: stored(storage) == 16, 60, "images stored")
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(proc.wait, 60)
            took = time.monotonic() - started
            call.cancel()
    assert code == 0
    # It used to wait the grace period in the drain, then again in the server's stop (2 x grace).
    assert took < grace + 3.5, f"exit took {took:.1f}s with a {grace:g}s grace period"


async def test_workers_exit_with_a_killed_parent(tiny_world, tmp_path):
    marker = tmp_path / "slow-load"
    model = f"standin:step=0.01,slow_load_if={marker}"
    async with generator_process(tiny_world, tmp_path, model=model) as (proc, _stub, _):
        marker.touch()  # from now on a start loads for a minute
        (first,) = workers(proc)
        first.kill()
        await until(lambda: workers(proc) and workers(proc)[0].pid != first.pid, 30, "worker respawned")
        (loading,) = workers(proc)
        left = [loading, *helpers(proc)]  # the forkserver goes too: nothing is left behind
        await asyncio.sleep(1)
        proc.kill()  # while its worker loads: nobody would ever read what it sends
        proc.wait(10)

        await until(lambda: all(gone(p) for p in left), 10, "the worker and the forkserver exit with their parent")


async def test_a_killed_forkserver_is_started_again_for_the_next_respawn(tiny_world, tmp_path):
    """Workers are forked from a forkserver (workers.spawn_process). Without it their ends cannot be reported, so
    the pool counts them lost: it stops them and forks new ones from a new forkserver; requests go on."""
    async with generator_process(tiny_world, tmp_path) as (proc, stub, _):
        (first,) = workers(proc)
        (forkserver,) = [p for p in helpers(proc) if "forkserver" in " ".join(p.cmdline())]
        forkserver.kill()
        await until(lambda: gone(first), 10, "the forkserver's worker is stopped")
        assert len(images(await run(stub, request(n=2)))) == 2
        (second,) = workers(proc)
        assert second.pid != first.pid


async def test_process_exits_non_zero_when_no_worker_can_start(tiny_world, tmp_path):
    marker = tmp_path / "die-on-load"
    async with generator_process(
        tiny_world,
        tmp_path,
        model=f"standin:step=0.01,die_on_load={marker}",
        max_start_failures=2,
        respawn_backoff_s=0.1,
    ) as (proc, _stub, _):
        marker.touch()
        (worker,) = workers(proc)
        os.kill(worker.pid, signal.SIGKILL)
        code = await asyncio.to_thread(proc.wait, 60)
        log = proc.log.read_text()
    assert code == 1, log[-2000:]
    assert "every generator worker is given up" in log
