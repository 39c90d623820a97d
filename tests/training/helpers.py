"""Shared by the training tests: a plain photo of a red square, and a TrainConfig lean enough for CI."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from training.lora import TrainConfig

# Attention and ResNet convs: on the random tiny model, attention alone barely moves the loss in 20 steps.
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")


def square(x: int, y: int, size: tuple[int, int] = (80, 72), side: int = 30) -> Image.Image:
    image = Image.new("RGB", size, (235, 235, 235))
    ImageDraw.Draw(image).rectangle([x, y, x + side, y + side], fill=(220, 30, 30))
    return image


def config(out: Path, base: Path, images: Path | None, work: Path, **overrides) -> TrainConfig:
    fields = dict(
        out=out,
        token="<red-square>",
        base=str(base),
        images=images,
        steps=20,
        lr=2e-2,
        batch_size=1,  # the CLI default is 4; one keeps these tests lean
        num_class_images=0,  # prior preservation has its own test
        resolution=32,
        target_modules=TARGETS,
        work_dir=work,
        threads=1,
        progress=False,
    )
    return TrainConfig(**(fields | overrides))
