"""The demo products' shape, scored apart from their colours: is it a five-pointed star, a mug with a handle?

    python -m demo.shape          # calibrate on true renders per scene, check the broken variants

`demo.fidelity` scores colour layout only: a red-left/blue-right blob, or two yellow blocks with a dark gap
and no handle, both score 1 there. This module adds one shape test per product. Every threshold comes from
true renders of the product (`demo.world`), per scene, never from generated images:

- **split-star**: the product is the largest 8-connected object holding both red and blue pixels (the
  anti-aliased seam joins the halves); its *solidity* (area / convex-hull area, pixels as unit squares) is
  about 0.6 for a five-pointed star and 0.85-0.95 for a blob or a star with stubby points. A star passes
  when it is no more convex than every true render in that scene (+ 0.03 for their tail), and when no
  second two-coloured object a third of its size stands beside it (a product drawn twice).
- **striped-mug**: the body is the run of columns around the tallest column of the mug's yellow; a *handle
  row* crosses, from the body's edge outwards, a gap of 1-4 px (the hole) and then a thin yellow ring, in
  the body's upper three quarters. A mug passes with at least the 1st percentile of true renders' handle
  rows (at least one). A ragged or wider body has no gap: the hole is what makes a handle.
- **striped-mug, stricter** (`handle_hole`, reported beside, not the bar): a hole shut in by the mug's
  yellow beside the body. Ragged edges do not open one; over the fire a true ring often does not close one.
- Both need the product to be there at all (half the area of the smallest true renders), and whole: its own
  colours on the frame's outermost ring no more than in 99% of true renders + 2 px, per colour (`on_frame`; a
  star cut by the frame keeps its far-from-convex points, so solidity alone passed it).

`check` also reports the *decoder ceiling*: the pass rate of true renders after a round trip through a
model's VAE (`decoded`), the sharpest that model can draw the product at all.

Blind spots, named: at 32x32 the star's five points are a few pixels each, so the criterion reads "far from
convex", not "exactly five points" (a four-pointed star would pass); the mug's hole is 1-2 px, so a decoder
that blurs it shut fails true mugs and noise can open one in a handle-less mug (docs/FIDELITY.md).
"""

from __future__ import annotations

import argparse
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from demo.colours import colour_classes, to_array

MODEL = Path(__file__).resolve().parent.parent / "models" / "demo-sd"
EIGHT = np.ones((3, 3), bool)
FOUR = ndimage.generate_binary_structure(2, 1)
# Both criteria rank *generated* images too (the validation chooses runs by them, the contact sheet marks images).
# The mug's did not until stop 32: on the first demo models no mug drew a handle and the test passed blur by
# chance. Since stop 30's base the adapter draws the ring (by eye) and scale 0 passes nowhere (0.00); its figures
# stay upper bounds: through the shipped decoder handle-less mugs pass 15-46% (the body's own edge beside the band
# reads as a ring, docs/FIDELITY.md "Blind spots").
TWIN_SHARE = 1 / 3  # a second product-coloured object at least this share of the first: drawn twice
MAX_RING = 3  # px: a handle's ring is thin; a wider yellow run beyond the gap is another object
HANDLE_GAP = (1, 4)  # px of the hole between the body and the handle's ring, in a row that crosses both (32x32)
BLOCK_SHARE = 0.2  # a yellow object at least this share of the largest is part of the mug's body
HANDLE_ROWS = (0.1, 0.75)  # the rows of the body (top to bottom) the handle hangs from
CALIBRATION = 200  # true renders per scene the thresholds are taken from
MIN_HANDLE = 1  # row: at least one row must cross body, hole and ring
SOLIDITY_MARGIN = 0.03  # over the least convex of 200 true renders: their tail (a pixel or two of a 130-px star);
# blobs and stubby stars read 0.8 and above
FRAME_MARGIN = 2  # px on the frame's edge over true renders' 99th percentile: a blurred edge that grazes it
MIN_AREA_SHARE = 0.5  # of the smallest true renders' area (1st percentile): less is no product at all
HANDLE_PERCENTILE = 1  # a mug passes when its handle rows reach this percentile of true renders


def _components(mask: np.ndarray) -> list[np.ndarray]:
    labels, n = ndimage.label(mask, structure=EIGHT)
    parts = [ndimage.binary_fill_holes(labels == k) for k in range(1, n + 1)]
    return sorted(parts, key=lambda p: -int(p.sum()))


def solidity(region: np.ndarray) -> float:
    """Area / convex-hull area of a pixel region, each pixel a unit square (1.0 for a filled rectangle)."""
    ys, xs = np.nonzero(region)
    if len(xs) < 3:
        return 1.0
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    try:
        hull = ConvexHull(corners)
    except QhullError:  # all on one line
        return 1.0
    return float(len(xs) / hull.volume)  # in 2-D, `volume` is the area


@dataclass(frozen=True)
class StarShape:
    solidity: float  # of the largest red-or-blue object; 1.0 when there is none
    twin: float  # the second object's area as a share of the first's
    area: int = 0  # of the largest object, in pixels


def _star_parts(arr: np.ndarray) -> list[np.ndarray]:
    """Red-and-blue objects, largest first."""
    m = colour_classes(arr)
    # The fire's darkest reds pass the colour metric's red class; the star's red (R 220) is brighter.
    red, blue = m["red"] & (arr[..., 0] > 170), m["blue"]
    # The anti-aliased seam between the halves reads neither red nor blue: pixels next to both join them.
    seam = ndimage.binary_dilation(red, EIGHT) & ndimage.binary_dilation(blue, EIGHT)
    # Only objects with both colours are candidates, so a scene's own red (fire) or blue (sea) is not one.
    return [p for p in _components(red | blue | seam) if (p & red).any() and (p & blue).any()]


def star_shape(image) -> StarShape:
    parts = _star_parts(to_array(image))
    if not parts:
        return StarShape(1.0, 0.0)
    twin = float(parts[1].sum() / parts[0].sum()) if len(parts) > 1 else 0.0
    return StarShape(solidity(parts[0]), twin, int(parts[0].sum()))


def on_frame(product_id: str, image) -> dict[str, int]:
    """Pixels of the product's object on the frame's outermost ring, per colour of its own: a product drawn too
    large or off-centre is cut by the frame, which no solidity or handle sees (a cut star's remaining points
    are as far from convex as a whole star's). Own colours only, so a generated sky that drifts into the blue
    class and touches the star does not count; per colour, so the fire's reds touching the star's red half (its
    threshold allows them) leave the blue half's test as strict as anywhere."""

    def ring(region: np.ndarray) -> int:
        edge = region.copy()
        edge[1:-1, 1:-1] = False
        return int(edge.sum())

    if product_id != "split-star":
        return {"yellow": ring(mug_body(image))}
    arr = to_array(image)
    parts = _star_parts(arr)
    star = parts[0] if parts else np.zeros(arr.shape[:2], bool)
    r, g, b = (arr[..., k].astype(np.int32) for k in range(3))
    red = (r > 170) & (g < 80) & (b < 80)
    blue = (b > 150) & (g < 90) & (r < 90)
    return {"red": ring(star & red), "blue": ring(star & blue)}


def mug_body(image) -> np.ndarray:
    """The mug's yellow blocks (above and below the band, and whatever handle joins them), as a mask."""
    parts = _components(mug_yellow(to_array(image)))
    if not parts:
        return np.zeros((32, 32), bool)
    # The band cuts the body in two blocks; both belong to the mug.
    return np.any([p for p in parts if p.sum() >= BLOCK_SHARE * parts[0].sum()], axis=0)


def product_area(product_id: str, image) -> int:
    """Pixels of the product's own object: whether it is there at all, apart from its shape."""
    return star_shape(image).area if product_id == "split-star" else int(mug_body(image).sum())


def mug_yellow(arr: np.ndarray) -> np.ndarray:
    """The mug's yellow (250, 220, 20) and its blends with any scene down to about 45% coverage (the 1-px
    handle is never fully covered). Green over red above 0.83 keeps out the fire's flames (255, 190, 40),
    which the colour metric's yellow class takes in."""
    r, g, b = (arr[..., k].astype(np.int32) for k in range(3))
    return (r > 120) & (g * 100 > 83 * r) & (b < np.minimum(110, g // 2))


def handle_count(image) -> int:
    """Rows that cross a handle: from the body's edge outwards, a gap of 1-4 px that is not the mug's yellow (the
    hole), then its yellow again (the ring), within the body's upper three quarters (the flames rise from
    below). The larger of the two sides (a mug may be drawn facing either way). A ragged or wider body has
    no gap, so it counts nothing: the hole is what makes a handle."""
    yellow = mug_yellow(to_array(image))
    mug = mug_body(image)
    if not mug.any():
        return 0
    heights = mug.sum(0)
    tall = heights >= 0.5 * heights.max()
    x = int(np.argmax(heights))
    x0 = x1 = x
    while x0 > 0 and tall[x0 - 1]:
        x0 -= 1
    while x1 < len(tall) - 1 and tall[x1 + 1]:
        x1 += 1
    rows = np.nonzero(mug[:, x0 : x1 + 1].any(1))[0]
    top, height = int(rows.min()), int(rows.max() - rows.min() + 1)
    y0, y1 = top + round(HANDLE_ROWS[0] * height), top + round(HANDLE_ROWS[1] * height)
    centre = (x0 + x1) // 2
    sides = []
    for row_step in (1, -1):  # right, then left (mirrored)
        count = 0
        for y in range(y0, y1):
            line = yellow[y, centre:] if row_step == 1 else yellow[y, : centre + 1][::-1]
            if not line[0]:
                continue  # the band's rows: the scan starts in the band, not the body
            edge = 0
            while edge + 1 < len(line) and line[edge + 1]:
                edge += 1  # the body, out to its edge in this row
            gap = 0
            while edge + 1 + gap < len(line) and not line[edge + 1 + gap]:
                gap += 1
            start = edge + 1 + gap
            run = 0
            while start + run < len(line) and line[start + run]:
                run += 1  # the ring: yellow again after the gap, and thin
            if HANDLE_GAP[0] <= gap <= HANDLE_GAP[1] and 1 <= run <= MAX_RING:
                count += 1
        sides.append(count)
    return max(sides)


def handle_hole(image) -> int:
    """Pixels of the hole a handle encloses: not the mug's yellow, and shut in (4-connected) by the yellow and the
    body's box beside it. Stricter than `handle_count`, which a ragged edge can satisfy: generated mugs with no
    handle to be seen pass `handle_count` in 31-94% of images per scene and show a hole in 0-19% (stop 28).
    Its blind spot is the opposite one: over the fire the thin ring blends into the flames and is no longer the
    mug's yellow, so only a quarter of true renders there show a closed hole (docs/FIDELITY.md)."""
    yellow = mug_yellow(to_array(image))
    mug = mug_body(image)
    if not mug.any():
        return 0
    heights = mug.sum(0)
    cols = np.nonzero(heights >= 0.5 * heights.max())[0]
    rows = np.nonzero(mug[:, cols.min() : cols.max() + 1].any(1))[0]
    wall = yellow.copy()
    wall[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True  # the band is no way out
    return int((ndimage.binary_fill_holes(wall, structure=FOUR) & ~wall).sum())


def decoded(images: list, model: Path = MODEL) -> list:
    """`images` through the model's own VAE (encoder mean, then decoder): the sharpest the model can draw them."""
    import torch
    from PIL import Image

    vae = _vae(str(model))
    x = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)
    with torch.inference_mode():
        y = vae.decode(vae.encode(x.float() / 127.5 - 1).latent_dist.mean).sample
    out = ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in out]


@functools.cache
def _vae(model: str):
    import torch
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=torch.float32).eval()


@functools.cache
def thresholds(product_id: str, background: str, n: int = CALIBRATION, seed: int = 321) -> dict:
    """The pass thresholds for one product in one scene, from `n` true renders (seeded, cached). Fixed by the
    world alone, whatever model draws the images: how close a model's own decoder can come to them is its
    *ceiling* (`decoded`, reported by `check`), not part of the bar."""
    from demo.world import render_product

    rng = np.random.default_rng(seed)
    renders = [render_product(product_id, background, rng) for _ in range(n)]
    # The product must be there at all: at least half the area of the smallest true renders.
    frames = [on_frame(product_id, im) for im in renders]
    presence = {
        "min_area": MIN_AREA_SHARE * float(np.percentile([product_area(product_id, im) for im in renders], 1)),
        "max_on_frame": {
            colour: float(np.percentile([f[colour] for f in frames], 99)) + FRAME_MARGIN for colour in frames[0]
        },
    }
    if product_id == "split-star":
        return {"max_solidity": max(star_shape(im).solidity for im in renders) + SOLIDITY_MARGIN, **presence}
    if product_id == "striped-mug":
        rows = float(np.percentile([handle_count(im) for im in renders], HANDLE_PERCENTILE))
        return {"min_handle": max(MIN_HANDLE, rows), **presence}
    raise KeyError(f"no shape criterion for {product_id!r}")


def shape_ok(product_id: str, background: str, image) -> bool:
    """Whether `image` shows the product's shape, by thresholds from true renders in `background`."""
    limits = thresholds(product_id, background)
    if product_area(product_id, image) < limits["min_area"]:
        return False  # no product, so no shape
    if any(n > limits["max_on_frame"][colour] for colour, n in on_frame(product_id, image).items()):
        return False  # cut by the frame: not the whole product
    if product_id == "split-star":
        s = star_shape(image)
        return s.solidity <= limits["max_solidity"] and s.twin < TWIN_SHARE
    return handle_count(image) >= limits["min_handle"]


def hole_rate(images) -> float:
    """Share of mug `images` with a handle's hole (`handle_hole`)."""
    return float(np.mean([handle_hole(im) > 0 for im in images]))


def shape_rate(product_id: str, background: str, images) -> float:
    """Share of `images` that pass the shape criterion."""
    return float(np.mean([shape_ok(product_id, background, im) for im in images]))


# Broken variants the criterion must refuse (drawn like the product, one thing wrong).
def _draw_blob_star(draw, cx: float, cy: float, r: float) -> None:
    """The split star's colours on a round blob: what LoRA mode drew before issue 20."""
    box = [cx - r, cy - r, cx + r, cy + r]
    draw.pieslice(box, 90, 270, fill=(220, 30, 30))  # PIL's angles run clockwise from 3 o'clock
    draw.pieslice(box, 270, 90, fill=(30, 60, 230))


def _draw_stubby_star(draw, cx: float, cy: float, r: float) -> None:
    """Five points, but stubby (inner radius 0.8 of the outer)."""
    from demo.world import star_points

    size = draw.im.size
    from PIL import Image, ImageDraw

    for colour, left in (((220, 30, 30), True), ((30, 60, 230), False)):
        mask = Image.new("L", size, 0)
        ImageDraw.Draw(mask).polygon(star_points(cx, cy, r * 1.1, inner=0.8), fill=255)
        half = Image.new("L", size, 0)
        ImageDraw.Draw(half).rectangle([0, 0, cx, size[1]] if left else [cx, 0, size[0], size[1]], fill=255)
        draw.bitmap((0, 0), Image.fromarray(np.minimum(np.asarray(mask), np.asarray(half))), fill=colour)


def _draw_handleless_mug(draw, cx: float, cy: float, r: float) -> None:
    w, h = r * 0.75, r * 0.9
    x0, x1 = cx - w - r * 0.15, cx + w - r * 0.15
    draw.rectangle([x0, cy - h, x1, cy + h], fill=(250, 220, 20))
    draw.rectangle([x0, cy - h * 0.2, x1, cy + h * 0.2], fill=(15, 15, 15))


def _draw_two_blocks(draw, cx: float, cy: float, r: float) -> None:
    """Two yellow blocks with a dark gap and no handle: what LoRA mode drew for the mug before issue 20."""
    w, h = r * 0.85, r * 0.9
    draw.rectangle([cx - w, cy - h, cx + w, cy - h * 0.2], fill=(250, 220, 20))
    draw.rectangle([cx - w, cy + h * 0.2, cx + w, cy + h], fill=(250, 220, 20))


def _draw_twin_star(draw, cx: float, cy: float, r: float) -> None:
    """The split star drawn twice, side by side, smaller."""
    from demo.world import _draw_split_star

    _draw_split_star(draw, cx - r * 0.55, cy, r * 0.5)
    _draw_split_star(draw, cx + r * 0.6, cy, r * 0.45)


def _cut_by_frame(product_id: str):
    """The product itself, drawn 1.6x as large and a third of its radius off-centre: cut by the frame, as the
    star was when trained with crops zoomed up to 1.5x (docs/FIDELITY.md)."""

    def draw_fn(draw, cx: float, cy: float, r: float) -> None:
        get_product_draw(product_id)(draw, cx + r / 3, cy - r / 3, r * 1.6)

    return draw_fn


BROKEN = {
    "split-star": {
        "blob": _draw_blob_star,
        "stubby": _draw_stubby_star,
        "twice": _draw_twin_star,
        "cut by the frame": _cut_by_frame("split-star"),
    },
    "striped-mug": {
        "no handle": _draw_handleless_mug,
        "two blocks": _draw_two_blocks,
        "cut by the frame": _cut_by_frame("striped-mug"),
    },
}


def render_with(draw_fn, background: str, rng: np.random.Generator, mirror: bool = False):
    """A true-render twin drawn with `draw_fn` (the same placement and background draws as `render_product`)."""
    from PIL import Image, ImageOps

    from demo import world

    product = world.Product("variant", "variant", "", draw_fn)
    world.PRODUCTS["variant"] = product
    try:
        image = world.render_product("variant", background, rng)
    finally:
        del world.PRODUCTS["variant"]
    return ImageOps.mirror(image) if mirror else Image.Image.copy(image)


def check(n: int = 100, seed: int = 9) -> dict:
    """Pass rates on fresh true renders (goal >= 0.98 in every scene) and on broken variants (goal ~0)."""
    from demo.world import BACKGROUNDS, render_product

    out: dict = {}
    for pid in ("split-star", "striped-mug"):
        rows = {}
        for bg in BACKGROUNDS:
            rng = np.random.default_rng(seed)
            true = [render_product(pid, bg, rng) for _ in range(n)]
            row: dict[str, Any] = {
                "true": shape_rate(pid, bg, true),
                "true decoded": shape_rate(pid, bg, decoded(true)),
            }
            if pid == "striped-mug":  # a mirrored mug is still the mug (handle on the left)
                row["hole"] = hole_rate(true)
                row["hole decoded"] = hole_rate(decoded(true))
                mirrored = [render_with(get_product_draw(pid), bg, rng, mirror=True) for _ in range(n)]
                row["mirrored"] = shape_rate(pid, bg, mirrored)
            for name, fn in BROKEN[pid].items():
                broken = [render_with(fn, bg, rng) for _ in range(n)]
                row[name] = shape_rate(pid, bg, broken)
                row[f"{name} decoded"] = shape_rate(pid, bg, decoded(broken))
                if pid == "striped-mug":
                    row[f"{name} hole"] = hole_rate(broken)
            row["thresholds"] = thresholds(pid, bg)
            rows[bg] = row
        out[pid] = rows
    return out


def get_product_draw(product_id: str):
    from demo.world import get_product

    return get_product(product_id).draw


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100, help="renders per scene and variant")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    result = check(args.n)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for pid, rows in result.items():
        print(pid)
        for bg, row in rows.items():
            cells = "  ".join(f"{k}={v:.2f}" for k, v in row.items() if k != "thresholds")
            print(f"  {bg:8} {cells}  {row['thresholds']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
