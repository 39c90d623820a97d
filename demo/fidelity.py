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
product's colours (`demo.world.HELD_OUT`).
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from demo.colours import colour_classes, to_array
from demo.world import HELD_OUT

ROOT = Path(__file__).resolve().parent.parent


def raw_split_star(image) -> float:
    m = colour_classes(to_array(image))
    # Pixels per column of the central 24x24 box; the split may sit anywhere near the middle (the star
    # is placed off-centre), so take the column that fits best. Background colour that is on both sides
    # (a red fire) cancels in the differences.
    red, blue = m["red"][BOX, BOX].sum(0), m["blue"][BOX, BOX].sum(0)
    best = -np.inf
    for c in range(6, 19):
        best = max(best, min(red[:c].sum() - red[c:].sum(), blue[c:].sum() - blue[:c].sum()))
    return float(best)


BOX = slice(4, 28)  # the central 24x24 box the product sits in


def raw_striped_mug(image) -> float:
    m = colour_classes(to_array(image))
    yellow, dark = m["yellow"][BOX, BOX], m["dark"][BOX, BOX]
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
def reference(product_id: str, per_background: int = 40, seed: int = 123) -> float:
    """The raw score that counts as 1.0: the 5th percentile of real renders of the product on all six
    backgrounds, so a real render scores 1 whatever its size and scene (the smallest ones just under)."""
    from demo.world import BACKGROUNDS, render_product

    rng = np.random.default_rng(seed)
    raw = [RAW[product_id](render_product(product_id, bg, rng)) for bg in BACKGROUNDS for _ in range(per_background)]
    return float(np.percentile(raw, 5))


def score(product_id: str, image) -> float:
    """Fidelity of one image to product `product_id`, in [0, 1] (1 = as a real render)."""
    return float(np.clip(RAW[product_id](image) / reference(product_id), 0.0, 1.0))


def fidelity(product_id: str, images) -> float:
    return float(np.mean([score(product_id, im) for im in images]))


def background_brightness(image) -> float:
    """Mean luma (0-255) of the frame's outer ring (3 px): the background, since products sit near the centre."""
    a = to_array(image).astype(np.float32)[..., :3]
    luma = a @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    ring = np.ones(luma.shape, bool)
    ring[RING:-RING, RING:-RING] = False
    return float(luma[ring].mean())


RING = 3  # width of the background ring, in pixels of the 32x32 frame
NIGHT_RATIO = 0.5  # the night style's goal: the background at most half as bright as by day
NIGHT_DARK = 40.0  # a background darker than this by day (the black studio, ~25) cannot visibly halve
NIGHT_FIDELITY = 0.9  # and the product kept


def night_ok(brightness: float, brightness_night: float, fidelity_night: float) -> bool:
    """The night criterion for one cell: the background halved (or, in a scene already dark by day, not
    brighter) with the product's fidelity kept."""
    darker = brightness_night <= NIGHT_RATIO * brightness or (
        brightness < NIGHT_DARK and brightness_night <= brightness
    )
    return darker and fidelity_night >= NIGHT_FIDELITY


@dataclass
class Cell:
    """One product in one scene: fidelity with the adapter (default scale) and at scale 0, judge, night."""

    scene: str
    held_out: bool
    adapter: float
    scale0: float
    judge_scene: float  # fraction of adapter images the judge puts in the right scene
    judge_scene_scale0: float
    renders: float  # fidelity of real renders of the product in this scene (the metric's ceiling)
    shape: float = 0.0  # share of adapter images that pass the shape criterion (demo.shape)
    shape_scale0: float = 0.0
    shape_renders: float = 0.0
    both: float = 0.0  # share of adapter images with colour score >= 0.5 and the shape passed
    hole: float | None = None  # the mug: share of adapter images with a handle's hole (demo.shape.handle_hole)
    hole_renders: float | None = None
    per_seed: list[float] = field(default_factory=list)
    night: dict | None = None  # brightness with/without the night style, fidelity with it


def load_pipeline(model: Path, threads: int):
    """The generator's own pipeline code (`ProductPipeline`) on the CPU, as the measures here and in
    demo.make_products render."""
    import torch

    from services.generator.pipeline import ProductPipeline

    torch.set_num_threads(threads)
    return ProductPipeline(str(model), "cpu", adapter_cache_size=4)


def measure(
    n: int = 8,
    products_dir: Path = ROOT / "products",
    adapters_dir: Path = ROOT / "adapters",
    model: Path = ROOT / "models" / "demo-sd",
    product_ids: tuple[str, ...] = ("split-star", "striped-mug"),
    scales: tuple[float, ...] = (),
    scenes: tuple[str, ...] = (),
    night: bool = True,
    threads: int = 2,
    seed0: int = 0,
    pipeline=None,
) -> dict:
    """Every demo scene x product through the generator's own pipeline code (`ProductPipeline`), seeds
    seed0..seed0+n-1, the demo templates' prompts, steps and guidance: the adapter at its manifest's
    default scale beside scale 0 (learned token only), the judge's scene accuracy, and (with `night`) the
    night style stacked on top. `scales` adds a fidelity sweep over other product scales."""
    from demo.judge import load_judge
    from demo.shape import hole_rate, shape_ok, shape_rate
    from demo.world import BACKGROUNDS, render_product
    from services.generator.catalog import TemplateCatalog, compose_prompt, default_guidance, scan_folder
    from services.generator.messages import RenderSettings

    pipe = pipeline or load_pipeline(model, threads)
    judge = load_judge(model / "judge")
    templates = TemplateCatalog.load(ROOT / "templates" / "catalog.yaml")
    products = scan_folder(Path(products_dir), ("product",))
    styles = scan_folder(Path(adapters_dir), ("style",)) if night else {}
    seeds = tuple(range(seed0, seed0 + n))

    def render(product, template, specs, extra=()) -> list:
        composed = compose_prompt(product, template, "", None, templates.defaults, list(extra))
        settings = RenderSettings(
            composed.prompt,
            composed.negative_prompt,
            template.steps or 20,
            default_guidance(product, template, placement=False, fallback=6.0),  # as the server plans LoRA mode
            32,
            32,
            "",
            tuple(specs),
        )
        return pipe(settings, seeds)

    out: dict = {"n": n, "seeds": [seeds[0], seeds[-1]], "products": {}}
    for pid in product_ids:
        entry = products[pid]
        scale = entry.manifest.default_scale
        rng = np.random.default_rng(7)
        row: dict = {"default_scale": scale, "held_out": list(HELD_OUT.get(pid, ())), "scenes": {}, "sweep": {}}
        for bg in scenes or BACKGROUNDS:
            template = templates.get(f"demo-{bg}")
            with_adapter = render(entry, template, [entry.spec(scale)])
            at_zero = render(entry, template, [entry.spec(0.0)])
            scores = [score(pid, im) for im in with_adapter]
            shapes = [shape_ok(pid, bg, im) for im in with_adapter]
            true_renders = [render_product(pid, bg, rng) for _ in range(n)]
            cell = Cell(
                scene=bg,
                held_out=bg in HELD_OUT.get(pid, ()),
                adapter=float(np.mean(scores)),
                scale0=fidelity(pid, at_zero),
                judge_scene=float(np.mean([p == bg for p in judge.predict(with_adapter)["background"]])),
                judge_scene_scale0=float(np.mean([p == bg for p in judge.predict(at_zero)["background"]])),
                renders=fidelity(pid, true_renders),
                shape=float(np.mean(shapes)),
                shape_scale0=shape_rate(pid, bg, at_zero),
                shape_renders=shape_rate(pid, bg, true_renders),
                both=float(np.mean([c >= 0.5 and s for c, s in zip(scores, shapes, strict=True)])),
                per_seed=[round(s, 3) for s in scores],
            )
            if pid == "striped-mug":
                cell.hole, cell.hole_renders = hole_rate(with_adapter), hole_rate(true_renders)
            if night and "night" in styles:
                style = styles["night"]
                dark = render(
                    entry,
                    template,
                    [entry.spec(scale), style.spec(style.manifest.default_scale)],
                    style.manifest.tokens,
                )
                plain_b = float(np.mean([background_brightness(im) for im in with_adapter]))
                dark_b = float(np.mean([background_brightness(im) for im in dark]))
                kept = fidelity(pid, dark)
                cell.night = {
                    "brightness": plain_b,
                    "brightness_night": dark_b,
                    "ratio": dark_b / max(plain_b, 1e-6),
                    "fidelity_night": kept,
                    "ok": night_ok(plain_b, dark_b, kept),
                }
            for s in scales:
                row["sweep"].setdefault(str(s), {})[bg] = fidelity(pid, render(entry, template, [entry.spec(s)]))
            row["scenes"][bg] = asdict(cell)
        cells = row["scenes"].values()
        row["min_adapter"] = min(c["adapter"] for c in cells)
        row["min_shape"] = min(c["shape"] for c in cells)
        row["judge_scene"] = float(np.mean([c["judge_scene"] for c in cells]))
        if night and "night" in styles:
            row["night_ratio"] = float(np.mean([c["night"]["ratio"] for c in cells]))
            row["min_fidelity_night"] = min(c["night"]["fidelity_night"] for c in cells)
            row["night_ok"] = sum(c["night"]["ok"] for c in cells)
        out["products"][pid] = row
    return out


def format_table(result: dict) -> str:
    lines = []
    for pid, row in result["products"].items():
        lines.append(f"{pid} (default scale {row['default_scale']:g}; * = held out of training)")
        head = f"  {'scene':9} {'adapter':>8} {'scale 0':>8} {'renders':>8} {'judge':>6} {'judge@0':>8}"
        head += f" {'shape':>6} {'shape@0':>7} {'shape renders':>13}"
        has_hole = any(c["hole"] is not None for c in row["scenes"].values())
        if has_hole:
            head += f" {'hole':>5} {'hole renders':>12}"
        has_night = any(c["night"] for c in row["scenes"].values())
        if has_night:
            head += f" {'bg':>6} {'bg+night':>8} {'ratio':>6} {'fid+night':>9} {'night ok':>8}"
        lines.append(head)
        for bg, c in row["scenes"].items():
            name = bg + ("*" if c["held_out"] else "")
            line = (
                f"  {name:9} {c['adapter']:8.2f} {c['scale0']:8.2f} {c['renders']:8.2f} "
                f"{c['judge_scene']:6.0%} {c['judge_scene_scale0']:8.0%}"
                f" {c['shape']:6.2f} {c['shape_scale0']:7.2f} {c['shape_renders']:13.2f}"
            )
            if has_hole:
                line += f" {c['hole']:5.2f} {c['hole_renders']:12.2f}"
            if c["night"]:
                nt = c["night"]
                line += f" {nt['brightness']:6.0f} {nt['brightness_night']:8.0f} {nt['ratio']:6.2f}"
                line += f" {nt['fidelity_night']:9.2f} {'yes' if nt['ok'] else 'no':>8}"
            lines.append(line)
        summary = f"  min adapter fidelity {row['min_adapter']:.2f}, min shape {row['min_shape']:.2f}"
        summary += f", judge scene accuracy {row['judge_scene']:.0%}"
        if has_night:
            summary += f", night brightness ratio {row['night_ratio']:.2f}"
            summary += f", min fidelity with night {row['min_fidelity_night']:.2f}"
            summary += f", night criterion met in {row['night_ok']} of {len(row['scenes'])} scenes"
        lines.append(summary)
        for s, by_scene in row["sweep"].items():
            vals = " ".join(f"{bg}={v:.2f}" for bg, v in by_scene.items())
            lines.append(f"  scale {s}: min {min(by_scene.values()):.2f}  {vals}")
    lines.append(f"{result['n']} seeds per cell ({result['seeds'][0]}..{result['seeds'][1]})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=8, help="seeds per cell")
    p.add_argument("--seed0", type=int, default=0, help="first seed")
    p.add_argument("--products-dir", type=Path, default=ROOT / "products")
    p.add_argument("--adapters-dir", type=Path, default=ROOT / "adapters")
    p.add_argument("--model", type=Path, default=ROOT / "models" / "demo-sd")
    p.add_argument("--only", nargs="*", default=None, help="product ids (default: both demo products)")
    p.add_argument("--scenes", nargs="*", default=None, help="scenes (default: all six)")
    p.add_argument("--scales", default="", help="extra product scales to sweep, e.g. 0.8,1.2,1.5")
    p.add_argument("--no-night", action="store_true", help="skip the night-style columns")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the full result as JSON here ('-' for stdout only)")
    args = p.parse_args(argv)
    start = time.time()
    result = measure(
        n=args.n,
        products_dir=args.products_dir,
        adapters_dir=args.adapters_dir,
        model=args.model,
        product_ids=tuple(args.only or ("split-star", "striped-mug")),
        scales=tuple(float(s) for s in args.scales.split(",") if s.strip()),
        scenes=tuple(args.scenes or ()),
        night=not args.no_night,
        threads=args.threads,
        seed0=args.seed0,
    )
    result["seconds"] = round(time.time() - start, 1)
    if args.json and str(args.json) == "-":
        print(json.dumps(result, indent=2))
        return 0
    print(format_table(result))
    print(f"{result['seconds']:.0f}s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
