"""A tiny random Swin2SR x4, built from a config, offline.

Same classes as `caidas/swin2SR-classical-sr-x4-64`, so the upscaler's loading and serving
paths are the real ones; `make run` uses it until the trained `models/demo-swin2sr` ships.

    python -m demo.tiny_sr --out .cache/tiny-swin2sr
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def build_tiny_swin2sr(out_dir: str | Path, seed: int = 0, upscale: int = 4) -> Path:
    """Write a tiny Swin2SRForImageSuperResolution + Swin2SRImageProcessor folder; return its path."""
    from transformers import Swin2SRConfig, Swin2SRForImageSuperResolution, Swin2SRImageProcessor

    out = Path(out_dir)
    torch.manual_seed(seed)
    config = Swin2SRConfig(
        image_size=32,
        embed_dim=16,
        depths=[2],
        num_heads=[2],
        window_size=8,
        mlp_ratio=2.0,
        drop_path_rate=0.0,
        upscale=upscale,
        # "pixelshuffledirect" (one conv + shuffle) keeps the tiny model cheap at 4x output size.
        upsampler="pixelshuffledirect",
        # Wider than the default 0.02 (whose output is nearly flat), narrower than saturating.
        initializer_range=0.05,
    )
    model = Swin2SRForImageSuperResolution(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    Swin2SRImageProcessor(do_rescale=True, rescale_factor=1 / 255, do_pad=True, size_divisor=8).save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(".cache/tiny-swin2sr"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build_tiny_swin2sr(args.out, seed=args.seed))


if __name__ == "__main__":
    main()
