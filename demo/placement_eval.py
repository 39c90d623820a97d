"""Placement mode measured on the demo world: exactness, scene accuracy and fidelity, held-out scenes.

    python -m demo.placement_eval --json        # figures for docs/FIDELITY.md ("Placement mode")

For each demo product and each of its held-out scenes (`demo.world.HELD_OUT`), a catalogue
shot of the product on the white studio background is rendered together with its exact mask (the
product drawn alone, alpha >= 128 after the same 4x LANCZOS downscale). The shot and mask go
through placement mode exactly as the generator runs it (`ProductPipeline`, the demo SD, the template's
prompt, with and without the product adapter), and each result is PNG-encoded and decoded, then:

- `mismatched`: pixels inside the mask eroded by the feather width that differ from the placed shot (goal 0);
- `scene`: the judge's background accuracy on the result, against the scene asked for (goal >= 95%);
- `fidelity`: `demo.fidelity.score` of the result, beside the score of the shot itself.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from demo.world import SUPERSAMPLE, draw_background, get_product

if TYPE_CHECKING:
    from services.generator.placement import PlacedProduct

ROOT = Path(__file__).resolve().parent.parent


def product_photo(
    product_id: str,
    background: str = "white",
    seed: int = 0,
    size: int = 32,
    cx: float = 16,
    cy: float = 16,
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
    alpha = np.asarray(alone.getchannel("A").resize((size, size), Image.Resampling.LANCZOS))
    return scene.resize((size, size), Image.Resampling.LANCZOS), alpha >= 128


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class Renderer:
    """The generator's own pipeline and catalog, in-process: LoRA mode and placement mode on the demo SD."""

    def __init__(self, threads: int = 1, empty_scene: bool = True):
        import torch

        from services.generator.catalog import Catalog
        from services.generator.pipeline import ProductPipeline

        torch.set_num_threads(threads)
        self.catalog = Catalog(ROOT / "products", ROOT / "adapters", ROOT / "templates" / "catalog.yaml")
        self.pipe = ProductPipeline(str(ROOT / "models" / "demo-sd"), "cpu")
        # False: placement mode without the templates' empty-scene set-up (backdrop, scene_first), as at stop 26
        self.empty_scene = empty_scene

    def render(
        self,
        product_id: str,
        background: str,
        seeds: list[int],
        mode: str,
        photo=None,
        mask=None,
        style: str = "",
        shadow="template",
        scene_only: bool = True,
        scene_first: float | None = None,
    ) -> tuple[list[Image.Image], PlacedProduct | None]:
        """Images of `product_id` in the demo scene `background`, and the placement they were drawn with.

        mode: "lora" (the product adapter, no photo), "placement" (the photo only, no adapter) or
        "placement+lora" (the photo and the product adapter). `style`: a style adapter stacked at its default
        weight, its words added to the prompt (as the generator does). Placement mode as the server runs it:
        the template's ground line and shadow (`shadow`: "template", None for none, or a `Shadow`) and, with
        `scene_only`, the scene prompt and no product adapter (placement.scene_adapters), the template's backdrop
        and `scene_first` (or this `scene_first`)."""
        from services.generator import placement
        from services.generator.catalog import compose_prompt, compose_scene_prompt, default_guidance
        from services.generator.messages import RenderSettings

        template = self.catalog.template(f"demo-{background}")
        product = self.catalog.product(product_id) if mode != "placement" else None
        stacked = [self.catalog.adapter(style)] if style else []
        extra = [t for a in stacked for t in a.manifest.tokens]
        composed = compose_prompt(product, template, "", None, self.catalog.templates.defaults, extra)
        placed = None
        if mode != "lora" and scene_only:
            stacked += self.backdrop(background)  # as planning.py stacks it in placement mode
        if mode != "lora":
            tp = template.placement
            if tp is None:
                raise ValueError(f"{template.id}: no placement defaults to place a photo with")
            if shadow == "template":
                shadow = tp.shadow.spec() if tp.shadow else None
            placed, _ = placement.place_upload(
                png_bytes(photo),
                placement.mask_png(mask) if mask is not None else b"",
                None,
                placement.ProductBox(**tp.box()),
                32,
                32,
                max_pixels=1 << 20,
                ground=tp.ground,
                shadow=shadow,
                scene_first=(tp.scene_first if scene_only and self.empty_scene else 0.0)
                if scene_first is None
                else scene_first,
            )
        settings = RenderSettings(
            prompt=composed.prompt,
            negative_prompt=composed.negative_prompt,
            steps=template.steps or 20,
            guidance_scale=default_guidance(product, template, placement=mode != "lora", fallback=6.0),
            width=32,
            height=32,
            scheduler="",
            adapters=((product.spec(product.manifest.default_scale),) if product else ())
            + tuple(a.spec(a.manifest.default_scale) for a in stacked),
            placement=placed,
            scene_prompt=(
                compose_scene_prompt(template, "", [t for a in stacked for t in a.manifest.tokens])
                if placed is not None and scene_only
                else ""
            ),
        )
        images = []
        for seed in seeds:
            (image,) = self.pipe(settings, (seed,))
            with Image.open(io.BytesIO(png_bytes(image))) as im:  # as stored: a PNG round trip
                images.append(im.convert("RGB"))
        return images, placed

    def render_scene(self, background: str, seeds: list[int], photo, mask) -> list:
        """The demo scene as placement mode draws it with no product in it: the same placement request (the
        template's scene prompt and backdrop, the same pipeline and seeds) with the product never held and no
        shadow. Only the pixels outside the product's mask are the scene; the product is composited over it."""
        images, _ = self.render("", background, seeds, "placement", photo, mask, shadow=None, scene_first=1.0)
        return images

    def backdrop(self, background: str) -> list:
        """The template's placement backdrop (a background adapter placement mode stacks), if it has one."""
        tp = self.catalog.template(f"demo-{background}").placement
        return [self.catalog.adapter(tp.backdrop)] if self.empty_scene and tp and tp.backdrop else []


MODES = ("lora", "placement", "placement+lora")


def measure(n: int = 8, backgrounds: tuple[str, ...] | None = None) -> list[dict]:
    """One row per (product, scene, mode): mismatched inner pixels, judge scene accuracy, fidelity."""
    from demo.fidelity import score
    from demo.judge import load_judge
    from demo.world import BACKGROUNDS, HELD_OUT, PRODUCTS
    from services.generator import placement

    judge = load_judge()
    renderer = Renderer()
    rows = []
    for product_id in PRODUCTS:
        # The catalogue shot: the product on the white studio background, centred, with its exact mask.
        photo, mask = product_photo(product_id, "white", seed=0)
        for background in backgrounds or BACKGROUNDS:
            for mode in MODES:
                images, placed = renderer.render(product_id, background, list(range(n)), mode, photo, mask)
                row = {
                    "product": product_id,
                    "scene": background,
                    "held_out": background in HELD_OUT[product_id],
                    "mode": mode,
                    "images": n,
                    "scene_accuracy": judge.accuracy(images, {"background": [background] * n})["background"],
                    "fidelity": float(np.mean([score(product_id, im) for im in images])),
                    "photo_fidelity": score(product_id, photo),
                }
                if placed is not None:
                    # Against the placed product (in scenes with a surface the shot is moved onto the ground
                    # line, not resampled: the same bytes, elsewhere in the frame).
                    shot, frame_mask = placement.arrays(placed)
                    inner = placement.inner_mask(frame_mask, placed.feather)
                    row["inner_pixels"] = int(inner.sum())
                    row["mismatched_pixels"] = int(
                        sum((np.asarray(im)[inner] != shot[inner]).any(-1).sum() for im in images)
                    )
                rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=8, help="seeds per (product, scene, mode)")
    p.add_argument("--held-out", action="store_true", help="only each product's held-out scenes")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = p.parse_args(argv)
    from demo.world import HELD_OUT

    started = time.time()
    backgrounds = tuple(sorted({b for v in HELD_OUT.values() for b in v})) if args.held_out else None
    rows = measure(args.n, backgrounds)
    if args.held_out:
        rows = [r for r in rows if r["held_out"]]
    if args.json:
        print(json.dumps({"rows": rows, "seconds": round(time.time() - started)}, indent=1))
        return 0
    print(f"{'product':12} {'scene':8} {'mode':15} {'scene acc':>9} {'fidelity':>8} {'photo':>6} {'mismatched':>10}")
    for r in rows:
        mism = f"{r['mismatched_pixels']}/{r['inner_pixels'] * r['images']}" if "inner_pixels" in r else "-"
        scene = r["scene"] + ("*" if r["held_out"] else "")
        print(
            f"{r['product']:12} {scene:8} {r['mode']:15} {r['scene_accuracy']:9.0%} {r['fidelity']:8.2f} "
            f"{r['photo_fidelity']:6.2f} {mism:>10}"
        )
    print(f"* held out; {args.n} seeds per row, {time.time() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
