"""Train a product LoRA on a few photos (or a video) and write a ready product folder.

    python -m training.lora --images photos/mug --token "<my-mug>" --base models/demo-sd --out products/my-mug
    python -m training.lora --video mug.mp4 --fps 2 --token "<my-mug>" --learn-token --init-word mug \\
        --base models/demo-sd --out products/my-mug --display-name "My mug" --category kitchen

The folder holds manifest.yaml, the adapter as diffusers/PEFT `pytorch_lora_weights.safetensors`,
`embeddings.safetensors` when the token is learned (pivotal tuning) and `training.json`. It is
written into a hidden temp folder beside the target and renamed at the end, so the generator (which
rescans products before every request) never sees a half-written product. Checkpoints and
validation images go to --work-dir. Recipe and measurements: docs/TRAINING.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from training import TrainingError
from training.data import (
    DEFAULT_DEDUPE_THRESHOLD,
    DEFAULT_TEMPLATE,
    MAX_SCALE,
    Augment,
    Example,
    augment,
    augment_view,
    auto_background_swap,
    center_crop,
    extract_video_frames,
    make_caption,
    mask_box,
    product_mask,
    read_image_folder,
    swap_background,
)

log = logging.getLogger("training.lora")

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
ADAPTER_FILE = "pytorch_lora_weights.safetensors"
EMBEDDINGS_FILE = "embeddings.safetensors"
CHECKPOINT_PREFIX = "checkpoint-"
EVAL_TIMESTEPS = (0.1, 0.3, 0.5, 0.7, 0.9)  # fractions of the schedule for the fixed evaluation loss
TOKEN_PATTERN = re.compile(r"<[^<>\s]+>")


@dataclass
class TrainConfig:
    """Everything one training run needs; the CLI flags map onto these one to one."""

    out: Path
    token: str
    base: str
    images: Path | None = None
    video: Path | None = None
    fps: float = 2.0
    dedupe_threshold: float = DEFAULT_DEDUPE_THRESHOLD
    caption_template: str = DEFAULT_TEMPLATE
    display_name: str = ""
    category: str = ""
    description: str = ""
    prompt_phrase: str = ""
    default_scale: float = 1.0
    rank: int = 4
    alpha: float | None = None
    target_modules: tuple[str, ...] = UNET_TARGETS
    train_text_encoder: bool = True
    learn_token: bool | None = None  # None: learn it when every token is a new <name> (see resolve_learn_token)
    init_word: str = "object"
    token_lr: float | None = None
    steps: int = 800
    lr: float = 1e-4
    batch_size: int = 4
    resolution: int | None = None
    # Off by default: a mirrored product is another product (a handle on the other side, text reversed), and
    # flipped views make its asymmetric parts a coin toss that a small adapter averages away (docs/TRAINING.md).
    flip: bool = False
    max_crop_scale: float = MAX_SCALE
    keep_product: bool = True  # crops (and their zoom) never cut the product, where a photo has a mask
    crop_margin: float = 0.0625  # with keep_product: share of the side kept clear around the product (data.Augment)
    # The loss on the product's own latent pixels (photos with a mask) counts this many times the background's:
    # the product is a small part of each view, and its thin parts (a handle) a smaller one still. 1: plain loss.
    mask_weight: float = 1.0
    color_jitter: float = 0.08
    # Share of product views put on a random background (photos with a mask); None: auto (`auto_background_swap`).
    background_swap: float | None = None
    swap_light: tuple[float, float] = (0.15, 0.4)  # brightness of the swapped backgrounds (0 black, 1 white)
    swap_colour: float = 0.0  # saturation of the swapped backgrounds (0: greys)
    class_prompts: tuple[str, ...] = ()
    num_class_images: int = 100
    prior_weight: float = 1.0
    class_guidance: float = 7.5
    seed: int = 0
    checkpoint_every: int = 0
    validate_every: int = 0
    validation_prompt: str = ""
    validation_steps: int = 20
    resume: str | None = None
    work_dir: Path | None = None
    device: str = "auto"
    mixed_precision: str = "auto"
    gradient_checkpointing: str = "auto"
    threads: int = 0
    overwrite: bool = False
    progress: bool = True


@dataclass
class TrainResult:
    out: Path
    steps: int
    eval_loss_start: float
    eval_loss_end: float
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    examples: int = 0
    resumed_from: int = 0


# 1. Inputs


def parse_tokens(token: str) -> list[str]:
    """`<s1><s2>` -> ['<s1>', '<s2>']; anything else is one token."""
    token = token.strip()
    if not token:
        raise TrainingError("--token: empty")
    found = TOKEN_PATTERN.findall(token)
    return found if found and "".join(found) == token else [token]


def check_product_id(out: Path) -> str:
    from services.generator.catalog import ID_PATTERN

    if not ID_PATTERN.match(out.name):
        raise TrainingError(f"--out: {out.name!r} is not a valid product id (letters, digits, '.', '_', '-')")
    return out.name


def tokens_in_use(products_dir: Path, exclude: str) -> dict[str, str]:
    """Lower-cased token -> product id, for every product folder in `products_dir` except `exclude`."""
    import yaml

    used: dict[str, str] = {}
    if not products_dir.is_dir():
        return used
    for manifest in sorted(products_dir.glob("*/manifest.yaml")):
        product = manifest.parent.name
        if product == exclude or product.startswith("."):
            continue
        try:
            data = yaml.safe_load(manifest.read_text()) or {}
        except (yaml.YAMLError, OSError):
            continue
        if data.get("kind", "product") != "product":
            continue
        for t in data.get("tokens") or []:
            used[str(t).lower()] = product
    return used


def resolve_learn_token(setting: bool | None, tokens: list[str]) -> bool:
    """--learn-token / --no-learn-token, or by default: learn the token(s) when each is a new `<name>`;
    a plain phrase (`at night`, `sks mug`) stays words the text encoder already knows."""
    if setting is not None:
        return setting
    return all(TOKEN_PATTERN.fullmatch(t) for t in tokens)


def check_tokens_free(products_dir: Path, product_id: str, tokens: list[str]) -> None:
    used = tokens_in_use(products_dir, product_id)
    for t in tokens:
        if t.lower() in used:
            owner = used[t.lower()]
            raise TrainingError(
                f"--token: {t} is already used by product {owner!r} ({products_dir / owner}); pick another token"
            )


def load_examples(cfg: TrainConfig, phrase: str, work: Path) -> list[Example]:
    if bool(cfg.images) == bool(cfg.video):
        raise TrainingError("give exactly one of --images DIR or --video FILE")
    if cfg.video:
        video = extract_video_frames(cfg.video, cfg.fps, cfg.dedupe_threshold, work / "frames")
        caption = make_caption(phrase, cfg.caption_template)
        examples = [Example(f, caption, f"{Path(cfg.video).name}#{i}") for i, f in enumerate(video.frames)]
        paths = [work / "frames" / f"frame-{i:04d}.png" for i in range(len(examples))]
    elif cfg.images is not None:
        items = read_image_folder(cfg.images)
        examples = [Example(im, make_caption(phrase, cfg.caption_template, sc), p.name) for im, sc, p in items]
        paths = [p for _, _, p in items]
    if cfg.background_swap != 0 or cfg.keep_product:
        sources: dict[str, int] = {}
        for example, path in zip(examples, paths, strict=True):
            example.mask, source = product_mask(path, example.image)
            key = source if example.mask is not None else "none"
            sources[key] = sources.get(key, 0) + 1
        why = "set by --background-swap"
        if cfg.background_swap is None:
            cfg.background_swap, why = auto_background_swap(examples)
        log.info(
            "background swap %.0f%% of views (%s), crops %s the product: %d of %d images have a product mask (%s)",
            100 * cfg.background_swap,
            why,
            "keep" if cfg.keep_product else "may cut",
            len(examples) - sources.get("none", 0),
            len(examples),
            ", ".join(f"{k}: {v}" for k, v in sorted(sources.items())),
        )
    return examples


# 2. Base model


@dataclass
class Base:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any  # the model's own (inference) scheduler
    noise_scheduler: Any  # DDPM with the same betas and prediction_type, for training
    fingerprint: dict

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale


def load_base(base: str) -> Base:
    """The base model's components in fp32, or a TrainingError."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    local = Path(base).expanduser()
    if local.exists():
        index = local / "model_index.json"
        if not index.is_file():
            raise TrainingError(f"--base: {base} is not a diffusers model folder (no model_index.json)")
        kind = json.loads(index.read_text()).get("_class_name", "")
        if kind not in ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", ""):
            raise TrainingError(f"--base: {base} is a {kind}; only Stable Diffusion 1.x/2.x-style bases are supported")
    # Files stored in fp16 (the demo model) are upcast: LoRA training wants fp32 master weights.
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            str(local if local.exists() else base),
            dtype=torch.float32,
            safety_checker=None,
            requires_safety_checker=False,
            local_files_only=local.exists(),
        )
    except Exception as exc:
        raise TrainingError(f"--base: cannot load {base} ({type(exc).__name__}: {exc})") from exc
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise TrainingError(f"--base: prediction_type {prediction!r} is not supported (epsilon or v_prediction)")
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    te_config = pipe.text_encoder.config
    fingerprint = {
        "block_out_channels": list(pipe.unet.config.block_out_channels),
        "cross_attention_dim": pipe.unet.config.cross_attention_dim,
        "text_hidden_size": te_config.hidden_size,
        "text_layers": te_config.num_hidden_layers,
        "vocab_size": len(pipe.tokenizer),
        "prediction_type": prediction,
    }
    return Base(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, noise_scheduler, fingerprint)


class LearnedTokens(torch.nn.Module):
    """Trainable embedding rows for new tokens (pivotal tuning).

    A forward hook puts them into the text encoder's token embedding output, so only these rows
    are trained (and held in the optimizer), not the whole vocabulary matrix.
    """

    def __init__(self, embedding: torch.nn.Embedding, ids: list[int], init: torch.Tensor):
        super().__init__()
        self.ids = ids
        self.rows = torch.nn.Parameter(init.detach().clone().float())
        self.handle = embedding.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if not args:
            return output
        input_ids = args[0]
        for j, token_id in enumerate(self.ids):
            mask = (input_ids == token_id).unsqueeze(-1)
            output = torch.where(mask, self.rows[j].to(output.dtype), output)
        return output

    def write_back(self, embedding: torch.nn.Embedding) -> None:
        with torch.no_grad():
            for j, token_id in enumerate(self.ids):
                embedding.weight[token_id] = self.rows[j].to(embedding.weight.dtype)


def add_learned_tokens(base: Base, tokens: list[str], init_word: str) -> LearnedTokens:
    tokenizer, encoder = base.tokenizer, base.text_encoder
    for t in tokens:
        if any(c.isspace() for c in t):
            raise TrainingError(f"--token: {t!r} has spaces; a learned token must be one word, such as <my-mug>")
        pieces = tokenizer.tokenize(t)
        if t in tokenizer.get_vocab() or (len(pieces) == 1 and pieces[0].removesuffix("</w>") == t.lower()):
            raise TrainingError(f"--token: {t!r} is already a word the tokenizer knows; pick a new one like <my-mug>")
    init_ids = tokenizer(init_word, add_special_tokens=False).input_ids
    if not init_ids:
        raise TrainingError(f"--init-word: {init_word!r} gives no tokens")
    tokenizer.add_tokens(tokens)
    encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    embedding = encoder.get_input_embeddings()
    init = embedding.weight[init_ids].mean(0)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    learned = LearnedTokens(embedding, ids, init.expand(len(tokens), -1))
    learned.write_back(embedding)
    return learned


def add_lora(base: Base, cfg: TrainConfig) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    alpha = cfg.alpha if cfg.alpha is not None else cfg.rank
    base.unet.requires_grad_(False)
    base.vae.requires_grad_(False)
    base.text_encoder.requires_grad_(False)
    try:
        config = LoraConfig(
            r=cfg.rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(cfg.target_modules)
        )
        base.unet.add_adapter(config)
    except ValueError as exc:
        raise TrainingError(f"--target-modules: {exc}") from exc
    if cfg.train_text_encoder:
        te_config = LoraConfig(
            r=cfg.rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(TEXT_ENCODER_TARGETS)
        )
        # peft directly: transformers' own add_adapter insists on a newer peft than diffusers needs.
        inject_adapter_in_model(te_config, base.text_encoder, adapter_name="default")
        for name, p in base.text_encoder.named_parameters():
            p.requires_grad_("lora_" in name)


def trainable_parameters(base: Base, learned: LearnedTokens | None) -> dict[str, torch.nn.Parameter]:
    params = {f"unet.{n}": p for n, p in base.unet.named_parameters() if p.requires_grad}
    params |= {f"text_encoder.{n}": p for n, p in base.text_encoder.named_parameters() if p.requires_grad}
    if learned is not None:
        params["tokens.rows"] = learned.rows
    return params


# 3. Training pieces


def choose_precision(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    mode = cfg.mixed_precision
    if mode == "no" or device.type != "cuda":
        if mode in ("fp16", "bf16") and device.type != "cuda":
            log.info("mixed precision %s needs CUDA; training in fp32", mode)
        return None
    if mode == "fp16":
        return torch.float16
    if mode == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def encode_text(base: Base, captions: list[str], device: torch.device) -> torch.Tensor:
    # The demo model's text encoder has 16 positions; never pad past what the encoder holds.
    length = min(base.tokenizer.model_max_length, base.text_encoder.config.max_position_embeddings)
    ids = base.tokenizer(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return base.text_encoder(ids.input_ids.to(device))[0]


def encode_images(base: Base, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    with torch.no_grad():
        dist = base.vae.encode(pixels.to(base.vae.device)).latent_dist
        latents = dist.sample(generator=generator) if generator is not None else dist.mode()
    shift = getattr(base.vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * base.vae.config.scaling_factor


def diffusion_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict, by the scheduler's prediction_type."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, t)
    raise TrainingError(f"prediction_type {kind!r} is not supported")


def latent_weights(masks: torch.Tensor, size, weight: float) -> torch.Tensor:
    """Per-latent-pixel loss weights (N1hw) from pixel masks (N1HW in [0, 1]): 1 on the background, `weight` on
    the product, in between where a latent pixel is partly product (area average)."""
    cover = F.interpolate(masks.float(), size=tuple(size), mode="area")
    return 1.0 + (weight - 1.0) * cover


def denoise_loss(
    base: Base,
    latents,
    noise,
    t,
    cond,
    amp: torch.dtype | None,
    per_example: bool = False,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The denoising MSE; with `weights` (N1hw, `latent_weights`) a weighted mean per example, so a view's loss
    keeps its scale whatever share of it the product takes."""
    noisy = base.noise_scheduler.add_noise(latents, noise, t)
    with torch.autocast(latents.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        pred = base.unet(noisy, t, encoder_hidden_states=cond).sample
    target = diffusion_target(base.noise_scheduler, latents, noise, t).float()
    err = F.mse_loss(pred.float(), target, reduction="none")
    if weights is not None:
        w = weights.expand_as(err)
        per = (err * w).flatten(1).sum(1) / w.flatten(1).sum(1)
    else:
        per = err.flatten(1).mean(1)
    return per if per_example else per.mean()


@dataclass
class EvalSet:
    """Fixed images, noise and timesteps: a loss comparable across steps (the training loss is too noisy)."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    captions: list[str]


def make_eval_set(base: Base, examples: list[Example], resolution: int, seed: int, device) -> EvalSet:
    chosen = examples[: min(4, len(examples))]
    g = torch.Generator().manual_seed(seed + 1)
    n_train = base.noise_scheduler.config.num_train_timesteps
    pixels = torch.stack([center_crop(e.image, resolution) for e in chosen]).to(device)
    latents = encode_images(base, pixels, None)
    k = len(EVAL_TIMESTEPS)
    latents = latents.repeat_interleave(k, 0)
    timesteps = torch.tensor([int(f * n_train) for f in EVAL_TIMESTEPS] * len(chosen), device=device)
    noise = torch.randn(latents.shape, generator=g).to(device)
    return EvalSet(latents, noise, timesteps, [e.caption for e in chosen for _ in range(k)])


def eval_loss(base: Base, ev: EvalSet, amp: torch.dtype | None, chunk: int = 8) -> float:
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(ev.captions), chunk):
            sl = slice(i, i + chunk)
            cond = encode_text(base, ev.captions[sl], ev.latents.device)
            loss = denoise_loss(base, ev.latents[sl], ev.noise[sl], ev.timesteps[sl], cond, amp)
            total += loss.item() * len(ev.captions[sl])
    return total / len(ev.captions)


def validate(base: Base, prompt: str, resolution: int, steps: int, seed: int, path: Path) -> None:
    """Render one image with the current weights (fixed seed), for watching training progress."""
    pipe = _base_pipeline(base)
    base.unet.eval()
    try:
        generator = torch.Generator("cpu").manual_seed(seed)
        with torch.no_grad():
            image = pipe(
                prompt, num_inference_steps=steps, height=resolution, width=resolution, generator=generator
            ).images[0]
    finally:
        base.unet.train()
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _base_pipeline(base: Base):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=base.unet,
        scheduler=type(base.scheduler).from_config(base.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def class_prompts(cfg: TrainConfig) -> list[str]:
    """The prompts for prior-preservation images: --class-prompt, else the caption template with the
    class (`a {init_word}`) in place of the token, and the empty prompt. The empty prompt is classifier-free
    guidance's unconditional branch: kept as the base model draws it, guidance amplifies what the adapter
    adds instead of cancelling it (docs/TRAINING.md, "What was tried")."""
    return list(cfg.class_prompts) or [cfg.caption_template.replace("{token}", f"a {cfg.init_word}"), ""]


def make_class_images(base: Base, cfg: TrainConfig, resolution: int, work: Path, device) -> list[Example]:
    """Prior preservation: images of the product's class drawn by the base model itself (before any LoRA
    or learned token), spread evenly over the class prompts. Cached in the work dir by their settings."""
    import hashlib

    from PIL import Image

    if cfg.num_class_images <= 0 or cfg.prior_weight <= 0:
        return []
    prompts = class_prompts(cfg)
    key = {
        "prompts": prompts,
        "n": cfg.num_class_images,
        "resolution": resolution,
        "steps": cfg.validation_steps,
        "guidance": cfg.class_guidance,
        "seed": cfg.seed,
        "base": cfg.base,
        "fingerprint": base.fingerprint,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    folder = work / f"class-images-{digest}"
    wanted = [prompts[i % len(prompts)] for i in range(cfg.num_class_images)]
    if (folder / "captions.json").is_file():
        captions = json.loads((folder / "captions.json").read_text())
        return [
            Example(Image.open(folder / f"{i:04d}.png").convert("RGB"), c, f"class/{i:04d}.png")
            for i, c in enumerate(captions)
        ]
    started = time.perf_counter()
    pipe = _base_pipeline(base)
    tmp = work / f".class-images-{digest}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen_device = "cpu" if device.type != "cuda" else device
    chunk = 16
    with torch.no_grad():
        for i in range(0, len(wanted), chunk):
            batch = wanted[i : i + chunk]
            generators = [
                torch.Generator(gen_device).manual_seed(cfg.seed * 1_000_003 + i + j) for j in range(len(batch))
            ]
            images = pipe(
                batch,
                num_inference_steps=cfg.validation_steps,
                guidance_scale=cfg.class_guidance,
                height=resolution,
                width=resolution,
                generator=generators,
            ).images
            for j, image in enumerate(images):
                image.save(tmp / f"{i + j:04d}.png")
    (tmp / "captions.json").write_text(json.dumps(wanted, indent=1))
    (tmp / "settings.json").write_text(json.dumps(key, indent=1, default=str))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    log.info("made %d class images in %.0fs (%s)", len(wanted), time.perf_counter() - started, folder)
    return make_class_images(base, cfg, resolution, work, device)


# 4. Checkpoints


def settings_key(cfg: TrainConfig, tokens: list[str]) -> dict:
    """What must match for a checkpoint to be resumable."""
    return {
        "rank": cfg.rank,
        "alpha": cfg.alpha if cfg.alpha is not None else cfg.rank,
        "target_modules": list(cfg.target_modules),
        "train_text_encoder": cfg.train_text_encoder,
        "learn_token": cfg.learn_token,
        "tokens": tokens,
    }


def save_checkpoint(work: Path, step: int, params, optimizer, generator, state: dict) -> Path:
    from safetensors.torch import save_file

    final = work / f"{CHECKPOINT_PREFIX}{step:06d}"
    tmp = work / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {n: p.detach().cpu().contiguous() for n, p in params.items()}
    tensors["rng.train"] = generator.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, tmp / "trainable.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def find_checkpoint(work: Path, resume: str) -> Path:
    if resume != "latest":
        path = Path(resume)
        if not (path / "state.json").is_file():
            raise TrainingError(f"--resume: {path} is not a checkpoint folder (no state.json)")
        return path
    found = sorted(p for p in work.glob(f"{CHECKPOINT_PREFIX}*") if (p / "state.json").is_file())
    if not found:
        raise TrainingError(f"--resume: no checkpoints in {work}")
    return found[-1]


def load_checkpoint(path: Path, params, optimizer, generator, expected: dict, fingerprint: dict, base: str) -> int:
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text())
    if state.get("fingerprint") != fingerprint:
        raise TrainingError(
            f"--resume: {path} was trained on another base model ({state.get('base')}: {state.get('fingerprint')}); "
            f"the adapter does not fit {base} ({fingerprint})"
        )
    if state.get("settings") != expected:
        raise TrainingError(f"--resume: {path} used other settings {state.get('settings')}; this run has {expected}")
    tensors = load_file(str(path / "trainable.safetensors"))
    with torch.no_grad():
        for name, p in params.items():
            if name not in tensors or tensors[name].shape != p.shape:
                raise TrainingError(f"--resume: {path} does not fit {base}: parameter {name} missing or reshaped")
            p.copy_(tensors[name])
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    generator.set_state(tensors["rng.train"])
    torch.set_rng_state(tensors["rng.torch"])
    return int(state["step"])


# 5. Output


def lora_state(model, alpha: float, rank: int) -> dict[str, torch.Tensor]:
    """The model's LoRA weights in PEFT naming with alpha/rank folded into lora_B (so any loader gets scale 1)."""
    from peft import get_peft_model_state_dict

    # Saved PEFT-named, not through convert_state_dict_to_diffusers: with targets beyond the attention
    # projections that mixes two namings, and diffusers then silently drops part of the file.
    state = get_peft_model_state_dict(model, adapter_name="default")
    if hasattr(model, "get_input_embeddings") and not hasattr(model, "text_model"):
        # The `text_model.` prefix older transformers use; diffusers strips it for flattened models.
        state = {f"text_model.{k}": v for k, v in state.items()}
    return {
        k: (v * (alpha / rank) if "lora_B" in k else v).detach().cpu().float().contiguous() for k, v in state.items()
    }


def write_product(
    tmp: Path, base: Base, cfg: TrainConfig, tokens: list[str], phrase: str, learned, summary: dict
) -> None:
    import yaml
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    alpha = cfg.alpha if cfg.alpha is not None else cfg.rank
    te_layers = lora_state(base.text_encoder, alpha, cfg.rank) if cfg.train_text_encoder else None
    StableDiffusionPipeline.save_lora_weights(
        tmp,
        unet_lora_layers=lora_state(base.unet, alpha, cfg.rank),
        text_encoder_lora_layers=te_layers,
        safe_serialization=True,
    )
    manifest: dict[str, Any] = {
        "display_name": cfg.display_name or cfg.out.name,
        "kind": "product",
        "category": cfg.category,
        "tokens": tokens,
        "prompt_phrase": phrase,
        "adapter": ADAPTER_FILE,
    }
    if learned is not None:
        rows = learned.rows.detach().cpu().float()
        save_file({t: rows[j].contiguous() for j, t in enumerate(tokens)}, tmp / EMBEDDINGS_FILE)
        manifest["embeddings"] = EMBEDDINGS_FILE
    manifest |= {"default_scale": cfg.default_scale, "base_model": cfg.base}
    if cfg.description:
        manifest["description"] = cfg.description
    (tmp / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False, allow_unicode=True))
    (tmp / "training.json").write_text(json.dumps(summary, indent=2, default=str))


def publish(tmp: Path, target: Path, overwrite: bool) -> None:
    """Rename the finished temp folder onto `target` (replacing it only with --overwrite)."""
    if not target.exists():
        tmp.rename(target)
        return
    if not overwrite:
        raise TrainingError(f"--out: {target} appeared while training; pass --overwrite to replace it")
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


# 6. The run


def train(cfg: TrainConfig) -> TrainResult:
    """Train and publish one product folder; raises TrainingError for bad inputs."""
    started = time.perf_counter()

    # 1. Check inputs (before anything slow)
    target = Path(cfg.out).absolute()
    product_id = check_product_id(target)
    tokens = parse_tokens(cfg.token)
    phrase = cfg.prompt_phrase or "".join(tokens)
    check_tokens_free(target.parent, product_id, tokens)
    if target.exists() and not cfg.overwrite:
        raise TrainingError(f"--out: {target} already exists; pass --overwrite to replace it")
    cfg.learn_token = resolve_learn_token(cfg.learn_token, tokens)
    for name in ("steps", "rank", "batch_size"):
        if getattr(cfg, name) < 1:
            raise TrainingError(f"--{name.replace('_', '-')}: must be at least 1")
    if cfg.background_swap is not None and not 0.0 <= cfg.background_swap <= 1.0:
        raise TrainingError(f"--background-swap: a share between 0 and 1, got {cfg.background_swap}")
    if not 0.0 <= cfg.swap_colour <= 1.0:
        raise TrainingError(f"--swap-colour: between 0 and 1, got {cfg.swap_colour}")
    if not cfg.mask_weight > 0:
        raise TrainingError(f"--mask-weight: must be above 0, got {cfg.mask_weight}")
    work = Path(cfg.work_dir) if cfg.work_dir else Path(".cache") / "training" / product_id
    work.mkdir(parents=True, exist_ok=True)
    examples = load_examples(cfg, phrase, work)

    # 2. Base model, device, precision
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    base = load_base(cfg.base)
    device = torch.device(
        "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device.replace("auto", "cpu")
    )
    resolution = cfg.resolution or base.native_resolution
    multiple = base.vae_scale * 2 ** (len(base.unet.config.block_out_channels) - 1)
    if resolution % multiple:
        raise TrainingError(f"--resolution: {resolution} is not a multiple of {multiple} for this base model")
    amp = choose_precision(cfg, device)

    # 3. Class images for prior preservation (by the untouched base model), then tokens and LoRA layers
    for module in (base.unet, base.vae, base.text_encoder):
        module.to(device)
    prior = make_class_images(base, cfg, resolution, work, device)
    learned = add_learned_tokens(base, tokens, cfg.init_word) if cfg.learn_token else None
    add_lora(base, cfg)
    for module in (base.unet, base.vae, base.text_encoder):
        module.to(device)
    if learned is not None:
        learned.to(device)
    if cfg.gradient_checkpointing == "on" or (cfg.gradient_checkpointing == "auto" and device.type == "cuda"):
        base.unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder or learned is not None:
            base.text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    text_trains = cfg.train_text_encoder or learned is not None
    base.unet.train()
    base.text_encoder.train(text_trains)
    base.vae.eval()

    # 4. Optimizer, and the checkpoint to resume from
    params = trainable_parameters(base, learned)
    groups = [{"params": [p for n, p in params.items() if n != "tokens.rows"], "lr": cfg.lr, "weight_decay": 1e-2}]
    if learned is not None:
        groups.append({"params": [learned.rows], "lr": cfg.token_lr or cfg.lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    expected = settings_key(cfg, tokens)
    ckpt_state = {"base": cfg.base, "fingerprint": base.fingerprint, "settings": expected}
    start = 0
    if cfg.resume:
        checkpoint = find_checkpoint(work, cfg.resume)
        start = load_checkpoint(checkpoint, params, optimizer, generator, expected, base.fingerprint, cfg.base)
        log.info("resumed from %s (step %d)", checkpoint, start)
        if start >= cfg.steps:
            raise TrainingError(f"--resume: {checkpoint} is at step {start}, --steps is {cfg.steps}")
    validation_prompt = cfg.validation_prompt or make_caption(phrase, cfg.caption_template)
    swapped_caption = make_caption(phrase, DEFAULT_TEMPLATE)

    # 5. Train
    ev = make_eval_set(base, examples, resolution, cfg.seed, device)
    loss_start = eval_loss(base, ev, amp)
    losses: list[float] = []
    n_train = base.noise_scheduler.config.num_train_timesteps
    trainable = list(params.values())
    bar = tqdm(total=cfg.steps, initial=start, desc=f"training {product_id}", disable=not cfg.progress, unit="step")
    smooth = None
    aug = Augment(
        max_scale=cfg.max_crop_scale,
        flip=cfg.flip,
        brightness=cfg.color_jitter,
        contrast=cfg.color_jitter,
        margin=cfg.crop_margin,
    )
    prior_aug = Augment(max_scale=cfg.max_crop_scale, flip=True, brightness=0.0, contrast=0.0)
    # The product's box per photo (a swapped background keeps the photo's geometry).
    boxes = [mask_box(e.mask) if cfg.keep_product else None for e in examples]
    weighted = cfg.mask_weight != 1.0 and any(e.mask is not None for e in examples)
    swap_share = cfg.background_swap or 0.0  # load_examples resolved "auto"
    for step in range(start + 1, cfg.steps + 1):
        idx = torch.randint(0, len(examples), (cfg.batch_size,), generator=generator).tolist()
        batch = [examples[i] for i in idx]
        if swap_share > 0 and any(e.mask is not None for e in batch):
            # Cut out and put on a random background; the scene words go with the old background.
            swap = (torch.rand(len(batch), generator=generator) < swap_share).tolist()
            batch = [
                Example(
                    swap_background(e.image, e.mask, generator, cfg.swap_light, cfg.swap_colour),
                    swapped_caption,
                    e.source,
                )
                if s and e.mask is not None
                else e
                for e, s in zip(batch, swap, strict=True)
            ]
        # Masks from the photos, not the swapped copies: a swap keeps the geometry.
        moved = [
            augment_view(e.image, resolution, generator, aug, boxes[i], examples[i].mask if weighted else None)
            for i, e in zip(idx, batch, strict=True)
        ]
        views = [v.pixels for v in moved]
        if prior:
            # Prior preservation: as many class images as product images, in the same forward pass.
            pidx = torch.randint(0, len(prior), (cfg.batch_size,), generator=generator).tolist()
            batch += [prior[i] for i in pidx]
            views += [augment(prior[i].image, resolution, generator, aug=prior_aug) for i in pidx]
        latents = encode_images(base, torch.stack(views).to(device), generator)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        t = torch.randint(0, n_train, (len(batch),), generator=generator).to(device)
        with torch.set_grad_enabled(text_trains):
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                cond = encode_text(base, [e.caption for e in batch], device)
        weights = None
        if weighted:
            masks = [v.mask if v.mask is not None else torch.zeros_like(v.pixels[:1]) for v in moved]
            masks += [torch.zeros_like(views[0][:1])] * (len(batch) - len(idx))  # class images: plain loss
            weights = latent_weights(torch.stack(masks), latents.shape[-2:], cfg.mask_weight).to(device)
        per = denoise_loss(base, latents, noise, t, cond, amp, per_example=True, weights=weights)
        loss = per[: len(idx)].mean()
        if prior:
            loss = loss + cfg.prior_weight * per[len(idx) :].mean()
        if not math.isfinite(loss.item()):
            raise TrainingError(f"loss is {loss.item()} at step {step}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
        smooth = loss.item() if smooth is None else 0.9 * smooth + 0.1 * loss.item()
        bar.set_postfix(loss=f"{smooth:.4f}")
        bar.update(1)
        if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            save_checkpoint(work, step, params, optimizer, generator, ckpt_state)
        if cfg.validate_every and (step % cfg.validate_every == 0 or step == cfg.steps):
            validate(
                base, validation_prompt, resolution, cfg.validation_steps, cfg.seed, work / f"validation-{step:06d}.png"
            )
    bar.close()
    loss_end = eval_loss(base, ev, amp)

    # 6. Publish: temp folder beside the target, renamed at the end
    seconds = time.perf_counter() - started
    result = TrainResult(target, cfg.steps, loss_start, loss_end, losses, seconds, len(examples), start)
    summary = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "resolution": resolution,
        "prediction_type": base.noise_scheduler.config.prediction_type,
        "examples": [{"source": e.source, "caption": e.caption, "mask": e.mask is not None} for e in examples],
        "class_images": {"count": len(prior), "prompts": class_prompts(cfg) if prior else []},
        "eval_loss_start": loss_start,
        "eval_loss_end": loss_end,
        "resumed_from_step": start,
        "seconds": round(seconds, 1),
        "device": str(device),
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{product_id}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_product(tmp, base, cfg, tokens, phrase, learned, summary)
        publish(tmp, target, cfg.overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


# 7. CLI


def _swap_share(text: str) -> float | None:
    if text == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'auto' or a share between 0 and 1, got {text!r}") from None


def _light_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"LO,HI between 0 and 1, got {text!r}") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise argparse.ArgumentTypeError(f"LO,HI with 0 <= LO <= HI <= 1, got {text!r}")
    return lo, hi


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.lora", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_argument_group("data")
    src.add_argument("--images", type=Path, help="folder of product photos; optional NAME.txt captions beside them")
    src.add_argument("--video", type=Path, help="a video of the product instead of photos")
    src.add_argument("--fps", type=float, default=2.0, help="frames per second taken from --video (default 2)")
    src.add_argument(
        "--dedupe-threshold",
        type=float,
        default=DEFAULT_DEDUPE_THRESHOLD,
        help="drop video frames closer than this (mean abs difference of 16x16 grey thumbnails, 0..1)",
    )
    src.add_argument(
        "--caption-template",
        default=DEFAULT_TEMPLATE,
        help="caption for images without a .txt, with {token}, e.g. 'a photo of {token} on a table'",
    )
    src.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="horizontal flips of the photos (default off: only for products whose mirror image is the same product)",
    )
    src.add_argument(
        "--no-keep-product",
        dest="keep_product",
        action="store_false",
        help="let random crops cut the product (by default a photo with a mask is never cropped through it)",
    )
    src.add_argument(
        "--max-crop-scale",
        type=float,
        default=MAX_SCALE,
        help=f"random crops take 1/this to all of the shorter side (default {MAX_SCALE}; 1 = no zoom)",
    )
    src.add_argument(
        "--crop-margin",
        type=float,
        default=TrainConfig.crop_margin,
        help="with a product mask: share of the crop's side kept clear around the product, so zoomed views never "
        "show it grazing the frame (default 0.0625: 2 px at 32, 32 px at 512; 0: may touch)",
    )
    src.add_argument(
        "--mask-weight",
        type=float,
        default=TrainConfig.mask_weight,
        help="with a product mask: the loss on the product's pixels counts this many times the background's "
        "(default 1: plain loss; docs/TRAINING.md)",
    )
    src.add_argument(
        "--color-jitter",
        type=float,
        default=TrainConfig.color_jitter,
        help="brightness and contrast factor 1 +- this, the same on every channel, so hues never shift (0: off)",
    )
    src.add_argument(
        "--background-swap",
        type=_swap_share,
        default=TrainConfig.background_swap,
        metavar="auto|SHARE",
        help="share of product views cut out by their mask and put on a random plain or gradient background "
        "(--swap-light, --swap-colour), captioned without the scene. Default auto: 0.3 when no photo shows the "
        "product on a dark background, else 0 (docs/TRAINING.md). Masks: NAME.mask.png beside a photo, the "
        "photo's alpha, or found on a plain light background; photos without one are never swapped",
    )
    src.add_argument(
        "--swap-light",
        type=_light_range,
        default=TrainConfig.swap_light,
        metavar="LO,HI",
        help="brightness range of the swapped backgrounds, 0 black to 1 white (default 0.15,0.4: dark greys)",
    )
    src.add_argument(
        "--swap-colour",
        type=float,
        default=TrainConfig.swap_colour,
        help="saturation of the swapped backgrounds: 1 any colour, 0 greys only (default 0)",
    )
    prior = p.add_argument_group("prior preservation")
    prior.add_argument(
        "--class-prompt",
        dest="class_prompts",
        action="append",
        default=[],
        help="prompt for class images the base model draws (repeatable); default: the caption template with "
        "'a INIT_WORD' for the token, and the empty prompt (add --class-prompt '' to yours)",
    )
    prior.add_argument(
        "--num-class-images", type=int, default=TrainConfig.num_class_images, help="class images (0: no prior loss)"
    )
    prior.add_argument("--prior-weight", type=float, default=TrainConfig.prior_weight, help="weight of the prior loss")
    prior.add_argument("--class-guidance", type=float, default=TrainConfig.class_guidance)
    src.add_argument("--resolution", type=int, help="training size in pixels (default: the base model's own)")

    prod = p.add_argument_group("product")
    prod.add_argument("--token", required=True, help="the product's token(s), e.g. '<my-mug>' or '<s1><s2>'")
    prod.add_argument("--base", required=True, help="base model: a local diffusers folder or a hub id")
    prod.add_argument("--out", required=True, type=Path, help="product folder to write, e.g. products/my-mug")
    prod.add_argument("--display-name", default="", help="name shown to users (default: the folder name)")
    prod.add_argument("--category", default="", help="product category, matched against scene templates")
    prod.add_argument("--description", default="")
    prod.add_argument("--prompt-phrase", default="", help="text standing for the product in prompts (default: token)")
    prod.add_argument("--default-scale", type=float, default=1.0, help="LoRA scale the generator uses by default")
    prod.add_argument("--overwrite", action="store_true", help="replace an existing product folder")

    lora = p.add_argument_group("LoRA")
    lora.add_argument("--rank", type=int, default=4)
    lora.add_argument(
        "--alpha", type=float, help="LoRA alpha (default: rank, i.e. scale 1); folded into the saved file"
    )
    lora.add_argument(
        "--target-modules",
        default=",".join(UNET_TARGETS),
        help="comma-separated UNet module names (default: the attention projections)",
    )
    lora.add_argument(
        "--train-text-encoder",
        action=argparse.BooleanOptionalAction,
        default=TrainConfig.train_text_encoder,
        help="also a LoRA on the text encoder's attention (default: on)",
    )
    lora.add_argument(
        "--learn-token",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="pivotal tuning: learn the token's embedding (default: on when every token is a new <name>)",
    )
    lora.add_argument("--init-word", default="object", help="word the learned token starts from (e.g. mug)")
    lora.add_argument("--token-lr", type=float, help="learning rate of the token embedding (default: --lr)")

    run = p.add_argument_group("run")
    run.add_argument("--steps", type=int, default=TrainConfig.steps)
    run.add_argument("--lr", type=float, default=1e-4)
    run.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--checkpoint-every", type=int, default=0, help="save a resumable checkpoint every N steps")
    run.add_argument("--validate-every", type=int, default=0, help="render a validation image every N steps")
    run.add_argument("--validation-prompt", default="", help="default: the caption template")
    run.add_argument("--validation-steps", type=int, default=20)
    run.add_argument("--resume", nargs="?", const="latest", help="resume from a checkpoint (default: the latest)")
    run.add_argument(
        "--work-dir", type=Path, help="checkpoints, validation images, frames (default .cache/training/ID)"
    )
    run.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1 ...")
    run.add_argument(
        "--mixed-precision",
        choices=("auto", "no", "fp16", "bf16"),
        default="auto",
        help="autocast on CUDA: auto = bf16 where supported, else fp16",
    )
    run.add_argument(
        "--gradient-checkpointing", choices=("auto", "on", "off"), default="auto", help="auto = on with CUDA"
    )
    run.add_argument(
        "--threads", type=int, default=0, help="CPU threads for torch (0: its default; 1 is fastest on a busy machine)"
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = vars(args).copy()
    values["target_modules"] = tuple(m.strip() for m in values["target_modules"].split(",") if m.strip())
    values["class_prompts"] = tuple(values["class_prompts"])
    values["progress"] = not values.pop("quiet")
    return TrainConfig(**values)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(build_parser().parse_args(argv))
    try:
        result = train(cfg)
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing was written to the product folder", file=sys.stderr)
        return 130
    print(
        f"wrote {result.out}: {result.examples} examples, steps {result.resumed_from}->{result.steps}, "
        f"eval loss {result.eval_loss_start:.4f} -> {result.eval_loss_end:.4f}, {result.seconds:.0f}s"
    )
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
