"""Placement never changes results: the same seeds give the same images on 1 worker and on 3."""

from __future__ import annotations

import grpc
import pytest

from client.api import generate_request
from productinaction.v1 import generator_pb2_grpc
from services.generator.app import start_generator
from tests.helpers import generator_settings


async def render_all(world, tmp_path, devices: str, **overrides) -> dict[int, tuple[bytes, str]]:
    # One torch thread per worker on both sides, so CPU reductions run in the same order.
    settings = generator_settings(
        world, str(tmp_path / devices.replace(":", "-")), devices=devices, cpu_threads=1, **overrides
    )
    app = await start_generator(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = generator_pb2_grpc.GeneratorStub(channel)
            req = generate_request(
                product_id="tiny-star",
                template_id="flowers",
                num_images=6,
                seed=2024,
                adapters=[("tiny-sunset", 0.7)],
                inline_images=True,
            )
            out = {}
            async for event in stub.Generate(req, timeout=300):
                if event.WhichOneof("event") == "image_ready":
                    r = event.image_ready
                    out[r.index] = (r.image.png, r.device)
            return out
    finally:
        await app.stop()


@pytest.mark.slow
async def test_same_seeds_same_images_on_one_and_three_workers(tiny_world, tmp_path):
    one = await render_all(tiny_world, tmp_path, "cpu:1")
    three = await render_all(tiny_world, tmp_path, "cpu:3")
    assert {device for _, device in three.values()} == {"cpu:0", "cpu:1", "cpu:2"}
    assert sorted(one) == sorted(three) == list(range(6))
    for index in one:
        assert one[index][0] == three[index][0], f"image {index} differs between placements"
