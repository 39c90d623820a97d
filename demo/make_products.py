"""Render the demo products' training images and train their LoRAs (plus one style adapter) on the demo SD.

    python -m demo.make_products                      # products/split-star, products/striped-mug, adapters/night
    python -m demo.make_products --only night --steps 300

For each product: renders from `demo.world` on every background except the product's held-out ones
(`HELD_OUT`, used by `demo.fidelity`), with captions in the world's style carrying the product token
(`a photo of <split-star> on the beach`), then `python -m training.lora` with a learned token and a UNet
LoRA on the attention and ResNet conv layers. The style adapter `night` is trained the same way on
generic objects (every colour, shape and background) rendered darker and bluish, captioned
`a photo of a red star on the beach, at night`; its manifest is rewritten as `kind: style`.
Everything is seeded; renders and work dirs go to `.cache/demo-products/`.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from demo.world import BACKGROUNDS, COLOURS, PRODUCTS, SCENE_PHRASES, SHAPES, Scene, random_placement, render_product

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "demo-products"

# Backgrounds never shown in training for each product; fidelity is measured on them.
HELD_OUT: dict[str, tuple[str, ...]] = {"split-star": ("city", "black"), "striped-mug": ("city", "flowers")}
TOKENS = {"split-star": "<split-star>", "striped-mug": "<striped-mug>"}
INIT_WORDS = {"split-star": "star", "striped-mug": "square"}

STYLE_ID = "night"
STYLE_PHRASE = "at night"
STYLE_TINT = np.array([0.30, 0.34, 0.55])  # per-channel gain: dark, blue-shifted


def product_captions(token: str, background: str, rng: np.random.Generator) -> str:
    where, place = SCENE_PHRASES[background]
    patterns = [f"a photo of {token} {where}"] * 3 + [f"a photo of {place} with {token}", f"{token} {where}"]
    return patterns[int(rng.integers(len(patterns)))]


def write_product_data(product_id: str, out: Path, per_background: int, seed: int) -> int:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    n = 0
    for background in BACKGROUNDS:
        if background in HELD_OUT[product_id]:
            continue
        for _ in range(per_background):
            render_product(product_id, background, rng).save(out / f"{n:03d}.png")
            # `{token}` is replaced by the CLI with the product phrase.
            (out / f"{n:03d}.txt").write_text(product_captions("{token}", background, rng))
            n += 1
    return n


def night(image) -> np.ndarray:
    arr = np.asarray(image, dtype=np.float32) * STYLE_TINT
    return np.clip(arr + np.array([0, 0, 8]), 0, 255).round().astype(np.uint8)


def write_style_data(out: Path, count: int, seed: int) -> int:
    from PIL import Image

    from demo.world import render_scene

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    colours = list(COLOURS)
    for i in range(count):
        colour, shape = colours[int(rng.integers(len(colours)))], SHAPES[int(rng.integers(len(SHAPES)))]
        background = BACKGROUNDS[i % len(BACKGROUNDS)]
        cx, cy, r = random_placement(rng)
        scene = Scene(colour, shape, background, cx, cy, r, seed=int(rng.integers(0, 2**31)))
        Image.fromarray(night(render_scene(scene))).save(out / f"{i:03d}.png")
        (out / f"{i:03d}.txt").write_text(f"a photo of a {colour} {shape} {SCENE_PHRASES[background][0]}, {{token}}")
    return count


def token_count(text: str, tokens: list[str]) -> int:
    """Number of text-encoder positions `text` takes (with BOS/EOS) once `tokens` are added."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(ROOT / "models" / "demo-sd" / "tokenizer")
    tok.add_tokens(tokens)
    return len(tok(text).input_ids)


def to_fp16(folder: Path) -> None:
    """Store the adapter and embeddings in fp16 (the generator loads them in the pipeline's dtype)."""
    import torch
    from safetensors.torch import load_file, save_file

    for name in ("pytorch_lora_weights.safetensors", "embeddings.safetensors"):
        path = folder / name
        if path.is_file():
            save_file({k: v.to(torch.float16).contiguous() for k, v in load_file(path).items()}, path)


def train(images: Path, out: Path, token: str, extra: list[str], args) -> float:
    cmd = [
        sys.executable,
        "-m",
        "training.lora",
        "--images",
        str(images),
        "--token",
        token,
        "--base",
        str(args.base),
        "--out",
        str(out),
        "--overwrite",
        "--no-flip",
        "--rank",
        str(args.rank),
        "--target-modules",
        "to_q,to_k,to_v,to_out.0,conv1,conv2",
        "--steps",
        str(args.steps),
        "--lr",
        str(args.lr),
        "--batch-size",
        str(args.batch_size),
        "--seed",
        str(args.seed),
        "--threads",
        str(args.threads),
        "--work-dir",
        str(CACHE / "work" / out.name),
        "--quiet",
        *extra,
    ]
    start = time.time()
    print("+", " ".join(cmd), flush=True)
    subprocess.run(["nice", "-n", "5", *cmd], check=True, cwd=ROOT)
    to_fp16(out)
    return time.time() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, default=Path("models/demo-sd"))
    p.add_argument("--products-dir", type=Path, default=ROOT / "products")
    p.add_argument("--adapters-dir", type=Path, default=ROOT / "adapters")
    p.add_argument("--only", nargs="*", default=None, help="ids to build (default: all)")
    p.add_argument("--per-background", type=int, default=15, help="renders per training background")
    p.add_argument("--style-images", type=int, default=60)
    p.add_argument("--style-steps", type=int, default=150, help="steps for the style adapter")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--token-lr", type=float, default=5e-3)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="1 is fastest on a busy CPU")
    args = p.parse_args(argv)
    wanted = set(args.only) if args.only else {*PRODUCTS, STYLE_ID}

    for pid, product in PRODUCTS.items():
        if pid not in wanted:
            continue
        token = TOKENS[pid]
        longest = f"a photo of {token} {SCENE_PHRASES['city'][0]}, {STYLE_PHRASE}"
        n_tok = token_count(longest, [token])
        assert n_tok <= 16, f"{longest!r} takes {n_tok} > 16 positions"
        images = CACHE / "data" / pid
        n = write_product_data(pid, images, args.per_background, args.seed)
        extra = ["--learn-token", "--init-word", INIT_WORDS[pid], "--token-lr", str(args.token_lr)]
        extra += ["--display-name", product.display_name, "--category", product.category]
        extra += ["--description", product.description, "--prompt-phrase", token]
        seconds = train(images, args.products_dir / pid, token, extra, args)
        print(
            f"{pid}: {n} renders (held out: {', '.join(HELD_OUT[pid])}), {longest!r} = {n_tok} positions, "
            f"trained in {seconds:.0f}s",
            flush=True,
        )

    if STYLE_ID in wanted:
        images = CACHE / "data" / STYLE_ID
        n = write_style_data(images, args.style_images, args.seed + 1)
        out = args.adapters_dir / STYLE_ID
        extra = ["--display-name", "Night", "--description", "dark, blue night light over any scene"]
        seconds = train(
            images, out, STYLE_PHRASE, extra, argparse.Namespace(**{**vars(args), "steps": args.style_steps})
        )
        manifest = yaml.safe_load((out / "manifest.yaml").read_text())
        fields = dict(
            display_name="Night",
            kind="style",
            tokens=[STYLE_PHRASE],
            adapter=manifest.get("adapter", "pytorch_lora_weights.safetensors"),
            default_scale=1.0,
            description="dark, blue night light over any scene (trained on darkened renders of generic objects)",
            base_model=manifest.get("base_model", ""),
        )
        (out / "manifest.yaml").write_text(yaml.safe_dump(fields, sort_keys=False))
        print(f"{STYLE_ID}: {n} renders, trained in {seconds:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
