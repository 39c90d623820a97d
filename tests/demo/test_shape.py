"""The shape criterion (demo/shape.py): true renders pass in every scene, broken variants fail.

Thresholds come from true renders, never from generated images; the variants are what LoRA mode drew before
issue 20 (a blob in the star's colours, two yellow blocks with no handle) and one thing wrong at a time
(stubby points, the product drawn twice, no handle, the whole product drawn too large and cut by the frame).
"""

from __future__ import annotations

import numpy as np
import pytest

from demo import shape
from demo.world import BACKGROUNDS, render_product

N = 40  # renders per scene and variant: a 2-core CI machine does all of them in seconds


def renders(product_id: str, background: str, seed: int = 77) -> list:
    rng = np.random.default_rng(seed)
    return [render_product(product_id, background, rng) for _ in range(N)]


@pytest.mark.parametrize("product_id", ["split-star", "striped-mug"])
@pytest.mark.parametrize("background", BACKGROUNDS)
def test_true_renders_pass_and_broken_variants_fail(product_id, background):
    true = renders(product_id, background)
    assert shape.shape_rate(product_id, background, true) >= 0.975
    rng = np.random.default_rng(5)
    for name, draw in shape.BROKEN[product_id].items():
        broken = [shape.render_with(draw, background, rng) for _ in range(N)]
        assert shape.shape_rate(product_id, background, broken) <= 0.15, name  # mug, two blocks, flowers: 0.13
    if product_id == "striped-mug":  # a mug seen from the other side is the same mug
        mirrored = [
            shape.render_with(shape.get_product_draw(product_id), background, rng, mirror=True) for _ in range(N)
        ]
        assert shape.shape_rate(product_id, background, mirrored) >= 0.975


@pytest.mark.parametrize("background", ["beach", "flowers", "city", "white", "black"])
def test_a_blob_blurred_by_the_models_decoder_is_still_no_star(background):
    # The decoder softens every edge; softening cannot turn a blob into a star. (Its ceiling, the share of true
    # stars it keeps, is what `python -m demo.shape` reports; the bar itself comes from true renders only.)
    rng = np.random.default_rng(6)
    blobs = [shape.render_with(shape.BROKEN["split-star"]["blob"], background, rng) for _ in range(N)]
    assert shape.shape_rate("split-star", background, shape.decoded(blobs)) <= 0.05
    limits = shape.thresholds("split-star", background)
    assert 0.6 < limits["max_solidity"] < 0.75 and limits["min_area"] > 20  # from the crisp renders only


@pytest.mark.parametrize("background", ["beach", "city", "white", "black"])
def test_a_handle_encloses_a_hole_and_a_ragged_edge_does_not(background):
    # The stricter mug test: a hole shut in beside the body. Not over the fire or among flowers, where the thin
    # ring blends into the scene (25% and 94% of true renders close it): its named blind spot.
    true = renders("striped-mug", background)
    assert shape.hole_rate(true) >= 0.975
    rng = np.random.default_rng(5)
    draw = shape.get_product_draw("striped-mug")
    mirrored = [shape.render_with(draw, background, rng, mirror=True) for _ in range(N)]
    assert shape.hole_rate(mirrored) >= 0.975
    for name in ("no handle", "two blocks"):  # a mug cut by the frame may keep its handle: the frame test's job
        broken = shape.BROKEN["striped-mug"][name]
        assert shape.hole_rate([shape.render_with(broken, background, rng) for _ in range(N)]) == 0.0, name


def test_no_product_is_no_shape():
    from PIL import Image

    assert not shape.shape_ok("split-star", "white", Image.new("RGB", (32, 32), (245, 245, 245)))
    assert not shape.shape_ok("striped-mug", "black", Image.new("RGB", (32, 32), (20, 20, 22)))
    assert shape.solidity(np.ones((5, 5), bool)) == pytest.approx(1.0)
