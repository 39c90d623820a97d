"""Storage outages: a real S3 server (SeaweedFS) behind a fault-injecting TCP proxy that can forward,
swallow (accept connections, never answer) or be stopped (connection refused).

Each outage must end a request quickly with UNAVAILABLE naming the storage, announce nothing that
was not stored, count the failure, and leave the generator SERVING; after the outage, requests
succeed again without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
from grpc_health.v1 import health_pb2
from prometheus_client import REGISTRY

from tests.helpers import images, request, standin_server


class FaultProxy:
    """TCP proxy to `target`: mode "forward", "swallow" (reads, never answers) or stopped."""

    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.mode = "forward"
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Nothing listens any more: connections are refused. Open ones are cut."""
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            if self.mode == "swallow":
                while await reader.read(65536):
                    pass
                return
            up_reader, up_writer = await asyncio.open_connection(*self.target)
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if self.mode == "swallow":
                    continue  # pooled keep-alive connections go silent too
                writer.write(data)
                await writer.drain()
        finally:
            with contextlib.suppress(OSError):
                writer.close()


def failures() -> float:
    return REGISTRY.get_sample_value("pia_storage_failures_total", {"operation": "write"}) or 0.0


async def test_storage_outages_fail_fast_announce_nothing_and_recover(tiny_world, tmp_path, s3_server, s3_bucket):
    host, port = s3_server.endpoint.removeprefix("http://").split(":")
    proxy = FaultProxy(host, int(port))
    await proxy.start()
    client = s3_server.client()

    async def attempt(seed: int):
        events: list = []
        try:
            async for event in stub.Generate(request(n=2, steps=2, seed=seed), timeout=60):
                events.append(event)
            return events, None
        except grpc.aio.AioRpcError as err:
            return events, err

    def readable(ready) -> bool:
        key = ready.image.uri.removeprefix(f"s3://{s3_bucket}/")
        return client.get_object(Bucket=s3_bucket, Key=key)["Body"].read().startswith(b"\x89PNG")

    async with standin_server(
        tiny_world,
        tmp_path,
        storage=f"s3://{s3_bucket}/outage",
        s3_endpoint_url=f"http://127.0.0.1:{proxy.port}",
        storage_timeout_s=2.0,
        storage_deadline_s=5.0,
        storage_attempts=3,
    ) as (_app, stub, health):
        events, err = await attempt(1)
        assert err is None and all(readable(r) for r in images(events))

        for outage in ("swallow", "stopped"):
            before = failures()
            if outage == "swallow":
                proxy.mode = "swallow"
            else:
                proxy.mode = "forward"
                await proxy.stop()
            events, err = await attempt(10)
            # Bounded: the storage's own deadline ends it, long before the client's 60 s.
            assert err is not None and err.code() == grpc.StatusCode.UNAVAILABLE, (outage, err)
            assert f"storage s3://{s3_bucket} at http://127.0.0.1:{proxy.port}" in err.details()
            assert not images(events), f"{outage}: announced an image that was not stored"
            assert failures() > before
            # Decided: health does not follow the storage (docs/RELIABILITY.md).
            reply = await health.Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

        await proxy.start()  # the endpoint comes back, on the same port
        events, err = await attempt(20)
        assert err is None, err
        ready = images(events)
        assert len(ready) == 2 and all(readable(r) for r in ready)
    await proxy.stop()


@pytest.mark.parametrize("overwrite", [True, False])
async def test_local_storage_write_that_hangs_is_bounded(tmp_path, monkeypatch, overwrite):
    from services.common import storage
    from services.common.errors import Unavailable

    def stuck(*_args):
        import time

        time.sleep(2)  # a stuck mount: the thread is left behind, the request is not

    monkeypatch.setattr(storage, "_atomic_write", stuck)
    store = storage.LocalImageStore(tmp_path, storage.StorageLimits(timeout_s=0.2, deadline_s=0.5, attempts=2))
    with pytest.raises(Unavailable, match=f"storage {tmp_path}"):
        await store.put("r/0.png", b"x", {}, overwrite=overwrite)


async def test_a_retried_create_only_write_that_had_landed_counts_as_written(tmp_path, monkeypatch):
    import time

    from services.common import storage
    from services.common.errors import AlreadyExists

    real, calls = storage._atomic_write, []

    def late_first(path, data, overwrite=True):
        calls.append(path)
        real(path, data, overwrite)
        if len(calls) == 1:
            time.sleep(0.5)  # written, but the answer comes after the attempt's timeout

    monkeypatch.setattr(storage, "_atomic_write", late_first)
    store = storage.LocalImageStore(tmp_path, storage.StorageLimits(timeout_s=0.2, deadline_s=3, backoff_s=0.01))
    await store.put("r/0.png", b"mine", {}, overwrite=False)
    assert len(calls) == 2 and (tmp_path / "r" / "0.png").read_bytes() == b"mine"
    with pytest.raises(AlreadyExists):  # someone else's bytes under that key: never replaced
        await store.put("r/0.png", b"other", {}, overwrite=False)
    assert (tmp_path / "r" / "0.png").read_bytes() == b"mine"
