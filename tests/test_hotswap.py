"""Every adapter switch equals a fresh load of that adapter, in any order of ranks, components and dtypes.

Adapters here differ in what a hot-swap must get right: rank (4 vs 8), components (UNet only vs UNet +
text encoder) and file dtype (fp16 file on an fp32 model). The cache has one slot, so every switch
evicts, and runs with hot-swap on and off.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from services.generator.messages import AdapterSpec, RenderSettings

TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _write_lora(
    pipe, folder: Path, seed: int, rank: int, text_encoder: bool, fp16: bool = False, kohya: bool = False
) -> AdapterSpec:
    """A random LoRA (B random too, so it changes images) on the UNet and optionally the text encoder.

    `kohya` writes Kohya names, which the service converts into a state dict (not a path) before loading.
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import load_file, save_file

    from demo.tiny import LORA_TARGETS

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    layers = {}
    parts = [("unet", pipe.unet, LORA_TARGETS)] + ([("te", pipe.text_encoder, TE_TARGETS)] if text_encoder else [])
    for part, module, targets in parts:
        # On a copy: transformers' add_adapter needs a newer peft than diffusers does.
        module = inject_adapter_in_model(
            LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False), copy.deepcopy(module)
        )
        with torch.no_grad():
            for name, p in module.named_parameters():
                if "lora_B" in name:
                    p.mul_(3.0)
        layers[part] = get_peft_model_state_dict(module)
    path = folder / "pytorch_lora_weights.safetensors"
    if kohya:
        tensors = {}
        for part, prefix in (("unet", "lora_unet_"), ("te", "lora_te_")):
            for key, t in layers.get(part, {}).items():
                module_name, kind = key.rsplit(".lora_", 1)
                name = prefix + module_name.replace(".", "_")
                tensors[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = t.contiguous()
                tensors[f"{name}.alpha"] = torch.tensor(float(rank))
        save_file(tensors, str(path))
        return AdapterSpec(key=f"{folder.name}@1", path=str(path), weight=1.0)
    te = convert_state_dict_to_diffusers(layers["te"]) if "te" in layers else None
    unet = convert_state_dict_to_diffusers(layers["unet"])
    type(pipe).save_lora_weights(folder, unet_lora_layers=unet, text_encoder_lora_layers=te, safe_serialization=True)
    if fp16:
        save_file({k: v.half() for k, v in load_file(path).items()}, path)
    return AdapterSpec(key=f"{folder.name}@1", path=str(path), weight=1.0)


def write_adapter_set(tiny_world: Path, out: Path) -> dict[str, AdapterSpec]:
    """Ranks 4 and 8, UNet only or with text-encoder layers, Kohya names, an fp16 file (also test_compile's)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_world / "tiny-sd", local_files_only=True)
    return {
        "r4-unet-te": _write_lora(pipe, out / "r4-unet-te", seed=21, rank=4, text_encoder=True),
        "r8-unet-te-kohya": _write_lora(pipe, out / "r8-unet-te-kohya", seed=22, rank=8, text_encoder=True, kohya=True),
        "r4-unet": _write_lora(pipe, out / "r4-unet", seed=23, rank=4, text_encoder=False),
        "r8-unet-fp16": _write_lora(pipe, out / "r8-unet-fp16", seed=24, rank=8, text_encoder=False, fp16=True),
    }


@pytest.fixture(scope="module")
def adapters(tiny_world, tmp_path_factory) -> dict[str, AdapterSpec]:
    return write_adapter_set(tiny_world, tmp_path_factory.mktemp("hotswap-adapters"))


def _settings(spec: AdapterSpec) -> RenderSettings:
    return RenderSettings("a photo on the beach", "", 3, 5.0, 64, 64, "", (spec,))


def _render(pipe, spec: AdapterSpec) -> np.ndarray:
    return np.asarray(pipe(_settings(spec), (3,))[0]).astype(np.int16)


@pytest.fixture(scope="module")
def fresh_renders(tiny_world, adapters) -> dict[str, np.ndarray]:
    """Each adapter loaded alone into its own new pipeline: what every switch must reproduce."""
    from services.generator.pipeline import ProductPipeline

    out = {}
    for name, spec in adapters.items():
        out[name] = _render(ProductPipeline(str(tiny_world / "tiny-sd"), "cpu", adapter_cache_size=1), spec)
    return out


ORDERS = {
    # The two defects found with hot-swap on: a larger rank after a smaller one (the UNet swaps, the text
    # encoder cannot), and a UNet-only adapter after one with text-encoder layers.
    "larger-rank-after-smaller": ["r4-unet-te", "r8-unet-te-kohya", "r4-unet-te"],
    "unet-only-after-text-encoder": ["r8-unet-te-kohya", "r4-unet", "r4-unet-te", "r4-unet"],
    "fp16-file-on-fp32-model": ["r4-unet", "r8-unet-fp16", "r4-unet-te", "r8-unet-fp16"],
}


@pytest.mark.parametrize("hotswap_rank", [0, 8], ids=["reload", "hotswap"])
@pytest.mark.parametrize("order", list(ORDERS), ids=list(ORDERS))
def test_every_switch_equals_a_fresh_load(tiny_world, adapters, fresh_renders, order, hotswap_rank):
    from services.generator.pipeline import ProductPipeline

    pipe = ProductPipeline(str(tiny_world / "tiny-sd"), "cpu", adapter_cache_size=1, hotswap_rank=hotswap_rank)
    assert len({fresh_renders[n].tobytes() for n in ORDERS[order]}) == len(set(ORDERS[order]))  # they differ
    for name in ORDERS[order]:
        got = _render(pipe, adapters[name])
        diff = np.abs(got - fresh_renders[name])
        assert diff.max() <= 1, f"{name} after a switch differs from its fresh load by up to {diff.max()} levels"
    # Swapped-in weights take the model's dtype, not the file's.
    lora_dtypes = {p.dtype for n, p in pipe.pipe.unet.named_parameters() if "lora_" in n}
    assert lora_dtypes == {torch.float32}
