"""Product fidelity for the demo products: does a generated image show *this* product's look?

    python -m demo.fidelity --n 8          # held-out scenes, with vs without the product adapter

Scores are per image in [0, 1], normalised so that real renders of the product (on any background)
score 1 in the median; `fidelity` is the mean over images.

- **split-star** (left half red, right half blue): in the central 20x20 box, `red_L` = fraction of the
  left half's pixels that are red, `blue_R` = fraction of the right half's pixels that are blue, and
  the swapped fractions `red_R`, `blue_L`. Raw score `min(red_L, blue_R) - max(red_R, blue_L)`: a
  one-colour star, a swapped star or no star at all gives <= 0.
- **striped-mug** (yellow body, dark horizontal band): the number of columns of the central 24x24 box
  that read yellow, then dark (a run of 1-6 dark pixels), then yellow again from top to bottom. A plain
  yellow object, a dark object or a vertical stripe gives 0.

Colours are classified per pixel with fixed thresholds on RGB (`red`: R > 140, G < 90, B < 100,
R - max(G, B) > 80; `blue`: B > 140, R < 110, G < 110, B - max(R, G) > 60; `yellow`: R > 170, G > 150,
B < 110; `dark` (the band): G < 125, i.e. black, brown or dark orange, since the demo model
draws the thin black stripe as a darker brownish band). Held-out scenes are chosen where the background has none of the
product's colours (`demo.make_products.HELD_OUT`).
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _masks(arr: np.ndarray) -> dict[str, np.ndarray]:
    a = np.asarray(arr, dtype=np.int32)[..., :3]
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    return {
        "red": (r > 140) & (g < 90) & (b < 100) & (r - np.maximum(g, b) > 80),
        "blue": (b > 140) & (r < 110) & (g < 110) & (b - np.maximum(r, g) > 60),
        "yellow": (r > 170) & (g > 150) & (b < 110),
        # The band: anything clearly darker in green than the yellow body (the demo model draws the black
        # stripe as a dark orange-brown band at 32x32).
        "dark": g < 125,
    }


def _to_array(image) -> np.ndarray:
    from PIL import Image

    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        if image.size != (32, 32):
            image = image.resize((32, 32), Image.LANCZOS)
    return np.asarray(image)


def raw_split_star(image) -> float:
    m = _masks(_to_array(image))
    box = slice(6, 26)
    left, right = (slice(6, 16), slice(16, 26))
    red_l, red_r = m["red"][box, left].mean(), m["red"][box, right].mean()
    blue_l, blue_r = m["blue"][box, left].mean(), m["blue"][box, right].mean()
    return float(min(red_l, blue_r) - max(red_r, blue_l))


def raw_striped_mug(image) -> float:
    m = _masks(_to_array(image))
    yellow, dark = m["yellow"][4:28, 4:28], m["dark"][4:28, 4:28]
    count = 0
    for x in range(yellow.shape[1]):
        col_y, col_d = yellow[:, x], dark[:, x]
        state, run = 0, 0  # 0: looking for yellow, 1: in yellow, 2: in the dark band
        for y in range(len(col_y)):
            if state == 0 and col_y[y]:
                state = 1
            elif state == 1 and col_d[y]:
                state, run = 2, 1
            elif state == 2:
                if col_d[y]:
                    run += 1
                    if run > 6:
                        state = 0
                elif col_y[y]:
                    count += 1
                    break
                elif not col_d[y]:
                    # an anti-aliased edge pixel between band and body is allowed once
                    run += 1
                    if run > 7:
                        state = 0
    return float(count)


RAW = {"split-star": raw_split_star, "striped-mug": raw_striped_mug}


@functools.cache
def reference(product_id: str, n: int = 60, seed: int = 123) -> float:
    """Median raw score of real renders of the product over all backgrounds (the score's 1.0)."""
    from demo.world import BACKGROUNDS, render_product

    rng = np.random.default_rng(seed)
    raw = [RAW[product_id](render_product(product_id, BACKGROUNDS[i % len(BACKGROUNDS)], rng)) for i in range(n)]
    return float(np.median(raw))


def score(product_id: str, image) -> float:
    """Fidelity of one image to product `product_id`, in [0, 1] (1 = as a real render)."""
    return float(np.clip(RAW[product_id](image) / reference(product_id), 0.0, 1.0))


def fidelity(product_id: str, images) -> float:
    return float(np.mean([score(product_id, im) for im in images]))


# Prompts for the base model without any product: the closest words the demo model knows.
CLASS_PHRASES = {"split-star": "a star", "striped-mug": "a yellow square"}


def measure(n: int, steps: int = 20, guidance: float = 6.0) -> dict:
    """Held-out scenes, seeds 0..n-1: product adapter at scale 1, at scale 0 (token only), base + class words."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from demo.make_products import HELD_OUT
    from demo.world import SCENE_PHRASES, render_product
    from services.generator.catalog import scan_folder
    from services.generator.embeddings import read_token_embeddings, set_token_embeddings

    torch.set_num_threads(2)
    pipe = StableDiffusionPipeline.from_pretrained(ROOT / "models" / "demo-sd", dtype=torch.float32)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    products = scan_folder(ROOT / "products", ("product",))

    def run(prompt: str) -> list:
        out = []
        for seed in range(n):
            gen = torch.Generator().manual_seed(seed)
            out.append(pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=gen).images[0])
        return out

    results: dict = {}
    for pid, held in HELD_OUT.items():
        entry = products[pid]
        m = entry.manifest
        if entry.embeddings_path:
            set_token_embeddings(pipe, read_token_embeddings(str(entry.embeddings_path), tuple(m.tokens)))
        pipe.load_lora_weights(str(entry.folder), weight_name=m.adapter, adapter_name=pid)
        rng = np.random.default_rng(7)
        for bg in held:
            where = SCENE_PHRASES[bg][0]
            row = {"renders": fidelity(pid, [render_product(pid, bg, rng) for _ in range(n)])}
            pipe.set_adapters([pid], adapter_weights=[1.0])
            row["adapter"] = fidelity(pid, run(f"a photo of {entry.phrase} {where}"))
            pipe.set_adapters([pid], adapter_weights=[0.0])
            row["scale0"] = fidelity(pid, run(f"a photo of {entry.phrase} {where}"))
            pipe.disable_lora()
            row["base"] = fidelity(pid, run(f"a photo of {CLASS_PHRASES[pid]} {where}"))
            pipe.enable_lora()
            results[(pid, bg)] = row
        pipe.delete_adapters(pid)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=8, help="seeds per prompt")
    args = p.parse_args(argv)
    start = time.time()
    results = measure(args.n)
    print(f"{'product':12} {'scene':8} {'renders':>8} {'adapter':>8} {'scale 0':>8} {'base+class':>10}")
    for (pid, bg), row in results.items():
        print(f"{pid:12} {bg:8} {row['renders']:8.2f} {row['adapter']:8.2f} {row['scale0']:8.2f} {row['base']:10.2f}")
    print(f"{args.n} seeds per cell, {time.time() - start:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
