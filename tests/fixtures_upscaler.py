"""Upscaler fixtures (a pytest plugin, loaded by conftest): a tiny random Swin2SR built once, a real
upscaler on a free port sharing the session's image storage, its stub, and stand-in engines."""

from __future__ import annotations

import io
import os
import shutil
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def upscaler_settings(model: str | Path, storage: str, **overrides):
    """Settings for a test upscaler: CPU, one thread, small limits, fast Replicate polling."""
    from services.upscaler.settings import UpscalerSettings

    fields = dict(
        host="127.0.0.1",
        port=0,
        model=str(model),
        storage=storage,
        device="cpu",
        # One thread: on a small shared machine, intra-op threads spin against each other.
        threads=1,
        tile_size=64,
        tile_overlap=16,
        min_tile_size=16,
        max_pixels=256 * 256,
        start_timeout_s=120,
        replicate_poll_s=0.05,
        replicate_timeout_s=20,
        grace_period_s=1,
    )
    fields.update(overrides)
    return UpscalerSettings(**fields)


@pytest.fixture(scope="session")
def tiny_swin2sr() -> Path:
    """A tiny random Swin2SR x4 folder (demo.tiny_sr), built once and cached under .cache/."""
    from demo.tiny_sr import build_tiny_swin2sr

    cache = ROOT / ".cache" / "tiny-swin2sr"
    if not (cache / ".ready").exists():
        # Build aside, then rename: concurrent test runs never see a half-written folder.
        tmp = cache.with_name(f".tiny-swin2sr-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        build_tiny_swin2sr(tmp)
        (tmp / ".ready").touch()
        shutil.rmtree(cache, ignore_errors=True)
        try:
            tmp.rename(cache)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return cache


@pytest.fixture(scope="session")
async def upscaler(tiny_swin2sr, storage_dir) -> AsyncIterator:
    """One real upscaler (tiny Swin2SR, CPU) on the session's storage, so it reads the generator's images."""
    from services.upscaler.app import start_upscaler

    app = await start_upscaler(upscaler_settings(tiny_swin2sr, str(storage_dir)))
    yield app
    await app.stop()


@pytest.fixture(scope="session")
async def upscaler_stub(upscaler) -> AsyncIterator:
    from productinaction.v1 import upscaler_pb2_grpc

    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{upscaler.port}", options=options) as channel:
        yield upscaler_pb2_grpc.UpscalerStub(channel)


async def upscale(stub, request) -> list:
    """All events of one Upscale call."""
    return [event async for event in stub.Upscale(request)]


def png_bytes(size: tuple[int, int], mode: str = "RGB", seed: int = 0, fmt: str = "PNG") -> bytes:
    """A small image with some structure (smooth noise), so upscales are not trivially flat."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    channels = len(mode)
    small = torch.rand(1, channels, max(2, size[1] // 4), max(2, size[0] // 4), generator=gen)
    pixels = F.interpolate(small, size=(size[1], size[0]), mode="bilinear", align_corners=False)
    array = (pixels[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    image = Image.fromarray(array[..., 0] if channels == 1 else array, mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


class BicubicEngine:
    """A stand-in engine: bicubic upsampling, optionally slow per tile; counts the tiles it computes."""

    align = 8
    tile_delay = 0.0
    load_delay = 0.0

    def __init__(self, model: str = "bicubic", device: str = "cpu", threads: int = 0, scale: int = 4):
        self.model_name = model
        self.device_name = "cpu"
        self.scale = scale
        self.tiles: list[tuple[int, int]] = []
        self.lock = threading.Lock()

    def load(self) -> None:
        time.sleep(self.load_delay)

    def run_tile(self, tile):
        import torch.nn.functional as F

        with self.lock:
            self.tiles.append(tuple(tile.shape[-2:]))
        if self.tile_delay:
            time.sleep(self.tile_delay)
        return F.interpolate(tile, scale_factor=self.scale, mode="bicubic", align_corners=False).clamp(0, 1)


class SlowEngine(BicubicEngine):
    """0.1 s a tile: long enough to queue behind, cancel or time out, short enough for tests."""

    tile_delay = 0.1


class SlowLoadingEngine(BicubicEngine):
    load_delay = 1.0


def bicubic_x2(model: str, device: str, threads: int) -> BicubicEngine:
    return BicubicEngine(model, device, threads, scale=2)
