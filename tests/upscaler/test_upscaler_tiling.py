"""Tiling, padding and alpha, without a server: the tile plan, blending, and a tiny real Swin2SR."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from services.upscaler.engine import Swin2SREngine, upscale_image
from services.upscaler.tiling import JobCancelled, plan_axis, plan_tiles, upscale_tiled
from tests.fixtures_upscaler import BicubicEngine, png_bytes


@pytest.fixture(scope="module")
def swin(tiny_swin2sr) -> Swin2SREngine:
    engine = Swin2SREngine(str(tiny_swin2sr), "cpu", threads=1)
    engine.load()
    return engine


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean().clamp_min(1e-12)))


@pytest.mark.parametrize("length", [1, 7, 8, 31, 61, 64, 65, 77, 200, 512, 513, 1000])
@pytest.mark.parametrize(("tile", "overlap"), [(16, 8), (32, 16), (64, 16), (256, 32)])
def test_plan_covers_the_axis_with_aligned_overlapping_tiles(length, tile, overlap):
    size, starts = plan_axis(length, tile, overlap, 8)
    if length <= tile:
        assert (size, starts) == (length, (0,))
        return
    assert size <= tile
    assert starts[0] == 0 and all(s % 8 == 0 for s in starts)
    assert starts[-1] + size >= length and starts[-1] < length  # the last tile reaches the edge
    assert all(a + size - b >= overlap for a, b in itertools.pairwise(starts))


def test_plan_uses_few_tiles_for_the_common_sizes():
    # 512 -> 2048 is the service's main job: 3x3 tiles of at most 256, not 4x4.
    plan = plan_tiles(512, 512, 256, 32, 8)
    assert plan.total == 9 and plan.tile_h <= 256
    assert plan_tiles(64, 48, 256, 32, 8).total == 1


def test_tiled_bicubic_matches_untiled_and_tiles_stay_bounded():
    torch.manual_seed(0)
    image = torch.rand(1, 3, 61, 77)
    engine = BicubicEngine()
    untiled = upscale_tiled(image, engine.run_tile, 4, plan_tiles(61, 77, 128, 16, 8))
    engine.tiles.clear()
    tiled = upscale_tiled(image, engine.run_tile, 4, plan_tiles(61, 77, 32, 16, 8))
    assert tiled.shape == untiled.shape == (1, 3, 244, 308)
    assert max(h for h, _ in engine.tiles) <= 32 and max(w for _, w in engine.tiles) <= 32
    assert len(engine.tiles) > 4
    # Bicubic has a 2-pixel support: once blended, tiles agree with the whole image almost exactly.
    assert _psnr(tiled, untiled) > 50


def test_tiled_swin2sr_matches_untiled(swin):
    torch.manual_seed(1)
    image = F.interpolate(torch.rand(1, 3, 12, 10), size=(61, 77), mode="bilinear")
    untiled = upscale_tiled(image, swin.run_tile, 4, plan_tiles(61, 77, 128, 16, swin.align))
    tiled = upscale_tiled(image, swin.run_tile, 4, plan_tiles(61, 77, 48, 16, swin.align))
    assert untiled.std() > 0.05  # the random model's output really depends on the input
    diff = (tiled - untiled).abs()
    assert float(diff.mean()) < 0.005
    assert _psnr(tiled, untiled) > 40


@pytest.mark.parametrize("size", [(1, 1), (3, 5), (7, 13), (13, 7), (61, 77), (64, 64)])
def test_any_input_size_comes_back_exactly_scaled(swin, size):
    image = Image.open(io.BytesIO(png_bytes(size, seed=3)))
    out = upscale_image(swin, image.convert("RGB"), tile_size=32, overlap=16)
    assert out.size == (size[0] * 4, size[1] * 4) and out.mode == "RGB"


def test_alpha_is_upscaled_apart_and_kept(swin):
    rgba = Image.open(io.BytesIO(png_bytes((21, 17), mode="RGBA", seed=4)))
    out = upscale_image(swin, rgba, tile_size=32, overlap=16)
    assert out.mode == "RGBA" and out.size == (84, 68)
    expected = rgba.getchannel("A").resize(out.size, Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(out.getchannel("A")), np.asarray(expected))


def test_should_stop_ends_the_job_between_tiles():
    engine = BicubicEngine()
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(engine.tiles) >= 2

    with pytest.raises(JobCancelled):
        upscale_tiled(torch.rand(1, 3, 64, 64), engine.run_tile, 4, plan_tiles(64, 64, 32, 16, 8), None, should_stop)
    assert len(engine.tiles) == 2
