"""One job per device: a bounded queue (full -> RESOURCE_EXHAUSTED at once, with a retry hint),
cancellation of queued and running work, deadlines, and an event loop that stays responsive."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from productinaction.v1 import upscaler_pb2, upscaler_pb2_grpc
from tests.fixtures_upscaler import png_bytes, upscaler_settings

# 64x64 in 32-pixel tiles with 16 overlap: 3x3 tiles, 0.1 s each with SlowEngine.
SLOW_IMAGE = png_bytes((64, 64), seed=1)


def slow_request(request_id: str) -> upscaler_pb2.UpscaleRequest:
    return upscaler_pb2.UpscaleRequest(image=SLOW_IMAGE, request_id=request_id, tile_size=32)


@pytest.fixture(scope="module")
async def slow(tmp_path_factory):
    """An upscaler whose engine takes 0.1 s a tile, with room for one waiting job."""
    from services.upscaler.app import start_upscaler

    storage = tmp_path_factory.mktemp("queue-images")
    settings = upscaler_settings("slow", str(storage), engine="tests.fixtures_upscaler:SlowEngine", max_queue=1)
    app = await start_upscaler(settings)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield app, upscaler_pb2_grpc.UpscalerStub(channel), channel
    await app.stop()


async def _next(call, kind: str):
    async for event in call:
        if event.WhichOneof("event") == kind:
            return event
    raise AssertionError(f"stream ended before {kind}")


async def _outcome(app, request_id: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for rid, outcome in app.runner.history:
            if rid == request_id:
                return outcome
        await asyncio.sleep(0.02)
    raise AssertionError(f"{request_id} never finished")


async def test_full_queue_is_resource_exhausted_and_cancel_drops_queued_work(slow):
    app, stub, _ = slow
    running = stub.Upscale(slow_request("q-running"))
    await _next(running, "progress")  # it holds the device
    queued = stub.Upscale(slow_request("q-waiting"))
    accepted = await _next(queued, "accepted")
    assert accepted.accepted.queue_position == 1

    rejected = stub.Upscale(slow_request("q-rejected"))
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in rejected:
            pass
    assert time.monotonic() - started < 1.0  # at once, not after waiting
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry in" in info.value.details()
    assert int(dict(info.value.trailing_metadata())["retry-after-ms"]) > 0
    status = await rpc_status.aio.from_call(rejected)
    retry = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(retry) and retry.retry_delay.ToMilliseconds() > 0

    queued.cancel()
    assert await _outcome(app, "q-waiting") == "cancelled"
    events = [e async for e in running]
    assert events[-1].HasField("completed")
    # The cancelled job never reached the device: the next one starts straight away.
    assert ("q-waiting", "ok") not in app.runner.history
    ready = [e async for e in stub.Upscale(slow_request("q-after"))]
    assert ready[-1].completed.timings.queued_seconds < 0.5


async def test_cancel_stops_a_running_job_between_tiles(slow):
    app, stub, _ = slow
    engine = app.runner.engine
    before = len(engine.tiles)
    call = stub.Upscale(slow_request("c-running"))
    progress = await _next(call, "progress")
    total = progress.progress.tiles_total
    await _next(call, "progress")
    call.cancel()
    assert await _outcome(app, "c-running") == "cancelled"
    assert len(engine.tiles) - before < total


async def test_deadline_drops_the_job(slow):
    app, stub, _ = slow
    engine = app.runner.engine
    before = len(engine.tiles)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.Upscale(slow_request("d-late"), timeout=0.35):
            pass
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert await _outcome(app, "d-late") in ("expired", "cancelled")
    assert len(engine.tiles) - before < 9


async def test_event_loop_stays_responsive_while_the_model_runs(upscaler, upscaler_stub):
    """A real (tiny) Swin2SR on a 256x256 image: health checks still answer quickly."""
    request = upscaler_pb2.UpscaleRequest(image=png_bytes((256, 256), seed=2), tile_size=64)
    call = upscaler_stub.Upscale(request)
    await _next(call, "progress")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{upscaler.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        worst = 0.0
        for _ in range(5):
            started = time.monotonic()
            await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            worst = max(worst, time.monotonic() - started)
            await asyncio.sleep(0.05)
    assert upscaler.runner.running is not None  # the model really was busy meanwhile
    assert worst < 0.5
    call.cancel()


async def test_shutdown_refuses_queued_work_with_unavailable(tmp_path):
    from services.upscaler.app import start_upscaler

    settings = upscaler_settings("slow", str(tmp_path), engine="tests.fixtures_upscaler:SlowEngine")
    app = await start_upscaler(settings)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = upscaler_pb2_grpc.UpscalerStub(channel)
        running = stub.Upscale(slow_request("s-running"))
        await _next(running, "progress")
        queued = stub.Upscale(slow_request("s-queued"))
        await _next(queued, "accepted")
        stopping = asyncio.create_task(app.stop(grace_s=0.2))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in queued:
                pass
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in info.value.details()
        with pytest.raises(grpc.aio.AioRpcError):
            async for _ in running:
                pass
        await stopping
    assert ("s-queued", "shutdown") in app.runner.history
