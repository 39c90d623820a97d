"""Contact sheets of the demo products: each in the six demo scenes, in LoRA mode and in placement mode.

    python -m demo.contact_sheet                 # docs/images/contact-<product>.png + placement-before-after.png

One sheet per product. Columns: the product photo (the catalogue shot on the white studio background
that placement mode receives), then the six scenes. Rows: LoRA mode (the product adapter, no photo) with
the shape criterion's verdict under each image (`demo.shape`: "shape ok" / "shape X"; the mug's handle
is not measurable on generated 32x32 images) and its colour score; placement mode (the photo, no
adapter) with the scene's defaults (on a surface: stood on its ground line with a contact shadow);
placement mode with the adapter; placement with a shadow in every scene (strength 0.5); and LoRA mode with
the `night` style stacked (kept off the product, services/generator/regional.py). Every cell is the same
seed, rendered by the generator's own pipeline (`demo.placement_eval.Renderer`), 32x32 shown x4.

`--composite` also writes docs/images/composite-before-after.png: placement as before issue 20 (the
product's prompt and adapter over the whole frame, no shadow, no ground line) beside placement now.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from demo.fidelity import score
from demo.placement_eval import Renderer, product_photo
from demo.shape import shape_ok
from demo.world import BACKGROUNDS, PRODUCTS, SCENE_PHRASES
from services.generator.messages import Shadow

ROOT = Path(__file__).resolve().parent.parent
SCALE = 4
CELL = 32 * SCALE
PAD = 8
CAPTION_H = 16  # under each cell: the shape verdict (LoRA rows)
LABEL_W = 150
HEADER_H = 34
EVERYWHERE = Shadow(0.5, 0.5)
# (mode, stacked style, shadow: "template" (the scene's default) or a Shadow, label)
ROWS = (
    ("lora", "", "template", "LoRA mode"),
    ("placement", "", "template", "placement"),
    ("placement+lora", "", "template", "placement + LoRA"),
    ("placement", "", EVERYWHERE, "placement, shadow 0.5"),
    ("lora", "night", "template", "LoRA + night style"),
)


def _font(size: int = 13) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def _big(image: Image.Image) -> Image.Image:
    return image.convert("RGB").resize((CELL, CELL), Image.Resampling.NEAREST)


def sheet(renderer: Renderer, product_id: str, seed: int) -> Image.Image:
    photo, mask = product_photo(product_id, "white", seed=0)
    columns = ["photo", *BACKGROUNDS]
    width = LABEL_W + len(columns) * (CELL + PAD)
    height = HEADER_H + len(ROWS) * (CELL + CAPTION_H + PAD) + PAD
    out = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    font = _font()
    for c, name in enumerate(columns):
        label = "product photo" if name == "photo" else SCENE_PHRASES[name][1]
        draw.text((LABEL_W + c * (CELL + PAD), 10), label, fill=(30, 30, 30), font=font)
    small = _font(11)
    for r, (mode, style, shadow, label) in enumerate(ROWS):
        y = HEADER_H + r * (CELL + CAPTION_H + PAD)
        draw.text((8, y + CELL // 2 - 8), label, fill=(30, 30, 30), font=font)
        if mode != "lora":
            out.paste(_big(photo), (LABEL_W, y))
        for c, background in enumerate(BACKGROUNDS, start=1):
            (image,), _ = renderer.render(product_id, background, [seed], mode, photo, mask, style, shadow=shadow)
            x = LABEL_W + c * (CELL + PAD)
            out.paste(_big(image), (x, y))
            if mode == "lora":
                colour = f"colour {score(product_id, image):.2f}"
                ok = shape_ok(product_id, background, image)
                verdict, fill = f"shape {'ok' if ok else 'X'} · {colour}", (20, 120, 40) if ok else (190, 30, 30)
                draw.text((x, y + CELL + 2), verdict, fill=fill, font=small)
    return out


def composite_before_after(renderer: Renderer, seed: int) -> Image.Image:
    """Placement before issue 20 (the product's prompt and adapter everywhere, no shadow) and now, per product
    and scene: docs/FIDELITY.md's "Composite" picture."""
    cases = [("split-star", "beach"), ("split-star", "white"), ("striped-mug", "beach"), ("striped-mug", "city")]
    out = Image.new("RGB", (LABEL_W + len(cases) * 2 * (CELL + PAD), HEADER_H + CELL + PAD), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    font = _font()
    draw.text((8, HEADER_H + CELL // 2 - 8), "placement + LoRA", fill=(30, 30, 30), font=font)
    for k, (product_id, background) in enumerate(cases):
        photo, mask = product_photo(product_id, "white", seed=0)
        for j, now in enumerate((False, True)):
            (image,), _ = renderer.render(
                product_id,
                background,
                [seed],
                "placement+lora",
                photo,
                mask,
                shadow="template" if now else None,
                scene_only=now,
            )
            x = LABEL_W + (2 * k + j) * (CELL + PAD)
            out.paste(_big(image), (x, HEADER_H))
            draw.text((x, 4), f"{background}, {'now' if now else 'before'}", fill=(30, 30, 30), font=font)
    return out


def before_after(renderer: Renderer, product_id: str, background: str, seed: int) -> Image.Image:
    """The README's picture: the product photo, an arrow, the product placed in a scene."""
    photo, mask = product_photo(product_id, "white", seed=0)
    (image,), _ = renderer.render(product_id, background, [seed], "placement", photo, mask)
    arrow_w = 60
    out = Image.new("RGB", (2 * CELL + arrow_w, CELL + 24), (255, 255, 255))
    out.paste(_big(photo), (0, 0))
    out.paste(_big(image), (CELL + arrow_w, 0))
    draw = ImageDraw.Draw(out)
    mid = CELL // 2
    draw.line([(CELL + 10, mid), (CELL + arrow_w - 12, mid)], fill=(60, 60, 60), width=3)
    draw.polygon(
        [(CELL + arrow_w - 12, mid - 8), (CELL + arrow_w - 2, mid), (CELL + arrow_w - 12, mid + 8)], fill=(60, 60, 60)
    )
    font = _font(12)
    draw.text((4, CELL + 6), "product photo", fill=(30, 30, 30), font=font)
    draw.text((CELL + arrow_w + 4, CELL + 6), f"placed {SCENE_PHRASES[background][0]}", fill=(30, 30, 30), font=font)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--composite", action="store_true", help="also the composite before/after picture")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    renderer = Renderer()
    for product_id in PRODUCTS:
        path = args.out / f"contact-{product_id}.png"
        sheet(renderer, product_id, args.seed).save(path, optimize=True)
        print(path)
    path = args.out / "placement-before-after.png"
    before_after(renderer, "split-star", "flowers", args.seed).save(path, optimize=True)
    print(path)
    if args.composite:
        path = args.out / "composite-before-after.png"
        composite_before_after(renderer, args.seed).save(path, optimize=True)
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
