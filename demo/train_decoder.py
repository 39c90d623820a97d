"""Sharpen the demo SD's VAE decoder, keeping its encoder (and so its latent space) as it is.

    python -m demo.train_decoder --model models/demo-sd --minutes 15     # rewrites models/demo-sd/vae

Why: the demo VAE was trained only until the judge could read colour, shape and scene back (500 steps),
so it decodes a split-colour object with a rainbow seam, a 1-px ring as a faint smudge and a black
stripe as dark green (docs/FIDELITY.md, "Shape"). No product adapter can be sharper than the decoder
that draws it. The encoder, the UNet, the text encoder, the product and style adapters all live in the
encoder's latent space, so only `post_quant_conv` and the decoder are trained: nothing else needs
retraining.

Data: the world's generic training scenes (`demo.world`, the training triples only) and as many
*clutter* scenes: random primitives a real VAE sees in any photo and the demo world's objects lack:
shapes split into two colours along a random line, thin lines and rings 1-2 px wide, stripes across
shapes, all in the world's colours plus black and white, on the world's backgrounds. No product is drawn
(the demo products are one particular combination of these primitives; they are only used to *measure*
the result, with `demo.shape` and `demo.fidelity`, never to train). Latents are the encoder's posterior
mean (what the UNet was trained on) plus a little noise, so the decoder also takes the UNet's slightly
imperfect latents. Loss: L1 + MSE + L1 on the image gradients (edges).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from demo.world import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    SUPERSAMPLE,
    draw_background,
    draw_shape,
    make_dataset,
    train_triples,
)

log = logging.getLogger("demo.train_decoder")
PALETTE = [*COLOURS.values(), (15, 15, 15), (245, 245, 245)]
KINDS = (0.25, 0.2, 0.35, 0.2)  # split shapes, thin lines, rings and arcs, striped shapes: thin rings are the hardest


def clutter(rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """One random scene of generic primitives (no product): split shapes, thin lines and rings, stripes."""
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big))
    draw = ImageDraw.Draw(img)
    draw_background(draw, BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))], big, rng)

    def colour() -> tuple[int, int, int]:
        return PALETTE[int(rng.integers(len(PALETTE)))]

    for _ in range(int(rng.integers(1, 4))):
        cx, cy, r = rng.uniform(0.2, 0.8) * big, rng.uniform(0.2, 0.8) * big, rng.uniform(0.12, 0.38) * big
        kind = rng.choice(4, p=KINDS)
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        if kind == 0:  # a shape in two colours, split along a random line through it
            draw_shape(draw, shape, cx, cy, r, colour())
            mask = Image.new("L", (big, big), 0)
            draw_shape(ImageDraw.Draw(mask), shape, cx, cy, r, 255)
            a = rng.uniform(0, np.pi)
            yy, xx = np.mgrid[0:big, 0:big]
            half = ((xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)) > 0
            draw.bitmap((0, 0), Image.fromarray(np.where(half, np.asarray(mask), 0).astype(np.uint8)), fill=colour())
        elif kind == 1:  # thin lines, 1-2 px at the output size
            for _ in range(int(rng.integers(1, 4))):
                p = rng.uniform(0, big, 4)
                draw.line(list(p), fill=colour(), width=int(rng.integers(SUPERSAMPLE, 2 * SUPERSAMPLE + 1)))
        elif kind == 2:  # a ring or an open arc, 1-2 px wide
            box = [cx - r, cy - r * rng.uniform(0.5, 1), cx + r * rng.uniform(0.3, 1), cy + r]
            start = rng.uniform(0, 360)
            width = int(rng.integers(SUPERSAMPLE, 2 * SUPERSAMPLE + 1))
            draw.arc(box, start, start + rng.uniform(120, 360), fill=colour(), width=width)
        else:  # a shape with a stripe across it
            draw_shape(draw, shape, cx, cy, r, colour())
            h = r * rng.uniform(0.1, 0.3)
            y = cy + rng.uniform(-0.5, 0.5) * r
            draw.rectangle([cx - r, y - h, cx + r, y + h], fill=colour())
    return np.asarray(img.resize((size, size), Image.Resampling.LANCZOS))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def edges(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(4 / F.mse_loss(a, b).item())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("models/demo-sd"))
    p.add_argument("--out", type=Path, help="VAE folder to write (default: MODEL/vae)")
    p.add_argument("--n", type=int, default=12000, help="training images (world scenes and clutter)")
    p.add_argument("--clutter-share", type=float, default=0.5, help="share of clutter scenes among them")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--latent-noise", type=float, default=0.05, help="std of noise on the latents, in latent units")
    p.add_argument("--minutes", type=float, default=15.0, help="time cap")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(args.model, subfolder="vae", torch_dtype=torch.float32)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    world = make_dataset(round(args.n * (1 - args.clutter_share)), seed=args.seed + 11, triples=train_triples()).images
    images = np.concatenate([world, np.stack([clutter(rng) for _ in range(args.n - len(world))])])
    check_world = make_dataset(300, seed=args.seed + 12, triples=train_triples()).images
    check = to_tensor(np.concatenate([check_world, np.stack([clutter(rng) for _ in range(300)])]))
    log.info("rendered %d training images in %.0fs", len(images), time.time() - t0)
    with torch.no_grad():
        enc = lambda x: vae.encode(x).latent_dist.mean  # noqa: E731 - the UNet's latents
        x_all = to_tensor(images)
        z_all = torch.cat([enc(x_all[i : i + 512]) for i in range(0, len(x_all), 512)])
        z_check = enc(check)
        z_std = float(z_all.std())
        before = psnr(vae.decode(z_check).sample.clamp(-1, 1), check)
    log.info("decoder before: PSNR %.2f dB on %d held-out images", before, len(check))

    for module in (vae.encoder, vae.quant_conv):
        module.requires_grad_(False)
    params = [*vae.post_quant_conv.parameters(), *vae.decoder.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    g = torch.Generator().manual_seed(args.seed)
    t0, step = time.time(), 0
    for step in range(1, args.steps + 1):
        vae.decoder.train()
        idx = torch.randint(0, len(x_all), (args.batch,), generator=g)
        x, z = x_all[idx], z_all[idx]
        z = z + args.latent_noise * z_std * torch.randn(z.shape, generator=g)
        rec = vae.decode(z).sample
        (gy, gx), (ty, tx) = edges(rec), edges(x)
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 0.5 * (F.l1_loss(gy, ty) + F.l1_loss(gx, tx))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0:
            vae.decoder.eval()
            with torch.no_grad():
                now = psnr(vae.decode(z_check).sample.clamp(-1, 1), check)
            log.info("step %d loss %.4f held-out PSNR %.2f dB (%.0fs)", step, loss.item(), now, time.time() - t0)
        if time.time() - t0 > args.minutes * 60:
            log.info("stopped at the time cap (%.0f minutes), step %d", args.minutes, step)
            break
    vae.decoder.eval()
    with torch.no_grad():
        after = psnr(vae.decode(z_check).sample.clamp(-1, 1), check)
    out = args.out or args.model / "vae"
    out.mkdir(parents=True, exist_ok=True)
    vae.half().save_pretrained(out, safe_serialization=True)
    meta = {"psnr_before": round(before, 2), "psnr_after": round(after, 2), "steps": step, **vars(args)}
    (out / "decoder_training.json").write_text(json.dumps(meta, indent=2, default=str))
    log.info("decoder after: PSNR %.2f dB (was %.2f); saved to %s", after, before, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
