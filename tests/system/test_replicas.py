"""Two generator processes behind one client target (`ipv4:127.0.0.1:p1,127.0.0.1:p2`): calls spread over
both (round robin), a killed replica costs no new request, a stream that had started is not replayed
behind the caller's back, and the web page's banner says which replicas are up.

Requests are counted per replica by each server's own Prometheus counters. The figures (how the calls
split, what completed) go to artifacts/replicas.json for docs/DEPLOYMENT.md; nothing here is timed.
"""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest

from client import cli
from client.api import GeneratorClient, generate_request
from client.balancing import replica_addresses, replica_health, reporting_interruption, split_target
from client.web_logic import Backends, Session, check_health
from productinaction.v1 import generator_pb2, generator_pb2_grpc
from tests.helpers import Replica, free_port, start_replica, wait_serving


@pytest.fixture(scope="module")
async def replicas(tiny_world, tmp_path_factory):
    base = tmp_path_factory.mktemp("replicas")
    started = [start_replica(tiny_world, base / "images", base / f"replica-{i}.log") for i in range(2)]
    try:
        await wait_serving(started)
        yield started
    finally:
        for r in started:
            r.kill()


def _request(**overrides):
    fields = dict(product_id="tiny-star", template_id="minimal", num_images=1, steps=2, width=32, height=32, seed=3)
    fields.update(overrides)
    return generate_request(**fields)


async def _complete(client: GeneratorClient, request) -> str:
    kinds = [event.WhichOneof("event") async for event in client.generate(request, timeout=120)]
    return kinds[-1]


async def _counters(replicas: list[Replica]) -> list[dict[str, float]]:
    return [await asyncio.to_thread(r.counters) for r in replicas]


def test_targets_parse():
    assert split_target("ipv4:127.0.0.1:5001,127.0.0.1:5002") == ("ipv4", [("127.0.0.1", 5001), ("127.0.0.1", 5002)])
    assert split_target("dns:///generator-headless:50051") == ("dns", [("generator-headless", 50051)])
    assert split_target("dns://8.8.8.8/gen.example:443") == ("dns", [("gen.example", 443)])
    assert split_target("ipv6:[::1]:5001") == ("ipv6", [("::1", 5001)])
    assert split_target("localhost:50051") == ("dns", [("localhost", 50051)])


async def test_a_dns_target_stands_for_every_address_of_the_name():
    assert "127.0.0.1:50051" in await replica_addresses("dns:///localhost:50051")
    assert await replica_addresses("ipv4:127.0.0.1:1,127.0.0.2:2") == ["127.0.0.1:1", "127.0.0.2:2"]
    health = await replica_health(f"ipv4:127.0.0.1:{free_port()},127.0.0.1:{free_port()}", timeout=1)
    assert list(health.values()) == ["UNREACHABLE", "UNREACHABLE"]


@pytest.mark.slow
async def test_requests_spread_and_survive_a_killed_replica(replicas, tmp_path, capsys, artifacts):
    target = "ipv4:" + ",".join(r.address for r in replicas)
    backends = Backends(target, f"127.0.0.1:{free_port()}", tmp_path / "files")
    client = GeneratorClient(target)
    figures: dict = {"target": "ipv4:<replica 1>,<replica 2>", "replicas": 2}
    try:
        # 1. Both up: the banner lists both, and sequential calls alternate between them.
        health = await check_health(backends, Session())
        assert "Generator replicas: 2 of 2 up" in health.banner, health.banner
        before = await _counters(replicas)
        n = 8
        start = time.perf_counter()
        assert [await _complete(client, _request(seed=i)) for i in range(n)] == ["completed"] * n
        figures["both_up"] = {"requests": n, "seconds": round(time.perf_counter() - start, 2)}
        after = await _counters(replicas)
        per_replica = [int(a["ok"] - b["ok"]) for a, b in zip(after, before, strict=True)]
        figures["both_up"]["per_replica"] = per_replica
        assert sum(per_replica) == n and min(per_replica) >= n // 2 - 1, per_replica

        # 2. A stream that has started, then its replica dies: the CLI says what happened, and the
        #    request is not replayed on the other replica.
        before = await _counters(replicas)
        long = _request(num_images=6, steps=60, width=64, height=64, seed=11)
        task = asyncio.create_task(cli._generate(client, long, tmp_path / "cli", 300))
        serving = None
        while serving is None:
            assert not task.done(), task
            now = await _counters(replicas)
            moved = [i for i, (a, b) in enumerate(zip(now, before, strict=True)) if a["images"] > b["images"]]
            serving = moved[0] if moved else None
            await asyncio.sleep(0.05)
        replicas[serving].kill()
        survivor = replicas[1 - serving]
        with pytest.raises(grpc.aio.AioRpcError) as broken:
            await task
        assert broken.value.code() == grpc.StatusCode.UNAVAILABLE
        err = capsys.readouterr().err
        assert "stopped part-way" in err and "not retried automatically" in err and "of 6 images arrived" in err, err
        saved = sorted((tmp_path / "cli").glob("*.png"))
        assert 1 <= len(saved) < 6  # what arrived is kept
        assert (await asyncio.to_thread(survivor.counters))["images"] == before[1 - serving]["images"]
        figures["killed_mid_stream"] = {"images_kept": len(saved), "of": 6, "replayed_on_survivor": 0}

        # 3. One replica down: every new request completes (on the survivor), and the banner says so.
        ok_before = (await asyncio.to_thread(survivor.counters))["ok"]
        start = time.perf_counter()
        results = [await _complete(client, _request(seed=100 + i)) for i in range(n)]
        figures["one_killed"] = {"requests": n, "completed": results.count("completed")}
        figures["one_killed"]["seconds"] = round(time.perf_counter() - start, 2)
        assert results == ["completed"] * n
        assert (await asyncio.to_thread(survivor.counters))["ok"] - ok_before == n
        health = await check_health(backends, Session())
        killed = replicas[serving].address
        assert "Generator replicas: 1 of 2 up" in health.banner, health.banner
        assert f"{killed} unreachable" in health.banner and f"{survivor.address} up" in health.banner
    finally:
        await client.close()
    (artifacts / "replicas.json").write_text(json.dumps(figures, indent=2) + "\n")


class _Replica(generator_pb2_grpc.GeneratorServicer):
    """A generator that only lists products, or answers UNAVAILABLE as a draining one does."""

    def __init__(self, draining: bool):
        self.draining, self.calls = draining, 0

    async def ListProducts(self, request, context):
        self.calls += 1
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "draining: shutting down")
        return generator_pb2.ListProductsResponse(products=[generator_pb2.Product(id="p")])


async def test_unavailable_is_retried_on_the_other_replica():
    servers, replicas, ports = [], [_Replica(draining=True), _Replica(draining=False)], []
    for replica in replicas:
        server = grpc.aio.server()
        generator_pb2_grpc.add_GeneratorServicer_to_server(replica, server)
        ports.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        servers.append(server)
    client = GeneratorClient("ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports))
    try:
        calls = 0
        while replicas[0].calls < 3 and calls < 100:  # until round robin has sent a few to the draining one
            assert [p.id for p in await client.products()] == ["p"]  # never the draining replica's error
            calls += 1
        assert replicas[0].calls >= 3 and replicas[1].calls == calls
    finally:
        await client.close()
        for server in servers:
            await server.stop(None)


def _unavailable() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "Socket closed")


async def test_a_started_stream_is_reported_not_replayed():
    async def stream(events: int):
        for i in range(events):
            yield i
        raise _unavailable()

    reports: list[str] = []
    received = []
    with pytest.raises(grpc.aio.AioRpcError):
        async for event in reporting_interruption(stream(2), lambda: len(received), 4, reports.append):
            received.append(event)
    assert received == [0, 1] and len(reports) == 1
    assert "2 of 4 images arrived and are kept" in reports[0] and "not retried automatically" in reports[0]
    # Broken before anything arrived: nothing to report beyond the error itself (gRPC retried it already).
    with pytest.raises(grpc.aio.AioRpcError):
        async for _ in reporting_interruption(stream(0), lambda: 0, 4, reports.append):
            pass
    assert len(reports) == 1
