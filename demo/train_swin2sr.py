"""Train the demo Swin2SR (x4) on demo-world renders: 32x32 (LANCZOS-downscaled) -> 128x128 render.

    python -m demo.train_swin2sr --out models/demo-swin2sr

The folder holds a Swin2SRForImageSuperResolution (safetensors, fp16) and a Swin2SRImageProcessor config,
so `from_pretrained` works as it does for caidas/swin2SR-* checkpoints.
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
from PIL import Image

from demo.world import BACKGROUNDS, PRODUCTS, all_triples, iter_scenes, render_product, render_scene

log = logging.getLogger("demo.train_swin2sr")

SCALE = 4
LR_SIZE = 32


def build_model():
    from transformers import Swin2SRConfig, Swin2SRForImageSuperResolution

    config = Swin2SRConfig(
        image_size=LR_SIZE,
        embed_dim=32,
        depths=[2, 2],
        num_heads=[2, 2],
        window_size=8,
        mlp_ratio=2.0,
        drop_path_rate=0.0,
        upscale=SCALE,
        upsampler="pixelshuffledirect",
    )
    model = Swin2SRForImageSuperResolution(config)
    init_as_bilinear(model)
    return model


@torch.no_grad()
def init_as_bilinear(model) -> None:
    """Start as a bilinear x4 upscaler, so training only has to learn the correction.

    From random weights the model needs thousands of CPU steps just to reproduce its input; here the
    first conv copies RGB into channels 0-2, the transformer's residual branch starts at zero, and the
    pixel-shuffle conv interpolates those channels bilinearly for each of the 4x4 sub-pixels.
    """
    scale = model.config.upscale
    first = model.swin2sr.first_convolution
    first.weight[:3].zero_()
    first.bias[:3].zero_()
    for c in range(3):
        first.weight[c, c, 1, 1] = 1.0
    model.swin2sr.conv_after_body.weight.zero_()
    model.swin2sr.conv_after_body.bias.zero_()
    conv = model.upsample.conv
    conv.weight.zero_()
    conv.bias.zero_()
    for i in range(scale):
        for j in range(scale):
            ky, kx = _bilinear_taps((i + 0.5) / scale - 0.5), _bilinear_taps((j + 0.5) / scale - 0.5)
            for c in range(3):
                conv.weight[c * scale * scale + i * scale + j, c] = torch.outer(ky, kx)


def _bilinear_taps(offset: float) -> torch.Tensor:
    """Weights on the (-1, 0, +1) neighbours for a sample `offset` pixels from the centre."""
    return torch.tensor([-offset, 1 + offset, 0.0] if offset < 0 else [0.0, 1 - offset, offset])


def _hr_image(i: int, seed: int) -> np.ndarray:
    # About one image in six is a product, so products upscale well too.
    rng = np.random.default_rng([seed, i])
    size = LR_SIZE * SCALE
    if rng.random() < 1 / 6:
        product = sorted(PRODUCTS)[int(rng.integers(0, len(PRODUCTS)))]
        background = BACKGROUNDS[int(rng.integers(0, len(BACKGROUNDS)))]
        return np.asarray(render_product(product, background, rng, size=size))
    scene = next(iter_scenes(1, seed=int(rng.integers(0, 2**31)), triples=all_triples()))
    return np.asarray(render_scene(scene, size=size))


def make_pairs(n: int, seed: int, workers: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(LR uint8 (n,32,32,3), HR uint8 (n,128,128,3)); LR is the HR render LANCZOS-downscaled, like the
    demo SD's 32x32 images are."""
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            hr = np.stack(list(pool.map(_hr_image, range(n), [seed] * n, chunksize=64)))
    else:
        hr = np.stack([_hr_image(i, seed) for i in range(n)])
    lr = np.stack([np.asarray(Image.fromarray(h).resize((LR_SIZE, LR_SIZE), Image.Resampling.LANCZOS)) for h in hr])
    return lr, hr


def bicubic(lr: np.ndarray) -> np.ndarray:
    size = (lr.shape[2] * SCALE, lr.shape[1] * SCALE)
    return np.stack([np.asarray(Image.fromarray(x).resize(size, Image.Resampling.BICUBIC)) for x in lr])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean per-image PSNR (dB) of uint8 arrays."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    return float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))))


@torch.no_grad()
def upscale(model, processor, lr: np.ndarray, batch: int = 32) -> np.ndarray:
    """The way a user runs it: processor (pads to a window multiple), model, crop, clamp(0, 1)."""
    h, w = lr.shape[1:3]
    out = []
    for i in range(0, len(lr), batch):
        pixels = processor([Image.fromarray(x) for x in lr[i : i + batch]], return_tensors="pt").pixel_values
        rec = model(pixel_values=pixels.to(model.dtype)).reconstruction[:, :, : h * SCALE, : w * SCALE]
        out.append((rec.float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def train(args) -> dict[str, float]:
    from transformers import Swin2SRImageProcessor

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    lr_u8, hr_u8 = make_pairs(args.n_images, args.seed)
    test_lr, test_hr = make_pairs(args.n_test, args.seed + 10_000)
    log.info("rendered %d + %d pairs in %.0fs", args.n_images, args.n_test, time.time() - t0)
    processor = Swin2SRImageProcessor(do_rescale=True, rescale_factor=1 / 255, do_pad=True, size_divisor=8)
    # Random 16x16 crops (two windows a side): 3x cheaper per step than padded full images, more variety.
    lr_x = torch.from_numpy(lr_u8).permute(0, 3, 1, 2).float() / 255
    hr_x = torch.from_numpy(hr_u8).permute(0, 3, 1, 2).float() / 255
    model = build_model()
    log.info("Swin2SR: %.3fM params", sum(p.numel() for p in model.parameters()) / 1e6)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    base = psnr(bicubic(test_lr), test_hr)
    log.info("bicubic PSNR on held-out renders: %.2f dB", base)
    t_train = time.time()
    crop = args.crop
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(lr_x), (args.batch,), generator=g)
        y, x = (int(v) for v in torch.randint(0, LR_SIZE - crop + 1, (2,), generator=g))
        rec = model(pixel_values=lr_x[idx, :, y : y + crop, x : x + crop]).reconstruction
        target = hr_x[idx, :, y * SCALE : (y + crop) * SCALE, x * SCALE : (x + crop) * SCALE]
        loss = F.l1_loss(rec, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            log.info("step %d/%d L1 %.4f (%.0fs)", step, args.steps, loss.item(), time.time() - t_train)
        if time.time() - t_train > args.max_minutes * 60:
            log.info("stopping at the time cap (%.0f minutes), step %d", args.max_minutes, step)
            break
    model.eval()
    model.half()
    model.float()  # measure what ships: fp16 weights, run in fp32
    got = psnr(upscale(model, processor, test_lr), test_hr)
    figures = {
        "swin2sr_psnr_db": round(got, 2),
        "bicubic_psnr_db": round(base, 2),
        "gain_db": round(got - base, 2),
        "steps": step,
        "minutes": round((time.time() - t_train) / 60, 1),
    }
    log.info("held-out: %s", figures)
    args.out.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(args.out, safe_serialization=True)
    processor.save_pretrained(args.out)
    (args.out / "training.json").write_text(json.dumps(figures | {"seed": args.seed}, indent=2))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("models/demo-swin2sr"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-images", type=int, default=1500)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--crop", type=int, default=16, help="LR crop size (a multiple of the window, 8)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-minutes", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    if not math.isfinite(args.lr):
        raise ValueError("--lr must be finite")
    train(args)


if __name__ == "__main__":
    main()
