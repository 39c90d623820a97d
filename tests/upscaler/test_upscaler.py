"""The Upscaler over real gRPC: a tiny real Swin2SR on a free port, local storage shared with the
generator, every bad input mapped to its exact status code."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from PIL import Image

from productinaction.v1 import generator_pb2, upscaler_pb2
from services.common.pngmeta import read_text_chunks
from tests.fixtures_upscaler import png_bytes, upscale, upscaler_settings

Request = upscaler_pb2.UpscaleRequest


def _kinds(events) -> list[str]:
    return [e.WhichOneof("event") for e in events]


def _with_header_size(png: bytes, width: int, height: int) -> bytes:
    """A real PNG whose IHDR claims another size (CRC fixed): what a decompression bomb looks like."""
    ihdr = png[8 + 8 : 8 + 8 + 13]
    patched = struct.pack(">II", width, height) + ihdr[8:]
    chunk = b"IHDR" + patched
    return png[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + png[8 + 8 + 13 + 4 :]


def _only_ready(events) -> upscaler_pb2.UpscaleImageReady:
    ready = [e.image_ready for e in events if e.HasField("image_ready")]
    assert len(ready) == 1
    return ready[0]


async def test_health_and_reflection_list_the_upscaler(upscaler):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{upscaler.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "productinaction.v1.Upscaler"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    ("size", "mode", "fmt"),
    [((37, 29), "RGB", "PNG"), ((1, 1), "RGB", "PNG"), ((13, 70), "RGBA", "PNG"), ((50, 33), "RGB", "JPEG")],
)
async def test_inline_images_of_any_size_come_back_x4(upscaler_stub, storage_dir, size, mode, fmt):
    request_id = f"inline-{size[0]}x{size[1]}-{mode}-{fmt}".lower()
    events = await upscale(
        upscaler_stub, Request(image=png_bytes(size, mode, fmt=fmt), inline_image=True, request_id=request_id)
    )
    kinds = _kinds(events)
    assert kinds[0] == "accepted" and kinds[-2:] == ["image_ready", "completed"]
    assert "progress" in kinds
    accepted, ready = events[0].accepted, _only_ready(events)
    assert accepted.request_id == request_id
    assert ready.image.uri == accepted.uri == (storage_dir / request_id / "upscaled.x4.png").as_uri()
    assert (ready.image.width, ready.image.height, ready.scale, ready.backend) == (size[0] * 4, size[1] * 4, 4, "local")
    stored = (storage_dir / request_id / "upscaled.x4.png").read_bytes()
    assert ready.image.png == stored
    with Image.open(io.BytesIO(stored)) as im:
        assert im.size == (size[0] * 4, size[1] * 4)
        assert im.mode == ("RGBA" if mode == "RGBA" else "RGB")
    timings = events[-1].completed.timings
    assert 0 <= timings.queued_seconds <= timings.total_seconds and timings.compute_seconds > 0


async def test_not_inline_unless_asked(upscaler_stub):
    ready = _only_ready(await upscale(upscaler_stub, Request(image=png_bytes((16, 16)))))
    assert ready.image.png == b"" and ready.image.width == 64


async def test_progress_counts_tiles(upscaler_stub):
    events = await upscale(upscaler_stub, Request(image=png_bytes((100, 70)), tile_size=32))
    progress = [(e.progress.tiles_done, e.progress.tiles_total) for e in events if e.HasField("progress")]
    total = progress[0][1]
    assert total > 1 and progress == [(i, total) for i in range(total + 1)]


async def test_upscales_what_the_generator_stored(generator_stub, upscaler_stub, storage_dir):
    generated = [
        e
        async for e in generator_stub.Generate(
            generator_pb2.GenerateRequest(
                product_id="tiny-star", prompt="on a wooden table", num_images=1, seed=7, request_id="gen-up"
            )
        )
    ]
    source = next(e.image_ready for e in generated if e.HasField("image_ready"))
    assert source.image.uri == (storage_dir / "gen-up" / "0.png").as_uri()

    events = await upscale(upscaler_stub, Request(uri=source.image.uri, request_id="up-of-gen"))
    ready = _only_ready(events)
    assert events[0].accepted.uri == ready.image.uri == (storage_dir / "gen-up" / "0.x4.up-of-gen.png").as_uri()
    assert ready.source_uri == source.image.uri
    assert (ready.image.width, ready.image.height) == (source.image.width * 4, source.image.height * 4)
    text = read_text_chunks((storage_dir / "gen-up" / "0.x4.up-of-gen.png").read_bytes())
    # It links back to its source and keeps the generation parameters.
    assert text["source-uri"] == source.image.uri
    assert json.loads(text["upscaler"])["source_uri"] == source.image.uri
    assert json.loads(text["productinaction"])["seed"] == 7


def _bad_inputs(storage_dir: Path) -> list[tuple[str, Request, grpc.StatusCode, str]]:
    good = png_bytes((16, 16))
    (storage_dir / "corrupt").mkdir(exist_ok=True)
    (storage_dir / "corrupt" / "0.png").write_bytes(good[:60])
    (storage_dir / "folder.png").mkdir(exist_ok=True)
    bomb = _with_header_size(good, 100_000, 100_000)
    return [
        ("empty request", Request(), grpc.StatusCode.INVALID_ARGUMENT, "source"),
        ("empty image", Request(image=b""), grpc.StatusCode.INVALID_ARGUMENT, "image"),
        ("empty uri", Request(uri=""), grpc.StatusCode.INVALID_ARGUMENT, "uri"),
        ("scale 2 on an x4 model", Request(image=good, scale=2), grpc.StatusCode.INVALID_ARGUMENT, "scale"),
        ("scale 3", Request(image=good, scale=3), grpc.StatusCode.INVALID_ARGUMENT, "scale"),
        ("tile too small", Request(image=good, tile_size=8), grpc.StatusCode.INVALID_ARGUMENT, "tile_size"),
        ("tile too large", Request(image=good, tile_size=4096), grpc.StatusCode.INVALID_ARGUMENT, "tile_size"),
        ("unknown backend", Request(image=good, backend=7), grpc.StatusCode.INVALID_ARGUMENT, "backend"),
        ("bad request id", Request(image=good, request_id="../x"), grpc.StatusCode.INVALID_ARGUMENT, "request_id"),
        ("dot-dot request id", Request(image=good, request_id=".."), grpc.StatusCode.INVALID_ARGUMENT, "request_id"),
        ("long request id", Request(image=good, request_id="a" * 65), grpc.StatusCode.INVALID_ARGUMENT, "request_id"),
        ("corrupt bytes", Request(image=b"\x89PNG not really"), grpc.StatusCode.INVALID_ARGUMENT, "image"),
        ("truncated png", Request(image=good[:60]), grpc.StatusCode.INVALID_ARGUMENT, "image"),
        ("gif", Request(image=png_bytes((8, 8), fmt="GIF")), grpc.StatusCode.INVALID_ARGUMENT, "image"),
        ("oversized", Request(image=png_bytes((300, 300))), grpc.StatusCode.INVALID_ARGUMENT, "image"),
        ("decompression bomb", Request(image=bomb), grpc.StatusCode.INVALID_ARGUMENT, "image"),
        (
            "bomb under PIL's limit",
            Request(image=_with_header_size(good, 10_000, 10_000)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "image",
        ),
        (
            "corrupt stored file",
            Request(uri=(storage_dir / "corrupt" / "0.png").as_uri()),
            grpc.StatusCode.INVALID_ARGUMENT,
            "uri",
        ),
        ("missing uri", Request(uri=(storage_dir / "nope" / "0.png").as_uri()), grpc.StatusCode.NOT_FOUND, ""),
        ("a folder", Request(uri=(storage_dir / "folder.png").as_uri()), grpc.StatusCode.NOT_FOUND, ""),
        ("storage root", Request(uri=storage_dir.as_uri()), grpc.StatusCode.NOT_FOUND, ""),
        ("outside storage", Request(uri="file:///etc/hostname"), grpc.StatusCode.NOT_FOUND, ""),
        ("dot-dot escape", Request(uri=storage_dir.as_uri() + "/../../etc/hostname"), grpc.StatusCode.NOT_FOUND, ""),
        ("s3 on a local server", Request(uri="s3://pia-test/a/0.png"), grpc.StatusCode.NOT_FOUND, ""),
        ("http uri", Request(uri="https://example.com/0.png"), grpc.StatusCode.INVALID_ARGUMENT, "uri"),
    ]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
async def test_bad_inputs_get_their_exact_status(upscaler_stub, storage_dir):
    for name, request, code, field in _bad_inputs(storage_dir):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await upscale(upscaler_stub, request)
        assert info.value.code() == code, f"{name}: {info.value.code()} {info.value.details()}"
        if field:
            assert info.value.details().startswith(f"{field}:"), f"{name}: {info.value.details()}"
    # The service is still fine afterwards.
    assert _only_ready(await upscale(upscaler_stub, Request(image=png_bytes((8, 8))))).image.width == 32


async def test_invalid_argument_carries_the_field_violation(upscaler):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{upscaler.port}") as channel:
        from productinaction.v1 import upscaler_pb2_grpc

        call = upscaler_pb2_grpc.UpscalerStub(channel).Upscale(Request(image=png_bytes((8, 8)), scale=2))
        with pytest.raises(grpc.aio.AioRpcError):
            async for _ in call:
                pass
        status = await rpc_status.aio.from_call(call)
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    assert bad_request.field_violations[0].field == "scale"


async def test_starts_not_serving_until_the_model_is_warm(tmp_path):
    from services.upscaler.app import start_upscaler

    settings = upscaler_settings("stand-in", str(tmp_path), engine="tests.fixtures_upscaler:SlowLoadingEngine")
    app = await start_upscaler(settings, wait_ready=False)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service="productinaction.v1.Upscaler"))
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as info:
                from productinaction.v1 import upscaler_pb2_grpc

                await upscale(upscaler_pb2_grpc.UpscalerStub(channel), Request(image=png_bytes((8, 8))))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            await app.ready
            reply = await health.Check(health_pb2.HealthCheckRequest(service="productinaction.v1.Upscaler"))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await app.stop()


async def test_scale_follows_the_loaded_model(tmp_path):
    from productinaction.v1 import upscaler_pb2_grpc
    from services.upscaler.app import start_upscaler

    app = await start_upscaler(upscaler_settings("x2", str(tmp_path), engine="tests.fixtures_upscaler:bicubic_x2"))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = upscaler_pb2_grpc.UpscalerStub(channel)
            for scale in (0, 2):
                ready = _only_ready(await upscale(stub, Request(image=png_bytes((10, 6)), scale=scale, request_id="r")))
                assert (ready.image.width, ready.image.height, ready.scale) == (20, 12, 2)
                assert ready.image.uri.endswith("/r/upscaled.x2.png")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await upscale(stub, Request(image=png_bytes((10, 6)), scale=4))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "x2" in info.value.details()
    finally:
        await app.stop()


def test_result_keys_sit_next_to_their_source_one_per_request():
    from services.upscaler.server import result_key

    assert result_key("req/0.png", 4, "up-1") == "req/0.x4.up-1.png"
    assert result_key("a/b/photo.JPG", 2, "up-1") == "a/b/photo.x2.up-1.png"
    assert result_key("req/noext", 4, "up-2") == "req/noext.x4.up-2.png"


async def test_upscaling_again_keeps_every_earlier_result(upscaler_stub, storage_dir):
    source = storage_dir / "again" / "0.png"
    source.parent.mkdir()
    source.write_bytes(png_bytes((20, 12), seed=3))
    results = []
    for request_id in ("", "", "again-named"):  # twice with server-picked ids, once with the caller's
        ready = _only_ready(
            await upscale(upscaler_stub, Request(uri=source.as_uri(), inline_image=True, request_id=request_id))
        )
        results.append(ready.image)
    uris = [image.uri for image in results]
    assert len(set(uris)) == 3 and uris[2] == (source.parent / "0.x4.again-named.png").as_uri()
    for image in results:  # every result is still there, exactly as announced
        stored = Path(image.uri.removeprefix("file://")).read_bytes()
        assert stored == image.png
        with Image.open(io.BytesIO(stored)) as im:
            assert im.size == (80, 48)


async def test_a_reused_request_id_never_replaces_its_result(upscaler_stub, storage_dir):
    """Create-only: the same id for other pixels is ALREADY_EXISTS, for a stored source and for inline bytes."""
    source = storage_dir / "reuse" / "0.png"
    source.parent.mkdir()
    source.write_bytes(png_bytes((16, 16), seed=1))
    by_uri = _only_ready(
        await upscale(upscaler_stub, Request(uri=source.as_uri(), inline_image=True, request_id="reuse-u"))
    )
    inline = _only_ready(
        await upscale(
            upscaler_stub, Request(image=png_bytes((16, 16), seed=1), inline_image=True, request_id="reuse-i")
        )
    )
    source.write_bytes(png_bytes((16, 16), seed=2))  # other pixels under the same key: a different result
    for request in (
        Request(uri=source.as_uri(), request_id="reuse-u"),
        Request(image=png_bytes((16, 16), seed=2), request_id="reuse-i"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await upscale(upscaler_stub, request)
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS, info.value.details()
    assert (source.parent / "0.x4.reuse-u.png").read_bytes() == by_uri.image.png
    assert (storage_dir / "reuse-i" / "upscaled.x4.png").read_bytes() == inline.image.png
