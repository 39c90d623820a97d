"""Storage round trips through a real S3 server (SeaweedFS): read the source from the bucket, store the
result next to it, with S3 metadata and PNG text linking back to the source."""

from __future__ import annotations

import asyncio
import io
import urllib.request

import grpc
import pytest
from PIL import Image

from productinaction.v1 import upscaler_pb2, upscaler_pb2_grpc
from services.common.pngmeta import encode_png, read_text_chunks
from services.common.storage import open_store
from tests.fixtures_upscaler import png_bytes, upscale, upscaler_settings

PREFIX = "upscaler-test"


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url) as resp:
        return resp.read()


@pytest.fixture(scope="module")
async def s3_upscaler(s3_bucket, s3_server):
    from services.upscaler.app import start_upscaler

    settings = upscaler_settings(
        "bicubic",
        f"s3://{s3_bucket}/{PREFIX}",
        s3_endpoint_url=s3_server.endpoint,
        engine="tests.fixtures_upscaler:BicubicEngine",
    )
    app = await start_upscaler(settings)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield app, upscaler_pb2_grpc.UpscalerStub(channel)
    await app.stop()


@pytest.fixture(scope="module")
async def source_store(s3_bucket, s3_server):
    """The generator's view of the same bucket and prefix."""
    store = open_store(f"s3://{s3_bucket}/{PREFIX}", endpoint_url=s3_server.endpoint)
    yield store
    await store.close()


async def test_s3_source_to_s3_result(s3_upscaler, source_store, s3_bucket):
    _, stub = s3_upscaler
    with Image.open(io.BytesIO(png_bytes((24, 20), seed=5))) as im:
        png = encode_png(im, params={"prompt": "a mug", "seed": 11, "width": 24, "height": 20})
    source = await source_store.put("req-s3/0.png", png, {"request-id": "req-s3"})
    assert source.uri == f"s3://{s3_bucket}/{PREFIX}/req-s3/0.png"

    events = await upscale(stub, upscaler_pb2.UpscaleRequest(uri=source.uri, inline_image=True))
    ready = next(e.image_ready for e in events if e.HasField("image_ready"))
    result_uri = f"s3://{s3_bucket}/{PREFIX}/req-s3/0.x4.{events[0].accepted.request_id}.png"
    assert events[0].accepted.uri == ready.image.uri == result_uri
    assert ready.source_uri == source.uri and (ready.image.width, ready.image.height) == (96, 80)

    stored = await source_store.get(result_uri)
    assert stored == ready.image.png
    assert await asyncio.to_thread(_fetch, ready.image.url) == stored  # the presigned URL works
    metadata = await source_store.metadata(result_uri)
    assert metadata["source-uri"] == source.uri and metadata["scale"] == "4" and metadata["backend"] == "local"
    text = read_text_chunks(stored)
    assert text["source-uri"] == source.uri and '"prompt": "a mug"' in text["productinaction"]


async def test_inline_source_lands_under_the_prefix(s3_upscaler, source_store, s3_bucket):
    _, stub = s3_upscaler
    events = await upscale(stub, upscaler_pb2.UpscaleRequest(image=png_bytes((9, 7)), request_id="inline-s3"))
    uri = f"s3://{s3_bucket}/{PREFIX}/inline-s3/upscaled.x4.png"
    assert events[-2].image_ready.image.uri == uri
    with Image.open(io.BytesIO(await source_store.get(uri))) as im:
        assert im.size == (36, 28)


async def test_upscaling_again_adds_a_result(s3_upscaler, source_store):
    _, stub = s3_upscaler
    source = await source_store.put("again-s3/0.png", png_bytes((12, 10), seed=4), {})
    results = []
    for _ in range(2):
        events = await upscale(stub, upscaler_pb2.UpscaleRequest(uri=source.uri, inline_image=True))
        results.append((events[0].accepted.request_id, events[-2].image_ready.image))
    assert results[0][1].uri != results[1][1].uri
    for _, image in results:  # both stored, each exactly as announced
        assert await source_store.get(image.uri) == image.png
    listed = [key async for key in source_store.list("again-s3/")]
    assert listed == sorted(["again-s3/0.png", *(f"again-s3/0.x4.{request_id}.png" for request_id, _ in results)])


@pytest.mark.parametrize(
    "uri",
    [
        "s3://pia-test/upscaler-test/nope/0.png",  # missing key
        "s3://pia-test/elsewhere/0.png",  # our bucket, outside our prefix
        "s3://other-bucket/upscaler-test/0.png",  # another bucket
        "file:///etc/hostname",  # a local path on an S3 server
    ],
)
async def test_s3_sources_outside_storage_are_not_found(s3_upscaler, uri):
    _, stub = s3_upscaler
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await upscale(stub, upscaler_pb2.UpscaleRequest(uri=uri))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND, info.value.details()
