"""Tiny random Stable Diffusion components, built from configs, offline.

They use the same classes as real SD 1.5, so every loading and serving path is the real one;
tests and the pre-demo-model `make run` build them instead of downloading weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from demo.tokenizer import CLIP_VOCAB_SIZE, load_clip_tokenizer

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]

# Shared by the SD and SDXL builders: two UNet levels, a 2x VAE, 4 latent channels.
UNET_LAYOUT = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
)
# A 2-layer CLIP text model over the real 49,408-token vocabulary.
CLIP_LAYOUT = dict(
    vocab_size=CLIP_VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=2,
    max_position_embeddings=77,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)
VAE_LAYOUT = dict(
    block_out_channels=(32, 64),
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    latent_channels=4,
    sample_size=64,
)


def build_tiny_pipeline(out_dir: str | Path, seed: int = 0):
    """Write a tiny StableDiffusionPipeline folder (loads with from_pretrained) and return the pipeline."""
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    out = Path(out_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **UNET_LAYOUT,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(**VAE_LAYOUT, norm_num_groups=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_LAYOUT))
    tokenizer = load_clip_tokenizer(out / "tokenizer", model_max_length=77)
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return pipe


def write_random_lora(pipe, out_dir: str | Path, seed: int, rank: int = 4, strength: float = 1.0) -> Path:
    """Attach a random UNet LoRA (peft), save it in diffusers/PEFT format, then remove it from `pipe`."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    # init_lora_weights=False: B is random too, so the adapter changes images without training.
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, init_lora_weights=False)
    pipe.unet.add_adapter(config, adapter_name="random")
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.mul_(strength)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet, adapter_name="random"))
    type(pipe).save_lora_weights(out, unet_lora_layers=layers, safe_serialization=True)
    pipe.unet.delete_adapters("random")
    return out / "pytorch_lora_weights.safetensors"


def build_tiny_sdxl(out_dir: str | Path, seed: int = 0):
    """A tiny StableDiffusionXLPipeline (two text encoders, text-time conditioning), saved to `out_dir`."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    out = Path(out_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **UNET_LAYOUT,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids + the pooled text embedding
        cross_attention_dim=64,  # both encoders' hidden states, concatenated
        norm_num_groups=1,
    )
    vae = AutoencoderKL(**VAE_LAYOUT)
    config = CLIPTextConfig(**CLIP_LAYOUT, projection_dim=32)
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=CLIPTextModel(config),
        text_encoder_2=CLIPTextModelWithProjection(config),
        tokenizer=load_clip_tokenizer(out / "tokenizer"),
        tokenizer_2=load_clip_tokenizer(out / "tokenizer_2"),
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
        ),
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return pipe
