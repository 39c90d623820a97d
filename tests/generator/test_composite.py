"""Placement mode's composite (services/generator/placement.py): clean edges, see-through holes, the contact
shadow and the ground line, without a model: the product composited over plain scenes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from demo.composite_eval import halo, light_ring_share
from demo.placement_eval import png_bytes, product_photo
from services.common.errors import InvalidArgument
from services.generator import placement as P
from services.generator.messages import Shadow

LIMIT = 1 << 22
DARK_SCENES = {"black": (20, 20, 22), "flowers": (45, 105, 40), "fire": (150, 40, 5)}


def placed_shot(product_id: str, size: int = 32, **kwargs):
    """The demo catalogue shot (the product on the white studio) placed as the server places it."""
    photo, _ = product_photo(product_id, "white", seed=0, size=size)
    return P.place_upload(
        png_bytes(photo), b"", None, P.ProductBox(0.5, 0.5, 0.6), size, size, max_pixels=LIMIT, **kwargs
    )


@pytest.mark.parametrize("product_id", ["split-star", "striped-mug"])
@pytest.mark.parametrize("size", [32, 128])
def test_a_product_found_on_white_leaves_no_light_ring_on_dark_scenes(product_id, size):
    photo, _ = product_photo(product_id, "white", seed=0, size=size)
    placed, record = P.place_upload(png_bytes(photo), b"", None, None, size, size, max_pixels=LIMIT)  # stays in place
    assert record["edge"] == "decontaminated" and record["mask_source"] == "found"
    _, mask = P.arrays(placed)
    for name, colour in DARK_SCENES.items():
        out = P.composite(Image.new("RGB", (size, size), colour), placed)
        assert not halo(out, mask, P.weights(placed)), (name, light_ring_share(out, mask, P.weights(placed)))
    # The check can fail: the photo's own edge pixels blended by the feather ramp (before issue 20) on black.
    old = P.PlacedProduct(**{**placed.__dict__, "rgb": np.asarray(photo).tobytes(), "alpha": b""})
    black = Image.new("RGB", (size, size), DARK_SCENES["black"])
    before = light_ring_share(P.composite(black, old), mask, P.weights(old))
    after = light_ring_share(P.composite(black, placed), mask, P.weights(placed))
    assert before > 2 * after + 0.02, (before, after)


def test_decontaminate_recovers_the_colour_and_coverage_of_a_blended_edge():
    product, background = np.array([250, 220, 20]), np.array([245, 245, 245])
    rgb = np.zeros((5, 5, 3), np.uint8)
    rgb[:] = product
    rgb[0, :] = np.round(0.4 * product + 0.6 * background)  # the top row: 40% product on white
    mask = np.ones((5, 5), bool)
    clean, coverage = P.decontaminate(rgb, mask, background)
    assert np.abs(clean[0].astype(int) - product).max() <= 3 and np.allclose(coverage[0], 0.4, atol=0.02)
    assert np.array_equal(clean[1:-1, 1:-1], rgb[1:-1, 1:-1]) and (coverage[1:-1, 1:-1] == 1).all()


def test_background_seen_through_a_thin_handle_is_not_product_but_a_white_label_is():
    photo, exact = product_photo("striped-mug", "white", seed=0, size=128)
    found = P.find_mask(np.asarray(photo))
    hole = ndimage.binary_fill_holes(exact) & ~exact  # inside the handle
    assert hole.sum() > 20 and not (found & P.erode(hole, 1)).any()
    # A white label in the middle of a thick product stays product: it is not the background showing through.
    label = np.asarray(photo).copy()
    ys, xs = np.nonzero(exact)
    cy, cx = int(ys.mean()), int(xs.mean()) - 10
    label[cy - 4 : cy + 4, cx - 6 : cx + 6] = 245
    with_label = P.find_mask(label)
    assert with_label[cy - 4 : cy + 4, cx - 6 : cx + 6].all()


def test_inner_pixels_stay_exact_with_decontamination_and_a_shadow():
    photo, _ = product_photo("split-star", "white", seed=0, size=64)
    placed, record = P.place_upload(
        png_bytes(photo), b"", None, None, 64, 64, max_pixels=LIMIT, shadow=Shadow(0.6, 0.5)
    )
    assert record["placement"]["height"] and placed.box  # a photo of the frame's size stays where it is
    out = np.asarray(P.composite(Image.new("RGB", (64, 64), (40, 120, 200)), placed))
    kept = P.weights(placed) == 255
    assert kept.sum() > 300 and np.array_equal(out[kept], np.asarray(photo)[kept])


@pytest.mark.parametrize("strength", [0.3, 0.6, 0.9])
def test_the_shadow_darkens_its_core_by_the_strength_asked(strength):
    placed, record = placed_shot("striped-mug", 128, ground=0.85, shadow=Shadow(strength, 0.5))
    assert record["shadow"]["strength"] == strength
    rng = np.random.default_rng(0)
    scene = Image.fromarray(rng.integers(120, 220, (128, 128, 3), dtype=np.uint8))
    band = P.shadow_band(placed)
    assert band.sum() > 20 and not (band & P.arrays(placed)[1]).any()  # outside the product
    luma = np.array([0.299, 0.587, 0.114])
    with_shadow = np.asarray(P.composite(scene, placed), float) @ luma
    plain = np.asarray(P.composite(scene, P.PlacedProduct(**{**placed.__dict__, "shadow": None})), float) @ luma
    fall = 1 - with_shadow[band].mean() / plain[band].mean()
    assert abs(fall - strength) <= 0.1 * strength, fall
    # Under the product, not above it; nothing changes far from it.
    ys, _ = np.nonzero(band)
    assert ys.min() >= placed.box[3] - 3
    far = np.ones(band.shape, bool)
    far[placed.box[1] - 10 :, :] = False
    assert np.array_equal(with_shadow[far], plain[far])


def test_strength_zero_draws_no_shadow_and_the_preview_shows_one():
    none, record = placed_shot("split-star", 64, ground=0.85, shadow=Shadow(0.0, 0.5))
    assert none.shadow is None and not none.shadow_map and record["shadow"] == {"strength": 0.0}
    some, _ = placed_shot("split-star", 64, ground=0.85, shadow=Shadow(0.8, 0.3))
    a, b = np.asarray(P.preview(none), float), np.asarray(P.preview(some), float)
    assert (b[P.shadow_band(some)] < a[P.shadow_band(some)] - 20).all()


def test_a_surface_stands_the_product_on_its_ground_line():
    for size in (32, 128):  # resampled to the default height, or (the frame's size) moved, never resampled
        photo, _ = product_photo("striped-mug", "white", seed=0, size=size)
        placed, record = P.place_upload(
            png_bytes(photo), b"", None, P.ProductBox(0.5, 0.5, 0.6), size, size, max_pixels=LIMIT, ground=0.85
        )
        assert abs(placed.box[3] - 0.85 * size) <= 1 and record["ground_line"] == 0.85
        if size == 32:
            h = placed.box[3] - placed.box[1]
            assert h == int(P.find_mask(np.asarray(photo)).any(1).sum())  # the product's own size
    # A placement in the request wins over the ground line (and the record says there was none).
    placed, record = P.place_upload(
        png_bytes(photo), b"", P.ProductBox(0.5, 0.4, 0.5), None, 128, 128, max_pixels=LIMIT, ground=0.85
    )
    assert abs((placed.box[1] + placed.box[3]) / 2 - 0.4 * 128) <= 1 and record["ground_line"] == 0.0


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ((1.5, 0.5, 0, 0), "shadow.strength"),
        ((-0.1, 0.5, 0, 0), "shadow.strength"),
        ((0.5, float("nan"), 0, 0), "shadow.softness"),
        ((0.5, 0.5, 2.0, 0), "shadow.offset_x"),
        ((0.5, 0.5, 0, float("inf")), "shadow.offset_y"),
    ],
)
def test_bad_shadow_settings_name_the_field(values, field):
    with pytest.raises(InvalidArgument) as err:
        P.check_shadow(*values, "product_image.shadow")
    assert err.value.field == f"product_image.{field}"


@pytest.mark.parametrize("size", [64, 128, 256])
def test_no_white_patch_inside_the_handle_whatever_the_photos_size(size):
    # A catalogue shot of any size, placed in a small frame: the scene shows inside the handle, not the studio white.
    photo, _ = product_photo("striped-mug", "white", seed=0, size=size)
    placed, _ = P.place_upload(png_bytes(photo), b"", None, P.ProductBox(0.5, 0.5, 0.6), 32, 32, max_pixels=LIMIT)
    out = np.asarray(P.composite(Image.new("RGB", (32, 32), (30, 60, 200)), placed))
    assert not (out > 230).all(-1).any()


@pytest.mark.parametrize("product_id", ["split-star", "striped-mug"])
def test_the_blob_measure_sees_an_object_beside_the_product_not_the_scene_or_the_shadow(product_id):
    """demo.composite_eval.blobs on the real composite over true empty scenes (with the contact shadow): none;
    with a world object drawn behind the product, sticking out beside it: found, in every scene."""
    from PIL import ImageDraw

    from demo.composite_eval import blobs
    from demo.world import BACKGROUNDS, COLOURS, draw_shape, render_background

    placed, _ = placed_shot(product_id, shadow=Shadow(0.5, 0.5, 0.0, 0.0), ground=0.85)
    _, mask = P.arrays(placed)
    shade = np.frombuffer(placed.shadow_map, np.uint8).reshape(mask.shape)
    for background in BACKGROUNDS:
        # An object in a colour the scene does not have (the demo model draws its objects in the world's colours).
        colour = COLOURS["green" if background in ("fire", "white", "black", "beach") else "purple"]
        for seed in range(5):
            empty = render_background(background, seed, size=128)
            with_object = empty.copy()
            draw_shape(ImageDraw.Draw(with_object), "square", 64 + 24, 60, 40, colour)
            clean = P.composite(empty.resize((32, 32), Image.LANCZOS), placed)
            assert blobs(clean, background, mask, shade) == 0, (background, seed)
            blob = P.composite(with_object.resize((32, 32), Image.LANCZOS), placed)
            assert blobs(blob, background, mask, shade) >= 10, (background, seed)
