"""Tiled super-resolution with feathered blending.

The model sees one tile at a time, so its activation memory is bounded by the tile size, not by
the image size; only the float accumulators are output-sized, and they stay on the CPU. Tiles
overlap and are cross-faded across the middle of each overlap (its outer quarters, where a tile
lacks context, get almost no weight), so no seams show.

Tile origins sit on multiples of the model's window size, so Swin's window partitions coincide
with those of an untiled run: tiled output differs from untiled only where a tile lacks context.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Weight of a tile's pixels where the tile lacks context: tiny but never zero.
EDGE_WEIGHT = 1e-3


class JobCancelled(Exception):
    """Raised between tiles when the request was cancelled or ran past its deadline."""


@dataclass(frozen=True)
class TilePlan:
    """Tile sizes and starts on each axis, in input pixels."""

    tile_h: int
    tile_w: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    @property
    def total(self) -> int:
        return len(self.ys) * len(self.xs)


def _align_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def plan_axis(length: int, tile: int, overlap: int, align: int) -> tuple[int, tuple[int, ...]]:
    """(tile length, aligned starts): the fewest tiles of at most `tile` that cover [0, length)
    with neighbours overlapping by at least `overlap`, shrunk to the smallest size that does."""
    if length <= tile:
        return length, (0,)
    n = max(2, -(-(length - overlap) // (tile - overlap)))
    while True:
        # Aligning the starts can eat into the overlap: grow the tiles a step before adding one.
        size = _align_up(-(-(length + (n - 1) * overlap) // n), align)
        while size <= tile:
            last = _align_up(length - size, align)
            starts = sorted({min(_align_up(i * (length - size) // (n - 1), align), last) for i in range(n)})
            if all(a + size - b >= overlap for a, b in itertools.pairwise(starts)):
                return size, tuple(starts)
            size += align
        n += 1


def plan_tiles(height: int, width: int, tile: int, overlap: int, align: int) -> TilePlan:
    """Round the tile down to the alignment; keep the overlap at most half a tile."""
    tile = max(2 * align, tile // align * align)
    overlap = max(0, min(overlap, tile // 2 // align * align))
    tile_h, ys = plan_axis(height, tile, overlap, align)
    tile_w, xs = plan_axis(width, tile, overlap, align)
    return TilePlan(tile_h, tile_w, ys, xs)


def _fade(n: int) -> torch.Tensor:
    """Rising weights across an overlap of n pixels: EDGE_WEIGHT over the outer quarter, then linear."""
    guard = n // 4
    i = torch.arange(n, dtype=torch.float32)
    return ((i + 1 - guard) / (n - 2 * guard + 1)).clamp(EDGE_WEIGHT, 1.0)


def _ramp(length: int, fade_in: int, fade_out: int) -> torch.Tensor:
    w = torch.ones(length)
    if fade_in > 0:
        w[:fade_in] = _fade(fade_in)
    if fade_out > 0:
        w[length - fade_out :] = torch.minimum(w[length - fade_out :], _fade(fade_out).flip(0))
    return w


def _overlaps(starts: tuple[int, ...], size: int, length: int, i: int) -> tuple[int, int]:
    """Overlap of tile i with its previous and next neighbour on one axis."""
    before = starts[i - 1] + size - starts[i] if i > 0 else 0
    after = min(starts[i] + size, length) - starts[i + 1] if i + 1 < len(starts) else 0
    return before, after


def upscale_tiled(
    image: torch.Tensor,
    run_tile: Callable[[torch.Tensor], torch.Tensor],
    scale: int,
    plan: TilePlan,
    on_tile: Callable[[int, int], object] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """(1, C, H, W) float in [0, 1] -> (1, C, H*scale, W*scale), computing one tile at a time.

    `run_tile` maps a (1, C, h, w) CPU tile to its (1, C, h*scale, w*scale) upscale.
    `should_stop` is checked before each tile; when it is true, JobCancelled is raised.
    """
    _, channels, height, width = image.shape
    out = torch.zeros(1, channels, height * scale, width * scale)
    weight = torch.zeros(1, 1, height * scale, width * scale)
    done = 0
    for yi, y in enumerate(plan.ys):
        for xi, x in enumerate(plan.xs):
            if should_stop is not None and should_stop():
                raise JobCancelled()
            h, w = min(plan.tile_h, height - y), min(plan.tile_w, width - x)
            result = run_tile(image[:, :, y : y + h, x : x + w]).float().cpu()
            if result.shape[-2:] != (h * scale, w * scale):
                raise RuntimeError(f"model returned {tuple(result.shape)} for a {h}x{w} tile at scale {scale}")
            top, bottom = _overlaps(plan.ys, plan.tile_h, height, yi)
            left, right = _overlaps(plan.xs, plan.tile_w, width, xi)
            mask = _ramp(h * scale, top * scale, bottom * scale)[:, None] * _ramp(
                w * scale, left * scale, right * scale
            )
            ys, xs = slice(y * scale, (y + h) * scale), slice(x * scale, (x + w) * scale)
            out[:, :, ys, xs] += result * mask
            weight[:, :, ys, xs] += mask
            done += 1
            if on_tile is not None:
                on_tile(done, plan.total)
    return out.div_(weight)
