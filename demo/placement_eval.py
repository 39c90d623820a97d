"""Placement mode measured on the demo world: exactness, scene accuracy and fidelity, held-out scenes.

    python -m demo.placement_eval --json        # figures for docs/FIDELITY.md ("Placement mode")

For each demo product and each of its held-out scenes (`demo.make_products.HELD_OUT`), a catalogue
shot of the product on the white studio background is rendered together with its exact mask (the
product drawn alone, alpha >= 128 after the same 4x LANCZOS downscale). The shot and mask go
through placement mode exactly as the generator runs it (`ProductPipeline`, the demo SD, the template's
prompt, with and without the product adapter), and each result is PNG-encoded and decoded, then:

- `mismatched`: pixels inside the mask eroded by the feather width that differ from the shot (goal 0);
- `scene`: the judge's background accuracy on the result, against the scene asked for (goal >= 95%);
- `fidelity`: `demo.fidelity.score` of the result, beside the score of the shot itself.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from demo.world import SUPERSAMPLE, draw_background, get_product

ROOT = Path(__file__).resolve().parent.parent


def product_photo(
    product_id: str, background: str = "white", seed: int = 0, size: int = 32, cx: float = 16, cy: float = 16,
    r: float = 10.5,
) -> tuple[Image.Image, np.ndarray]:
    """The product on `background` (drawn as `demo.world` draws it) and its exact mask (bool)."""
    big = size * SUPERSAMPLE
    k = big / 32.0
    scene = Image.new("RGB", (big, big))
    draw_background(ImageDraw.Draw(scene), background, big, np.random.default_rng(seed))
    get_product(product_id).draw(ImageDraw.Draw(scene), cx * k, cy * k, r * k)
    alone = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    get_product(product_id).draw(ImageDraw.Draw(alone), cx * k, cy * k, r * k)
    alpha = np.asarray(alone.getchannel("A").resize((size, size), Image.LANCZOS))
    return scene.resize((size, size), Image.LANCZOS), alpha >= 128


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
