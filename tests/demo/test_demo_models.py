"""The shipped demo models, measured on the demo world: judge accuracy, prompt obedience, super-resolution.

Nothing is skipped: missing weights are a failure. Figures and their meaning: docs/DEMO_MODEL.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from demo.judge import CHANCE, DEFAULT_PATH, load_judge
from demo.train_sd import eval_prompts
from demo.train_swin2sr import bicubic, make_pairs, psnr, upscale
from demo.world import PRODUCTS, all_triples, make_dataset, render_product
from tests.helpers import ROOT

SD_DIR = ROOT / "models" / "demo-sd"
SR_DIR = ROOT / "models" / "demo-swin2sr"


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


@pytest.fixture(scope="module")
def judge():
    assert (DEFAULT_PATH / "model.safetensors").exists(), "judge weights missing: python -m demo.judge"
    return load_judge()


@pytest.fixture(scope="module")
def sd_pipe():
    from diffusers import AutoPipelineForText2Image

    assert (SD_DIR / "model_index.json").exists(), "demo SD missing: python -m demo.train_sd"
    pipe = AutoPipelineForText2Image.from_pretrained(str(SD_DIR), dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_judge_reads_ground_truth_renders(judge) -> None:
    data = make_dataset(360, seed=4242, triples=all_triples())
    names = {"colour": "colour", "shape": "shape", "background": "background"}
    expected = {k: [getattr(s, a) for s in data.scenes] for k, a in names.items()}
    acc = judge.accuracy(data.images, expected)
    print(f"judge accuracy {acc}, chance {CHANCE}")
    assert all(v >= 0.98 for v in acc.values()), acc
    # The judge also reads larger images (it downsizes them).
    big = make_dataset(24, seed=4243, size=64, triples=all_triples())
    assert judge.predict(big.images)["colour"] == [s.colour for s in big.scenes]


def test_products_render_in_every_scene() -> None:
    rng = np.random.default_rng(0)
    assert len(PRODUCTS) >= 2
    for product in PRODUCTS.values():
        assert product.category == "demo" and product.display_name
        image = render_product(product.id, "beach", rng)
        assert image.size == (32, 32) and image.mode == "RGB"
        assert render_product(product.id, "city", rng, size=128).size == (128, 128)


def test_demo_sd_is_small_fp16_and_v_prediction() -> None:
    assert folder_mb(SD_DIR) <= 20, folder_mb(SD_DIR)
    with safe_open(str(SD_DIR / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    scheduler = json.loads((SD_DIR / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DPMSolverMultistepScheduler"
    assert scheduler["prediction_type"] == "v_prediction"


def test_demo_sd_obeys_held_out_prompts(sd_pipe, judge) -> None:
    prompts, seeds, expected = eval_prompts(seeds_per_triple=2)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    # No height/width: the default must be 32x32, the size the model was trained at.
    out = sd_pipe(prompts, num_inference_steps=20, guidance_scale=6.0, generator=generators, output_type="np")
    images = (out.images * 255).round().astype(np.uint8)
    assert images.shape == (len(prompts), 32, 32, 3)
    acc = judge.accuracy(images, expected)
    print(f"held-out prompt obedience {acc} on {len(prompts)} images; chance {CHANCE}")
    assert acc["colour"] >= 0.95, acc
    assert acc["background"] >= 0.95, acc
    assert acc["shape"] >= 0.85, acc


def test_demo_sd_runs_at_64(sd_pipe) -> None:
    image = sd_pipe(
        "a photo of a red star on the beach",
        height=64,
        width=64,
        num_inference_steps=8,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64)


def test_swin2sr_beats_bicubic() -> None:
    from transformers import Swin2SRForImageSuperResolution, Swin2SRImageProcessor

    assert folder_mb(SR_DIR) <= 5, folder_mb(SR_DIR)
    model = Swin2SRForImageSuperResolution.from_pretrained(str(SR_DIR), dtype=torch.float32).eval()
    processor = Swin2SRImageProcessor.from_pretrained(str(SR_DIR))
    lr, hr = make_pairs(32, seed=777_000, workers=1)
    gain = psnr(upscale(model, processor, lr), hr) - psnr(bicubic(lr), hr)
    print(f"Swin2SR gain over bicubic: {gain:.2f} dB")
    assert gain >= 1.0, gain
