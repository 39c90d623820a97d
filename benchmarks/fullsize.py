"""An SD 1.5-sized world with random weights, for benchmarks that need real compute per image.

    python -m benchmarks.fullsize --out .cache/sd15-random

Same module structure and sizes as runwayml/stable-diffusion-v1-5 (UNet 860M, CLIP ViT-L/14 text
encoder, the SD VAE) and rank-16 product LoRAs on the UNet attention, built from configs offline.
Seconds, memory and adapter-switching costs do not depend on the weight values, so the figures
stand for real SD 1.5; the images are noise. Saved in fp16 (1.7 GB).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from demo.embedded import write_adapters
from demo.sd15 import SD15_TEXT, SD15_UNET, SD15_VAE
from demo.tokenizer import load_clip_tokenizer

MODEL_DIR = "sd15-random"
PRODUCTS = [
    ("sd15-shoe", "product", "Random shoe", "shoes", "<sd15-shoe>", 21),
    ("sd15-lipstick", "product", "Random lipstick", "cosmetics", "<sd15-lipstick>", 22),
    ("sd15-film", "style", "Film look", "", "film style", 23),
]
LORA_RANK = 16


def build(out: Path) -> Path:
    """Write model/, products/ and adapters/ under `out`; return the model folder."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    started = time.perf_counter()
    # Random init is ~1e9 draws: on a GPU it takes a second, on a CPU about a minute.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        pipe = StableDiffusionPipeline(
            unet=UNet2DConditionModel(**SD15_UNET),
            vae=AutoencoderKL(**SD15_VAE, scaling_factor=0.18215),
            text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT)),
            tokenizer=load_clip_tokenizer(out / MODEL_DIR / "tokenizer", model_max_length=77),
            scheduler=DPMSolverMultistepScheduler(
                beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
            ),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    # Save before adapters are attached: PEFT leaves wrapper layers behind even once they are deleted.
    pipe.to(torch.float16).save_pretrained(out / MODEL_DIR, safe_serialization=True)
    write_adapters(pipe.to(torch.float32), out, PRODUCTS, rank=LORA_RANK, strength=1.0)
    (out / ".ready").write_text(f"built in {time.perf_counter() - started:.0f}s on {device}\n")
    return out / MODEL_DIR


def ensure(out: Path) -> Path:
    if not (out / ".ready").exists():
        build(out)
    return out / MODEL_DIR


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(".cache/sd15-random"))
    print(build(parser.parse_args().out))


if __name__ == "__main__":
    main()
