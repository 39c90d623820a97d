"""Reliability of the generator's workers and request path: respawns with backoff (also of a worker
killed while starting), the hang watchdog, worker chaos under load, readiness, request ids, size
limits, malformed bytes and outcome metrics. Stand-in pipelines keep it fast (docs/RELIABILITY.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import urllib.parse
from pathlib import Path

import grpc
import pytest
from PIL import Image
from prometheus_client import REGISTRY

from client.catalogue.runner import error_reason
from productinaction.v1 import generator_pb2_grpc
from services.common.errors import AlreadyExists
from services.common.ids import ID_PATTERN, check_id, is_valid_id
from services.common.storage import LocalImageStore
from services.generator.app import start_generator
from services.generator.messages import Fatal, Ready
from services.generator.options import WorkerConfig, WorkerPolicy
from services.generator.workers import WorkerPool, WorkerState
from tests.helpers import STANDIN, generator_settings, images, request, run, serving, standin_server, until

# Respawn policy, on a worker pool whose processes are fakes (no spawning: fast and exact)


class FakeProcess:
    def __init__(self, exitcode: int = -signal.SIGKILL):
        self.exitcode, self.pid, self.sentinel = exitcode, None, -1

    def join(self, timeout=None) -> None:
        pass

    def is_alive(self) -> bool:
        return False

    def kill(self) -> None:
        pass


def fake_pool(policy: WorkerPolicy, unrecoverable: list) -> WorkerPool:
    pool = WorkerPool(
        [WorkerConfig("standin", "cpu:0")],
        policy=policy,
        on_unrecoverable=unrecoverable.append,
        start_process=lambda config: (FakeProcess(), None),
    )
    pool.spawn_all()
    pool.started = True
    return pool


def die(pool: WorkerPool) -> float | None:
    """Kill worker 0; the delay before its respawn (None: not respawned). Respawns it at once."""
    w = pool.workers[0]
    pool.worker_exited(w, w.process)
    if w.respawn_timer is None:
        return None
    delay = w.respawn_timer.when() - asyncio.get_running_loop().time()
    w.respawn_timer.cancel()
    pool._spawn(w)
    return round(max(0.0, delay), 1)


async def test_respawn_backoff_grows_then_resets_after_a_healthy_period():
    policy = WorkerPolicy(backoff_s=1, backoff_max_s=8, healthy_s=60, max_start_failures=3)
    pool = fake_pool(policy, unrecoverable := [])
    w = pool.workers[0]
    delays = []
    for _ in range(7):  # more than the old fixed budget of 5 respawns for the life of the process
        pool.handle(w, Ready("cpu:0", 0.0, 0.0))
        delays.append(die(pool))
    assert delays == [0.0, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    pool.handle(w, Ready("cpu:0", 0.0, 0.0))
    w.ready_since -= 61  # healthy for longer than policy.healthy_s
    assert die(pool) == 0.0
    assert w.respawns == 8 and not unrecoverable


async def test_worker_dying_while_starting_is_respawned_until_it_is_given_up():
    policy = WorkerPolicy(backoff_s=0.5, backoff_max_s=8, max_start_failures=3)
    pool = fake_pool(policy, unrecoverable := [])
    w = pool.workers[0]
    pool.handle(w, Ready("cpu:0", 0.0, 0.0))
    assert die(pool) == 0.0  # died while ready
    assert die(pool) == 0.5  # its replacement died while starting: respawned all the same
    assert die(pool) == 1.0
    assert w.state is WorkerState.STARTING and not unrecoverable
    assert die(pool) is None  # the 3rd start failure in a row: given up
    assert w.state is WorkerState.STOPPED
    assert unrecoverable and "every generator worker is given up" in unrecoverable[0]


async def test_worker_whose_model_cannot_load_is_given_up_at_once():
    pool = fake_pool(WorkerPolicy(), unrecoverable := [])
    w = pool.workers[0]
    pool.handle(w, Fatal("cpu:0", "OSError: no such model"))
    assert die(pool) is None and w.state is WorkerState.STOPPED
    assert "no such model" in unrecoverable[0]


async def test_unrecoverable_process_fails_waiting_requests_and_refuses_new_ones(tiny_world, tmp_path):
    marker = tmp_path / "die-on-load"
    async with standin_server(
        tiny_world,
        tmp_path,
        step=0.01,
        model=f"standin:step=0.01,die_on_load={marker}",
        max_start_failures=2,
        respawn_backoff_s=0.1,
    ) as (app, stub, _h):
        told = []
        app.pool.on_unrecoverable = told.append
        marker.touch()  # from now on every start of the worker dies while loading
        os.kill(app.pool.workers[0].process.pid, signal.SIGKILL)
        await until(lambda: told, what="the pool gives up")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await run(stub, request())
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "no generator worker" in err.value.details()


# Real workers under SIGKILL, including while they start


@pytest.mark.slow
async def test_worker_chaos_every_request_complete_or_unavailable(tiny_world, tmp_path, caplog):
    caplog.set_level(logging.WARNING, "services.generator")
    caplog.set_level(logging.ERROR, "asyncio")
    async with standin_server(
        tiny_world,
        tmp_path,
        devices="cpu:2",
        model="standin:step=0.02,load=1",
        step=0.02,
        respawn_backoff_s=0.2,
    ) as (app, stub, health):
        workers = app.pool.workers

        async def one(i: int):
            try:
                return images(await run(stub, request(n=3, steps=4, seed=100 * i), timeout=120))
            except grpc.aio.AioRpcError as err:
                return err

        requests = [asyncio.create_task(one(i)) for i in range(8)]
        await until(lambda: workers[0].job is not None, what="worker 0 busy")
        first = workers[0].process
        os.kill(first.pid, signal.SIGKILL)  # mid-job
        await until(lambda: workers[0].process is not first and workers[0].state is WorkerState.STARTING)
        os.kill(workers[0].process.pid, signal.SIGKILL)  # its replacement, while it loads
        await until(lambda: workers[1].job is not None, what="worker 1 busy")
        os.kill(workers[1].process.pid, signal.SIGKILL)  # the other one, mid-job
        results = await asyncio.gather(*requests)
        await until(lambda: all(w.state is WorkerState.READY for w in workers), what="both workers back")
        await until(lambda: app.pool.serving, what="SERVING")
        assert await serving(health)
        after = images(await run(stub, request(n=2, steps=2)))

    completed = [r for r in results if not isinstance(r, grpc.aio.AioRpcError)]
    failed = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert all(len(r) == 3 for r in completed)
    assert all(e.code() == grpc.StatusCode.UNAVAILABLE for e in failed), [e.details() for e in failed]
    assert len(completed) >= 6  # an image is retried once: only one that loses two workers fails
    for ready in [r for c in completed for r in c] + after:
        path = Path(urllib.parse.unquote(urllib.parse.urlparse(ready.image.uri).path))
        assert Image.open(path).size == (64, 64)  # every announced image is stored and readable
    assert workers[0].respawns >= 2 and workers[1].respawns >= 1
    text = caplog.text
    assert "was killed by SIGKILL while starting" in text and "exited (code None)" not in text
    assert "never retrieved" not in text  # a start-up death used to leave a failed future behind


async def test_hung_worker_is_killed_and_its_images_rendered_elsewhere(tiny_world, tmp_path, caplog):
    caplog.set_level(logging.ERROR, "services.generator")
    async with standin_server(
        tiny_world, tmp_path, devices="cpu:2", watchdog_min_s=1, watchdog_factor=3, respawn_backoff_s=0.1
    ) as (app, stub, health):
        await run(stub, request(n=2, steps=3))  # measures the time per step
        ready = images(await run(stub, request(n=4, prompt="hang", steps=3, seed=40), timeout=60))
        assert sorted(r.seed for r in ready) == [40, 41, 42, 43]
        assert {r.device for r in ready} == {"cpu:1"}  # cpu:0 hangs on these prompts
        await until(lambda: app.pool.workers[0].state is WorkerState.READY, what="cpu:0 respawned")
        assert app.pool.workers[0].respawns >= 1
        assert await serving(health)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await run(stub, request(n=1, prompt="hang-always", steps=3), timeout=60)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "hung twice" in err.value.details()
    assert "hung: job" in caplog.text


# Readiness, ids, sizes, malformed bytes


async def test_requests_before_the_first_ready_are_refused_not_rendered_at_a_guessed_size(tiny_world, tmp_path):
    settings = generator_settings(
        tiny_world, str(tmp_path / "img"), model="standin:load=2", worker_pipeline=STANDIN, default_size=0
    )
    app = await start_generator(settings, wait_ready=False)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = generator_pb2_grpc.GeneratorStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await run(stub, request(n=1, steps=2))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "still loading" in err.value.details()
            await app.pool.wait_ready()
            events = await run(stub, request(n=1, steps=2))
    finally:
        await app.stop()
    assert events[0].accepted.parameters.width == 64  # the stand-in model's native size


async def test_a_size_the_pipeline_refuses_is_refused_before_acceptance(generator_stub):
    # The tiny model's VAE halves (multiple 2), but diffusers wants multiples of 8: 18 used to be
    # accepted, then fail in the worker against the field "request".
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await run(generator_stub, request(width=18, height=18, steps=1))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("width:")


def test_one_id_rule_everywhere():
    for good in ("a", "A.b_c-9", "x" * 64):
        assert is_valid_id(good) and check_id(good) == good
    for bad in ("", "a\n", "a\nb", ".a", "_a", "-a", "a/b", "..", "x" * 65, "a b", "é"):
        assert not is_valid_id(bad), bad
        assert not ID_PATTERN.match(bad), bad  # strict with .match() too (training uses it)


@pytest.mark.parametrize("bad", ["tail\n", "_lead", "-lead"])
async def test_generator_and_upscaler_refuse_the_same_ids(generator_stub, upscaler_stub, bad):
    from productinaction.v1 import upscaler_pb2

    with pytest.raises(grpc.aio.AioRpcError) as gen:
        await run(generator_stub, request(request_id=bad))
    with pytest.raises(grpc.aio.AioRpcError) as up:
        async for _ in upscaler_stub.Upscale(upscaler_pb2.UpscaleRequest(uri="file:///x.png", request_id=bad)):
            pass
    for err in (gen.value, up.value):
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in err.details()


async def test_request_id_reuse_is_refused_and_never_overwrites(tiny_world, tmp_path):
    """Refused while the id runs and once it is stored; the ErrorInfo reason tells the two apart."""
    async with standin_server(tiny_world, tmp_path) as (_app, stub, _h):
        log: list = []
        running = asyncio.create_task(run(stub, request(n=1, seed=1, steps=100, request_id="once"), log))
        await until(lambda: ("", "accepted") in log, 30, "accepted")
        with pytest.raises(grpc.aio.AioRpcError) as busy:
            await run(stub, request(n=1, seed=2, request_id="once"))
        first = images(await running)[0]
        path = Path(urllib.parse.unquote(urllib.parse.urlparse(first.image.uri).path))
        before = path.read_bytes()
        with pytest.raises(grpc.aio.AioRpcError) as stored:
            await run(stub, request(n=1, seed=2, request_id="once"))
    for err, reason in ((busy.value, "REQUEST_RUNNING"), (stored.value, "REQUEST_STORED")):
        assert err.code() == grpc.StatusCode.ALREADY_EXISTS and "single-use" in err.details()
        assert error_reason(err) == reason
    assert path.read_bytes() == before


async def test_create_only_puts_never_replace_an_object(tmp_path, s3_server, s3_bucket):
    from services.common.storage import S3ImageStore

    for store in (LocalImageStore(tmp_path), S3ImageStore(s3_bucket, "create-only", s3_server.endpoint)):
        await store.put("r/0.png", b"first", {}, overwrite=False)
        with pytest.raises(AlreadyExists):
            await store.put("r/0.png", b"second", {}, overwrite=False)
        assert await store.get(store.uri_for("r/0.png")) == b"first"
        assert await store.exists("r/") and not await store.exists("q/")
        await store.close()


async def test_oversized_requests_are_refused_before_they_cost_memory(generator, upscaler):
    from productinaction.v1 import upscaler_pb2, upscaler_pb2_grpc

    options = [("grpc.max_send_message_length", 128 * 1024 * 1024)]
    big = generator.settings.max_request_bytes + 1
    async with grpc.aio.insecure_channel(f"127.0.0.1:{generator.port}", options=options) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await run(generator_pb2_grpc.GeneratorStub(channel), request(prompt="x" * big))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    big = upscaler.settings.max_input_bytes + 128 * 1024
    async with grpc.aio.insecure_channel(f"127.0.0.1:{upscaler.port}", options=options) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in upscaler_pb2_grpc.UpscalerStub(channel).Upscale(
                upscaler_pb2.UpscaleRequest(image=b"x" * big)
            ):
                pass
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize(
    "data",
    [b"\x28\xff\xff\xff", b"\x0a\x03\xc3\x28\x41", b"\xff\xff\xff\xff"],
    ids=["truncated varint", "bad utf-8", "garbage"],
)
async def test_malformed_protobuf_is_invalid_argument_with_one_log_line(generator, caplog, data):
    caplog.set_level(logging.INFO)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{generator.port}") as channel:
        call = channel.unary_stream("/productinaction.v1.Generator/Generate")(data)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in call:
                pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid protobuf" in err.value.details()
    lines = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert len(lines) == 1 and not lines[0].exc_info
    assert "Traceback" not in caplog.text


def outcomes() -> dict[str, float]:
    return {
        o: REGISTRY.get_sample_value("pia_requests_total", {"outcome": o}) or 0.0
        for o in ("ok", "cancelled", "deadline_exceeded", "invalid_argument", "error")
    }


async def test_outcomes_say_deadline_and_cancel_not_error(tiny_world, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    async with standin_server(tiny_world, tmp_path, step=0.05) as (app, stub, _h):
        before = outcomes()
        with pytest.raises(grpc.aio.AioRpcError):
            await run(stub, request(n=2, steps=20), timeout=0.5)
        call = stub.Generate(request(n=2, steps=20))
        await call.read()
        call.cancel()
        with pytest.raises(grpc.aio.AioRpcError):
            await run(stub, request(n=0))
        await until(lambda: not app.dispatcher.tickets)
        await until(lambda: outcomes()["cancelled"] > before["cancelled"])
        after = outcomes()
    assert after["deadline_exceeded"] == before["deadline_exceeded"] + 1
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["invalid_argument"] == before["invalid_argument"] + 1
    assert after["error"] == before["error"]
    assert "Traceback" not in caplog.text and "ExecuteBatchError" not in caplog.text  # a client leaving is no fault
