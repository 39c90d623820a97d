"""Placement mode's composite on the shipped demo model and products (demo.composite_eval's measures, a fixed
set of renders): the product adapter no longer draws a second product around the placed one, the scene around
the product is the empty scene (the backdrop adapter, `scene_first`), the kept pixels stay exact with the
shadow on, and the edge leaves no light ring on the black studio."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from demo.composite_eval import blobs, ghost_free, halo, outside_region, scene_level
from demo.placement_eval import Renderer, product_photo
from services.generator import placement

pytestmark = pytest.mark.slow
SEEDS = [300, 301, 302, 303]
# Where the adapter draws a second product around the placed one with the product adapter over the whole frame
# (scene_only off; the demo model of stop 30: ghost-free 0.00-0.25 in 11 of the 12 product x scene cells, the
# mug over the fire 1.00; the star of stop 31 over beach / fire / city / white / black: 0.00 / 0.00 / 0.25 /
# 0.75 / 1.00 of these 4 images); with it, 1.00.
CASES = [("split-star", "flowers"), ("striped-mug", "flowers"), ("split-star", "fire")]


@pytest.fixture(scope="module")
def renderer():
    return Renderer()


@pytest.fixture(scope="module")
def stop26():
    """Placement as served at stop 26: no backdrop adapter, the product held from the first step."""
    return Renderer(empty_scene=False)


@pytest.mark.parametrize(("product_id", "scene"), CASES, ids=[f"{p}-{s}" for p, s in CASES])
def test_the_product_adapter_no_longer_paints_a_second_product(renderer, product_id, scene):
    photo, mask = product_photo(product_id, "white", seed=0)
    scenes = renderer.render_scene(scene, SEEDS, photo, mask)
    rates = {}
    for scene_only in (False, True):
        images, placed = renderer.render(product_id, scene, SEEDS, "placement+lora", photo, mask, scene_only=scene_only)
        frame_mask = placement.arrays(placed)[1]
        level = scene_level(product_id, scenes, outside_region(frame_mask))
        rates[scene_only] = float(np.mean([ghost_free(product_id, im, frame_mask, level) for im in images]))
    assert rates[True] == 1.0 and rates[True] > rates[False], rates


def test_the_scene_around_the_product_does_not_depend_on_the_product(renderer):
    """scene_first 1: the scene is drawn whole, the product composited over it, so outside the products, their
    feathered edges and shadows, a star and a mug placed with the same seed get the very same scene: nothing of
    a product's colours can leak into it. Held from the first step, the scene follows the product."""
    untouched, images = None, {}
    for product_id in ("split-star", "striped-mug"):
        photo, mask = product_photo(product_id, "white", seed=0)
        for f in (1.0, 0.0):
            (image,), placed = renderer.render(product_id, "beach", SEEDS[:1], "placement", photo, mask, scene_first=f)
            frame_mask = placement.arrays(placed)[1]
            shade = np.frombuffer(placed.shadow_map, np.uint8).reshape(frame_mask.shape)
            here = ~frame_mask & (shade == 0)
            untouched = here if untouched is None else untouched & here
            images[product_id, f] = np.asarray(image)
    assert untouched.sum() > 0.3 * untouched.size
    assert np.array_equal(images["split-star", 1.0][untouched], images["striped-mug", 1.0][untouched])
    assert not np.array_equal(images["split-star", 0.0][untouched], images["striped-mug", 0.0][untouched])


def test_no_object_of_the_models_own_beside_the_product(renderer, stop26):
    """The demo model draws an object in every scene it was never shown empty; at stop 26 placement mode let it
    show behind the star on the white studio. The backdrop adapter (the scene with nothing in it) removes it."""
    photo, mask = product_photo("split-star", "white", seed=0)
    free = {}
    for name, r in (("now", renderer), ("stop 26", stop26)):
        images, placed = r.render("split-star", "white", SEEDS, "placement", photo, mask)
        frame_mask = placement.arrays(placed)[1]
        shade = np.frombuffer(placed.shadow_map, np.uint8).reshape(frame_mask.shape)
        free[name] = float(np.mean([blobs(im, "white", frame_mask, shade) == 0 for im in images]))
    assert free["now"] == 1.0 and free["stop 26"] < 1.0, free


def test_a_product_held_part_way_stays_exact(renderer):
    """0 < scene_first < 1: the product's latents are held from the middle of the denoising; the kept pixels
    are exact all the same, and the scene differs from both ends."""
    photo, mask = product_photo("split-star", "white", seed=0)
    out = {}
    for f in (0.0, 0.5, 1.0):
        (image,), placed = renderer.render("split-star", "fire", SEEDS[:1], "placement", photo, mask, scene_first=f)
        rgb, frame_mask = placement.arrays(placed)
        kept = placement.weights(placed) == 255
        assert np.array_equal(np.asarray(image)[kept], rgb[kept]), f
        out[f] = np.asarray(image)[~ndimage.binary_dilation(frame_mask, iterations=2)].astype(int)
    assert np.abs(out[0.5] - out[0.0]).mean() > 0.5 and np.abs(out[0.5] - out[1.0]).mean() > 0.5


def test_exact_pixels_a_shadow_and_no_light_ring_on_the_black_studio(renderer):
    photo, mask = product_photo("striped-mug", "white", seed=0)
    images, placed = renderer.render("striped-mug", "black", SEEDS, "placement", photo, mask)
    rgb, frame_mask = placement.arrays(placed)
    weights = placement.weights(placed)
    assert placed.shadow is not None and placed.box[3] == round(0.85 * 32)  # on the studio floor, with a shadow
    for image in images:
        out = np.asarray(image)
        assert np.array_equal(out[weights == 255], rgb[weights == 255])
        assert not halo(image, frame_mask, weights)
