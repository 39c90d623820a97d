"""Workers, dispatch, cancellation, backpressure and failure handling, with stand-in pipelines.

The stand-in (testkit/standin.py) runs inside the real spawned workers, behind the real worker pool,
dispatcher and gRPC server; only the diffusion is replaced by a fixed sleep per step.
"""

from __future__ import annotations

import asyncio
import os
import signal
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from services.generator.app import start_generator
from services.generator.dispatch import Unit, may_run
from services.generator.workers import WorkerState
from tests.helpers import STANDIN, free_port, generator_settings, images, request, run, standin_server, until


async def test_request_is_spread_over_all_devices(tiny_world, tmp_path):
    async with standin_server(tiny_world, tmp_path, devices="cpu:3", step=0.02) as (_, stub, _h):
        ready = images(await run(stub, request(n=6, steps=10)))
    per_device = Counter(r.device for r in ready)
    assert per_device == {"cpu:0": 2, "cpu:1": 2, "cpu:2": 2}


async def test_small_request_is_not_starved_by_a_big_one(tiny_world, tmp_path):
    log: list = []
    async with standin_server(tiny_world, tmp_path, step=0.01) as (_, stub, _h):
        big = asyncio.create_task(run(stub, request(n=16, steps=5), log, "big"))
        while ("big", "image_ready") not in log:
            await asyncio.sleep(0.01)
        await run(stub, request(n=1, steps=5), log, "small")
        await big
    big_ready_before_small_done = sum(
        1 for tag, kind in log[: log.index(("small", "completed"))] if tag == "big" and kind == "image_ready"
    )
    # Round robin: the small request gets the device right after the big one's current image.
    assert big_ready_before_small_done <= 3


async def test_queue_position_is_reported_and_updated(tiny_world, tmp_path):
    async with standin_server(tiny_world, tmp_path, step=0.05) as (_, stub, _h):
        first = asyncio.create_task(run(stub, request(n=3, steps=10)))
        await asyncio.sleep(0.2)
        second = asyncio.create_task(run(stub, request(n=2, steps=10)))
        await asyncio.sleep(0.1)
        third = await run(stub, request(n=1, steps=10))
        await asyncio.gather(first, second)
    # Accepted behind the first and second requests; moves up as the second gets its turn.
    assert third[0].accepted.queue_position == 2
    updates = [e.queued.queue_position for e in third if e.WhichOneof("event") == "queued"]
    assert updates[-1] < 2


async def test_cancel_drops_queued_and_stops_running_job(tiny_world, tmp_path):
    async with standin_server(tiny_world, tmp_path, step=0.02) as (app, stub, _h):
        call = stub.Generate(request(n=8, steps=20, seed=1000))
        async for event in call:
            if event.WhichOneof("event") == "progress" and event.progress.step == 3:
                break
        call.cancel()
        # The worker frees up and serves the next request.
        after = await run(stub, request(n=1, steps=2, seed=5))
        assert images(after)
        while app.dispatcher.tickets:
            await asyncio.sleep(0.05)
    lines = app.record.read_text().splitlines()
    cancelled_steps = [line for line in lines if "(1000" in line and line.startswith("step")]
    assert any(line.startswith("cancelled (1000,)") for line in lines), lines[-5:]
    assert len(cancelled_steps) < 20  # image 0 stopped mid-way; images 1..7 never started
    assert not any(f"({1000 + i}," in line for line in lines for i in range(1, 8))


async def test_a_render_cancelled_in_its_last_step_is_stored_and_not_rendered_again(tiny_world, tmp_path):
    """A cancel that reaches the worker after its last step began cannot stop the render: the image is
    stored anyway, so the client's retry under the same id finds it instead of rendering it again."""
    async with standin_server(tiny_world, tmp_path, step=0.5) as (app, stub, _h):
        call = stub.Generate(request(n=1, steps=2, seed=31, request_id="late-cancel"))
        uri = ""
        async for event in call:
            if event.WhichOneof("event") == "accepted":
                uri = event.accepted.image_uris[0]
            elif event.WhichOneof("event") == "progress" and event.progress.step == 1:
                break
        call.cancel()  # step 2 (the last) is running: it finishes
        path = Path(urllib.parse.unquote(urllib.parse.urlparse(uri).path))
        await until(lambda: path.exists(), 10, "the cancelled request's finished image stored")
        with pytest.raises(grpc.aio.AioRpcError) as again:
            await run(stub, request(n=1, steps=2, seed=31, request_id="late-cancel"))
    assert again.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert [line for line in app.record.read_text().splitlines() if line.endswith(" 2")] == ["step cpu:0 (31,) 2"]


async def test_deadline_is_honoured_and_cleans_up(tiny_world, tmp_path):
    async with standin_server(tiny_world, tmp_path, step=0.05) as (app, stub, _h):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await run(stub, request(n=4, steps=20, seed=77), timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        while app.dispatcher.tickets or any(w.job for w in app.pool.workers):
            await asyncio.sleep(0.05)
    assert "cancelled (77,)" in app.record.read_text()


async def test_full_queue_answers_resource_exhausted_with_retry_hint(tiny_world, tmp_path):
    async with standin_server(tiny_world, tmp_path, step=0.05, max_queue=4) as (_, stub, _h):
        busy = asyncio.create_task(run(stub, request(n=4, steps=20)))
        await asyncio.sleep(0.3)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await run(stub, request(n=2))
        busy.cancel()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue full" in err.value.details()
    trailing = dict(err.value.trailing_metadata())
    assert int(trailing["retry-after-ms"]) >= 1000
    status = rpc_status.from_call(err.value)
    info = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info) and info.retry_delay.seconds >= 1


async def test_worker_error_is_reported_and_worker_survives(tiny_world, tmp_path):
    async with standin_server(tiny_world, tmp_path) as (app, stub, _h):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await run(stub, request(prompt="please fail"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in err.value.details()
        assert images(await run(stub, request(n=2)))
        assert app.pool.workers[0].respawns == 0


async def test_dead_worker_images_are_retried_elsewhere_and_worker_respawned(tiny_world, tmp_path):
    async with standin_server(tiny_world, tmp_path, devices="cpu:2") as (app, stub, health):
        other = asyncio.create_task(run(stub, request(n=4, steps=5, seed=500)))
        ready = images(await run(stub, request(n=4, prompt="crash", steps=5, seed=100)))
        assert sorted(r.index for r in ready) == [0, 1, 2, 3]
        assert {r.device for r in ready} == {"cpu:1"}  # cpu:0 dies on these prompts
        assert len(images(await other)) == 4  # unaffected
        assert app.pool.workers[0].respawns >= 1
        while app.pool.workers[0].state is not WorkerState.READY:
            await asyncio.sleep(0.1)
        reply = await health.Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await run(stub, request(n=1, prompt="crash-always", steps=5))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "died" in err.value.details()


def test_a_lost_image_goes_to_another_device_while_one_lives():
    lost = Unit(index=0, seed=1, attempts=1, lost_on="cpu:0")
    assert not may_run(lost, "cpu:0", {"cpu:0", "cpu:1"})  # cpu:1 lives (busy or respawning): wait for it
    assert may_run(lost, "cpu:1", {"cpu:0", "cpu:1"})
    assert may_run(lost, "cpu:0", {"cpu:0"})  # the only device left
    assert may_run(Unit(index=1, seed=2), "cpu:0", {"cpu:0", "cpu:1"})


async def test_health_follows_worker_readiness_and_death(tiny_world, tmp_path):
    settings = generator_settings(
        tiny_world, str(tmp_path / "img"), model="standin:step=0.01,load=3", worker_pipeline=STANDIN
    )
    app = await start_generator(settings, wait_ready=False)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def status():
                return (await health.Check(health_pb2.HealthCheckRequest())).status

            assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING  # still loading
            await app.pool.wait_ready()
            assert await status() == health_pb2.HealthCheckResponse.SERVING
            os.kill(app.pool.workers[0].process.pid, signal.SIGKILL)
            seen = set()
            for _ in range(200):
                seen.add(await status())
                if health_pb2.HealthCheckResponse.NOT_SERVING in seen and await status() == 1:
                    break
                await asyncio.sleep(0.05)
            assert health_pb2.HealthCheckResponse.NOT_SERVING in seen  # no worker alive while respawning
            assert await status() == health_pb2.HealthCheckResponse.SERVING  # respawned
    finally:
        await app.stop()


async def test_graceful_drain_finishes_running_and_refuses_new(tiny_world, tmp_path):
    async with standin_server(tiny_world, tmp_path, step=0.02) as (app, stub, _h):
        running = asyncio.create_task(run(stub, request(n=2, steps=10)))
        await asyncio.sleep(0.2)
        drain = asyncio.create_task(app.dispatcher.drain(grace_s=30))
        await asyncio.sleep(0.05)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await run(stub, request())
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.value.details()
        assert len(images(await running)) == 2
        await drain


async def test_progress_previews_every_k_steps(tiny_world, tmp_path):
    async with standin_server(tiny_world, tmp_path) as (_, stub, _h):
        events = await run(stub, request(n=1, steps=6, preview_every=2))
    progress = [e.progress for e in events if e.WhichOneof("event") == "progress"]
    assert [p.step for p in progress] == [1, 2, 3, 4, 5, 6]
    assert [bool(p.preview_png) for p in progress] == [False, True, False, True, False, True]


async def test_metrics_endpoint_exposes_generator_metrics(tiny_world, tmp_path):
    from services.common.server import start_metrics

    port = free_port()
    start_metrics(port)
    async with standin_server(tiny_world, tmp_path) as (_, stub, _h):
        await run(stub, request(n=2, adapters=[("tiny-sunset", 0.5)]))
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read())
    text = body.decode()
    for name in (
        'pia_images_generated_total{device="cpu:0"}',
        "pia_request_latency_seconds_bucket",
        "pia_first_image_latency_seconds_bucket",
        "pia_queue_depth",
        'pia_device_busy_seconds_total{device="cpu:0"}',
        'pia_adapter_cache_total{device="cpu:0",result="miss"}',
        'pia_adapter_cache_total{device="cpu:0",result="hit"}',
    ):
        assert name in text, name


def _batches(record: Path) -> Counter:
    """Seeds per job as the stand-in saw them: {batch size: jobs}."""
    lines = [line for line in record.read_text().splitlines() if line.startswith("step")]
    jobs = {line.split(" ", 2)[2].rsplit(" ", 1)[0] for line in lines}
    return Counter(len(job.strip("()").rstrip(",").split(",")) for job in jobs)


@pytest.mark.parametrize(
    ("devices", "overrides", "size", "expected"),
    [
        ("cpu:1", {"max_batch": 4}, 64, {4: 1}),  # one device: the whole request is one batch
        ("cpu:2", {"max_batch": 4}, 64, {2: 2}),  # spread first, then batch
        ("cpu:1", {}, 64, {1: 4}),  # auto on a CPU: no batching
    ],
)
async def test_micro_batches_spread_first(tiny_world, tmp_path, devices, overrides, size, expected):
    async with standin_server(tiny_world, tmp_path, devices=devices, **overrides) as (app, stub, _h):
        ready = images(await run(stub, request(n=4, steps=2, width=size, height=size, seed=7)))
        assert sorted(r.seed for r in ready) == [7, 8, 9, 10]
        assert _batches(app.record) == expected


async def test_batch_out_of_device_memory_is_split_not_failed(tiny_world, tmp_path):
    async with standin_server(tiny_world, tmp_path, max_batch=4) as (app, stub, _h):
        events = await run(stub, request(n=4, prompt="oom-batch", steps=2, seed=3))
    assert events[-1].WhichOneof("event") == "completed"
    assert sorted(r.seed for r in images(events)) == [3, 4, 5, 6]
    assert _batches(app.record) == {1: 4}  # 4 -> 2 + 2 -> 1 + 1 + 1 + 1


def test_auto_batch_follows_the_device_and_the_pixel_budget():
    from services.generator.dispatch import Dispatcher
    from services.generator.options import WorkerConfig
    from services.generator.settings import GeneratorSettings
    from services.generator.workers import WorkerPool

    auto = GeneratorSettings(max_batch=0)
    assert auto.batch_limits(["cuda:0", "cuda:1"]) == (4, 2 * 768 * 768)
    assert auto.batch_limits(["cpu:0"]) == (1, 0)
    assert GeneratorSettings(max_batch=3).batch_limits(["cpu:0"]) == (3, 0)

    pool = WorkerPool([WorkerConfig("standin", "cuda:0")])
    dispatcher = Dispatcher(pool, max_batch=4, batch_pixels=2 * 768 * 768)
    sizes = {px: dispatcher.batch_size(request_settings(px)) for px in (256, 512, 640, 768, 1024)}
    assert sizes == {256: 4, 512: 4, 640: 2, 768: 2, 1024: 1}


def request_settings(px: int):
    from services.generator.messages import RenderSettings

    return RenderSettings("p", "", 2, 7.0, px, px, "", ())
