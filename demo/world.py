"""The demo world: procedural scenes (an object on a background), their captions, and products.

Scenes are drawn with PIL at 4x and downscaled with LANCZOS, so edges are anti-aliased like photos.
The attribute sets are small on purpose: a ~2M-parameter diffusion model learns them in minutes on CPU.

    from demo.world import random_scene, render_scene, caption, render_product
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SUPERSAMPLE = 4

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (60, 210, 60),
    "blue": (30, 60, 230),
    "yellow": (250, 220, 20),
    "purple": (150, 50, 200),
}
SHAPES = ("circle", "square", "triangle", "star")
BACKGROUNDS = ("beach", "fire", "flowers", "city", "white", "black")

# Background -> (phrase used after the object, noun phrase used when the scene comes first).
# These are the scene words the demo model was trained on; demo scene templates should use them.
SCENE_PHRASES: dict[str, tuple[str, str]] = {
    "beach": ("on the beach", "a beach"),
    "fire": ("in front of a fire", "a fire"),
    "flowers": ("among flowers", "flowers"),
    "city": ("in a minimal city", "a minimal city"),
    "white": ("on a white background", "a white background"),
    "black": ("on a black background", "a black background"),
}

# (template, weight). Reordered and attribute-dropping variants teach the text encoder that each word
# carries one attribute; the first one is the canonical prompt used for evaluation.
TEMPLATES: tuple[tuple[str, float], ...] = (
    ("a photo of a {colour} {shape} {where}", 0.40),
    ("a {colour} {shape} {where}", 0.12),
    ("a photo of {place} with a {colour} {shape}", 0.10),
    ("{place} with a {colour} {shape}", 0.08),
    ("{where}, a {colour} {shape}", 0.06),
    ("a photo of a {shape} {where}", 0.08),
    ("a photo of a {colour} {shape}", 0.08),
    ("a photo of a {colour} thing {where}", 0.08),
)
EMPTY_PROMPT_RATE = 0.10


@dataclass(frozen=True)
class Scene:
    """One scene: what is drawn and where (centre and radius in output pixels of a 32x32 frame)."""

    colour: str
    shape: str
    background: str
    cx: float = 16.0
    cy: float = 16.0
    radius: float = 10.5
    seed: int = 0  # drives the background's own randomness (horizon, dots, blocks, colour jitter)


@dataclass(frozen=True)
class Product:
    """A distinct object with a fixed look that the base model has no single caption word for."""

    id: str
    display_name: str
    description: str
    draw: Callable[[ImageDraw.ImageDraw, float, float, float], None]
    category: str = "demo"


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int) -> tuple[int, int, int]:
    r, g, b = (int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)
    return r, g, b


def _lerp(a: tuple[int, int, int], b: tuple[int, int, int], t: float) -> tuple[int, int, int]:
    r, g, b_ = (round(x + (y - x) * t) for x, y in zip(a, b, strict=True))
    return r, g, b_


def draw_background(draw: ImageDraw.ImageDraw, name: str, size: int, rng: np.random.Generator) -> None:
    """Paint background `name` over a `size` x `size` canvas (size is the supersampled size)."""
    s = size
    if name == "beach":
        horizon = int(s * rng.uniform(0.42, 0.58))
        sea_top, sea_bottom = _jitter((40, 120, 200), rng, 12), _jitter((60, 160, 210), rng, 12)
        for y in range(horizon):
            draw.line([(0, y), (s, y)], fill=_lerp(sea_top, sea_bottom, y / max(horizon - 1, 1)))
        draw.rectangle([0, horizon, s, s], fill=_jitter((225, 195, 140), rng, 10))
    elif name == "fire":
        top, bottom = _jitter((120, 10, 0), rng, 15), _jitter((255, 150, 20), rng, 10)
        for y in range(s):
            draw.line([(0, y), (s, y)], fill=_lerp(top, bottom, y / (s - 1)))
        for _ in range(int(rng.integers(3, 6))):  # a few tongues of flame, brighter than the gradient
            x, w = rng.uniform(0, s), rng.uniform(0.08, 0.18) * s
            h = rng.uniform(0.3, 0.6) * s
            draw.polygon([(x - w, s), (x + w, s), (x, s - h)], fill=_jitter((255, 190, 40), rng, 10))
    elif name == "flowers":
        draw.rectangle([0, 0, s, s], fill=_jitter((45, 105, 40), rng, 8))
        for _ in range(int(rng.integers(18, 28))):
            px, py = rng.uniform(0, s), rng.uniform(0, s)
            r = rng.uniform(0.025, 0.045) * s
            petal = ((255, 150, 200), (255, 255, 255), (255, 110, 160))[int(rng.integers(0, 3))]
            draw.ellipse([px - r, py - r, px + r, py + r], fill=_jitter(petal, rng, 10))
    elif name == "city":
        draw.rectangle([0, 0, s, s], fill=_jitter((205, 215, 225), rng, 8))
        x = -rng.uniform(0, 0.1) * s
        while x < s:
            w = rng.uniform(0.12, 0.25) * s
            h = rng.uniform(0.35, 0.8) * s
            grey = int(rng.integers(90, 150))
            draw.rectangle([x, s - h, x + w - 0.02 * s, s], fill=(grey, grey, grey + 5))
            x += w
    elif name == "white":
        draw.rectangle([0, 0, s, s], fill=_jitter((245, 245, 245), rng, 6))
    elif name == "black":
        draw.rectangle([0, 0, s, s], fill=_jitter((20, 20, 22), rng, 6))
    else:
        raise ValueError(f"unknown background {name!r}; choose one of {BACKGROUNDS}")


def star_points(cx: float, cy: float, r: float, points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    out = []
    for k in range(points * 2):
        rad = r if k % 2 == 0 else r * inner
        a = -np.pi / 2 + k * np.pi / points
        out.append((cx + rad * np.cos(a), cy + rad * np.sin(a)))
    return out


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    """Draw `shape` centred at (cx, cy) with circumradius-ish `r`, all in canvas pixels."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = r * 0.85
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)], fill=fill)
    elif shape == "star":
        draw.polygon(star_points(cx, cy, r * 1.1), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def _draw_split_star(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float) -> None:
    # Left half red, right half blue: draw the star twice, each clipped to a half-plane via a mask layer.
    size = draw.im.size
    for colour, left in (((220, 30, 30), True), ((30, 60, 230), False)):
        mask = Image.new("L", size, 0)
        ImageDraw.Draw(mask).polygon(star_points(cx, cy, r * 1.1), fill=255)
        half = Image.new("L", size, 0)
        box = [0, 0, cx, size[1]] if left else [cx, 0, size[0], size[1]]
        ImageDraw.Draw(half).rectangle(box, fill=255)
        mask = Image.fromarray(np.minimum(np.asarray(mask), np.asarray(half)))
        draw.bitmap((0, 0), mask, fill=colour)


def _draw_striped_mug(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float) -> None:
    w, h = r * 0.75, r * 0.9
    x0, x1 = cx - w - r * 0.15, cx + w - r * 0.15
    handle_w = max(2.0, r * 0.14)
    draw.ellipse([x1 - r * 0.3, cy - h * 0.5, x1 + r * 0.45, cy + h * 0.4], outline=(250, 220, 20), width=int(handle_w))
    draw.rectangle([x0, cy - h, x1, cy + h], fill=(250, 220, 20))
    draw.rectangle([x0, cy - h * 0.2, x1, cy + h * 0.2], fill=(15, 15, 15))


PRODUCTS: dict[str, Product] = {
    p.id: p
    for p in (
        Product("split-star", "Split Star", "a star whose left half is red and right half is blue", _draw_split_star),
        Product("striped-mug", "Striped Mug", "a yellow mug with a black stripe", _draw_striped_mug),
    )
}


# Backgrounds never shown in a product's training (demo.make_products), where fidelity is measured on unseen scenes.
HELD_OUT: dict[str, tuple[str, ...]] = {"split-star": ("city", "black"), "striped-mug": ("city", "flowers")}


def get_product(product_id: str) -> Product:
    try:
        return PRODUCTS[product_id]
    except KeyError:
        raise KeyError(f"unknown product {product_id!r}; known: {sorted(PRODUCTS)}") from None


def _canvas(background: str, size: int, seed: int) -> tuple[Image.Image, ImageDraw.ImageDraw, float]:
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big))
    draw = ImageDraw.Draw(img)
    draw_background(draw, background, big, np.random.default_rng(seed))
    return img, draw, big / 32.0  # scene coordinates are in a 32x32 frame


def _finish(img: Image.Image, size: int) -> Image.Image:
    return img.resize((size, size), Image.Resampling.LANCZOS)


def render_scene(scene: Scene, size: int = 32) -> Image.Image:
    """Render `scene` to a size x size RGB image (drawn at 4x, LANCZOS-downscaled)."""
    img, draw, k = _canvas(scene.background, size, scene.seed)
    fill = _jitter(COLOURS[scene.colour], np.random.default_rng(scene.seed + 1), 12)
    draw_shape(draw, scene.shape, scene.cx * k, scene.cy * k, scene.radius * k, fill)
    return _finish(img, size)


def render_background(background: str, seed: int, size: int = 32) -> Image.Image:
    """The scene `background` with nothing in it (the world itself never shows one; placement's backdrop does)."""
    img, _, _ = _canvas(background, size, seed)
    return _finish(img, size)


def random_placement(rng: np.random.Generator) -> tuple[float, float, float]:
    """Centre and radius (32x32 frame): large and near the middle, so shape stays readable at 32x32."""
    return 16 + rng.uniform(-3, 3), 16 + rng.uniform(-3, 3), rng.uniform(9.0, 12.0)


def render_product(product_id: str, background: str, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """Render product `product_id` on `background` at a random placement drawn from `rng`."""
    return render_product_and_mask(product_id, background, rng, size)[0]


def render_product_and_mask(
    product_id: str, background: str, rng: np.random.Generator, size: int = 32
) -> tuple[Image.Image, Image.Image]:
    """`render_product` (the same draws from `rng`) and the product's coverage as an "L" mask (255 = product),
    anti-aliased like the image. Coverage is where the product drawn over black and over white agree, so a
    product's own black or white parts count as product."""
    product = get_product(product_id)
    cx, cy, r = random_placement(rng)
    img, draw, k = _canvas(background, size, int(rng.integers(0, 2**31)))
    product.draw(draw, cx * k, cy * k, r * k)
    big = size * SUPERSAMPLE
    on = []
    for colour in ("black", "white"):
        canvas = Image.new("RGB", (big, big), colour)
        product.draw(ImageDraw.Draw(canvas), cx * k, cy * k, r * k)
        on.append(np.asarray(canvas, dtype=np.int16))
    covered = (np.abs(on[0] - on[1]).max(axis=-1) == 0).astype(np.uint8) * 255
    return _finish(img, size), Image.fromarray(covered, "L").resize((size, size), Image.Resampling.LANCZOS)


def all_triples() -> list[tuple[str, str, str]]:
    return [(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]


def held_out_triples(n: int = 30, seed: int = 1234) -> list[tuple[str, str, str]]:
    """(colour, shape, background) combinations never shown in training, for measuring obedience.

    Every pair of attributes inside a held-out triple still appears (in other triples) in training,
    so the model knows each word; it has just never seen that object on that background.
    """
    rng = np.random.default_rng(seed)
    triples = all_triples()
    held: list[tuple[str, str, str]] = []
    for i in rng.permutation(len(triples)):
        cand = triples[int(i)]
        trial = set(held) | {cand}
        train = [t for t in triples if t not in trial]
        ok = all(sum(1 for t in train if (t[a], t[b]) == (cand[a], cand[b])) >= 2 for a, b in ((0, 1), (0, 2), (1, 2)))
        if ok:
            held.append(cand)
        if len(held) == n:
            break
    return sorted(held)


def train_triples() -> list[tuple[str, str, str]]:
    held = set(held_out_triples())
    return [t for t in all_triples() if t not in held]


def random_scene(rng: np.random.Generator, triples: list[tuple[str, str, str]] | None = None) -> Scene:
    """A scene with a uniformly chosen triple from `triples` (default: the training triples)."""
    triples = triples or train_triples()
    colour, shape, background = triples[int(rng.integers(0, len(triples)))]
    cx, cy, r = random_placement(rng)
    return Scene(colour, shape, background, cx, cy, r, seed=int(rng.integers(0, 2**31)))


def canonical_prompt(colour: str, shape: str, background: str) -> str:
    return TEMPLATES[0][0].format(colour=colour, shape=shape, where=SCENE_PHRASES[background][0])


def caption(scene: Scene, rng: np.random.Generator, empty_rate: float = EMPTY_PROMPT_RATE) -> str:
    """A training caption for `scene`: a random template, or the empty prompt (for classifier-free guidance)."""
    if rng.random() < empty_rate:
        return ""
    weights = np.array([w for _, w in TEMPLATES])
    template = TEMPLATES[int(rng.choice(len(TEMPLATES), p=weights / weights.sum()))][0]
    where, place = SCENE_PHRASES[scene.background]
    return template.format(colour=scene.colour, shape=scene.shape, where=where, place=place)


@dataclass
class Dataset:
    """Rendered images (N, size, size, 3) uint8 with their scenes; labels are indices into the attribute sets."""

    images: np.ndarray
    scenes: list[Scene]

    def labels(self) -> dict[str, np.ndarray]:
        return scene_labels(self.scenes)


def scene_labels(scenes: list[Scene]) -> dict[str, np.ndarray]:
    colours, bgs = list(COLOURS), list(BACKGROUNDS)
    return {
        "colour": np.array([colours.index(s.colour) for s in scenes]),
        "shape": np.array([SHAPES.index(s.shape) for s in scenes]),
        "background": np.array([bgs.index(s.background) for s in scenes]),
    }


def iter_scenes(n: int, seed: int, triples: list[tuple[str, str, str]] | None = None) -> Iterator[Scene]:
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield random_scene(rng, triples)


def make_dataset(
    n: int, seed: int, size: int = 32, triples: list[tuple[str, str, str]] | None = None, workers: int = 1
) -> Dataset:
    """Deterministic: the same (n, seed, size, triples) always gives the same images."""
    scenes = list(iter_scenes(n, seed, triples))
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            arrays = list(pool.map(_render_array, scenes, [size] * n, chunksize=256))
    else:
        arrays = [_render_array(s, size) for s in scenes]
    return Dataset(np.stack(arrays), scenes)


def _render_array(scene: Scene, size: int) -> np.ndarray:
    return np.asarray(render_scene(scene, size))
