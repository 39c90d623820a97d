"""Per-pixel colour classes of the demo products, shared by the colour metric (`demo.fidelity`) and the
shape criterion (`demo.shape`). Fixed RGB thresholds (0-255); docs/FIDELITY.md explains each rule."""

from __future__ import annotations

import numpy as np
from PIL import Image


def to_array(image) -> np.ndarray:
    """An image (PIL or array) as a 32x32 RGB array: the demo metrics are defined at the demo model's size."""
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        if image.size != (32, 32):
            image = image.resize((32, 32), Image.Resampling.LANCZOS)
    return np.asarray(image)


def colour_classes(arr: np.ndarray) -> dict[str, np.ndarray]:
    a = np.asarray(arr, dtype=np.int32)[..., :3]
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    return {
        "red": (r > 140) & (g < 90) & (b < 100) & (r - np.maximum(g, b) > 80) & (b > 0.35 * g - 5),
        "blue": (b > 140) & (r < 110) & (g < 110) & (b - np.maximum(r, g) > 60),
        "yellow": (r > 170) & (g > 150) & (b < 110),
        # The band: anything clearly darker in green than the yellow body (the demo model draws the black
        # stripe as a dark orange-brown band at 32x32).
        "dark": g < 125,
    }
