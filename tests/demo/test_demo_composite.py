"""Placement mode's composite on the shipped demo model and products (demo.composite_eval's measures, a fixed
set of renders): the product adapter no longer draws a second product around the placed one, the kept
pixels stay exact with the shadow on, and the edge leaves no light ring on the black studio."""

from __future__ import annotations

import numpy as np
import pytest

from demo.composite_eval import ghost_free, halo, outside_region, scene_level
from demo.placement_eval import Renderer, product_photo
from services.generator import placement

pytestmark = pytest.mark.slow
SEEDS = [300, 301, 302, 303]
# Where the adapter drew a second product around the placed one before issue 20 (demo.composite_eval --before:
# ghost-free 0.00, 0.00 and 0.25 of 8 images; now, with the scene prompt and the adapter off, 1.00, 1.00 and 1.00).
CASES = [("split-star", "flowers"), ("striped-mug", "fire"), ("split-star", "black")]


@pytest.fixture(scope="module")
def renderer():
    return Renderer()


@pytest.mark.parametrize(("product_id", "scene"), CASES, ids=[f"{p}-{s}" for p, s in CASES])
def test_the_product_adapter_no_longer_paints_a_second_product(renderer, product_id, scene):
    photo, mask = product_photo(product_id, "white", seed=0)
    scenes = renderer.render_scene(scene, SEEDS)
    rates = {}
    for scene_only in (False, True):
        images, placed = renderer.render(product_id, scene, SEEDS, "placement+lora", photo, mask, scene_only=scene_only)
        frame_mask = placement.arrays(placed)[1]
        level = scene_level(product_id, scenes, outside_region(frame_mask))
        rates[scene_only] = float(np.mean([ghost_free(product_id, im, frame_mask, level) for im in images]))
    assert rates[True] >= 0.75 and rates[True] > rates[False], rates


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
