"""The diffusers side of a worker: load the base model once, keep product adapters in an LRU
cache of PEFT slots, and render jobs with per-image seeds.

Runs only inside worker processes (it imports torch).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoPipelineForInpainting, AutoPipelineForText2Image
from diffusers.utils import logging as diffusers_logging
from PIL import Image

from services.generator import placement, regional
from services.generator.adapter_cache import AdapterCache
from services.generator.compiled import Accelerator
from services.generator.interfaces import AdapterSet, InvalidJob, JobCancelled, StepHook
from services.generator.messages import SCHEDULERS, RenderSettings
from services.generator.options import CompileOptions, WorkerConfig

log = logging.getLogger(__name__)


# SD latent -> RGB linear map: a cheap preview without decoding (same idea as A1111's "approx").
LATENT_RGB_FACTORS = torch.tensor(
    [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]]
)


def resolve_device(device: str) -> tuple[torch.device, torch.dtype]:
    """`cuda:N` -> fp16 on that GPU; `cpu` or `cpu:N` -> fp32 on the CPU."""
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
        return torch.device(device), torch.float16
    return torch.device("cpu"), torch.float32


def load_text2image(model: str, device: torch.device, dtype: torch.dtype) -> Any:
    """AutoPipelineForText2Image from a local folder or a hub id (SD 1.5, 2.1 and SDXL)."""
    diffusers_logging.disable_progress_bar()
    local = Path(model).expanduser().is_dir()
    kwargs: dict = {"dtype": dtype}
    if local:
        kwargs["local_files_only"] = True
    if dtype == torch.float16 and not local:
        kwargs["variant"] = "fp16"
    try:
        pipe = AutoPipelineForText2Image.from_pretrained(str(model), safety_checker=None, **kwargs)
    except (OSError, ValueError) as exc:
        if "variant" not in kwargs:
            raise
        log.info("no fp16 variant of %s (%s); loading the default weights", model, exc)
        kwargs.pop("variant")
        pipe = AutoPipelineForText2Image.from_pretrained(str(model), safety_checker=None, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def inpainting_from(pipe: Any) -> Any:
    """Inpainting on the loaded text-to-image weights (`from_pipe`: the same modules, no second copy)."""
    inpaint = AutoPipelineForInpainting.from_pipe(pipe)
    inpaint.set_progress_bar_config(disable=True)
    return inpaint


def text2image_from(pipe: Any) -> Any:
    """Another text-to-image pipeline object over the same modules (like `inpainting_from`)."""
    # AutoPipeline's from_pipe, not the pipeline class's: the latter casts the shared modules to its dtype.
    view = AutoPipelineForText2Image.from_pipe(pipe)
    view.set_progress_bar_config(disable=True)
    return view


def latents_to_rgb(latents: torch.Tensor) -> torch.Tensor:
    """Linear latent->RGB approximation, on the latents' own device: uint8 (B, H, W, 3)."""
    lat = latents.detach().float()
    if lat.shape[1] == 4:
        rgb = torch.einsum("bchw,cr->bhwr", lat, LATENT_RGB_FACTORS.to(lat.device))
    else:
        rgb = lat.mean(1, keepdim=True).permute(0, 2, 3, 1).repeat(1, 1, 1, 3)
    return ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8)


class PreviewFrames:
    """One step's previews on their way to the host.

    On CUDA the copy is queued behind the step's kernels and only `images()` waits for it, so the
    denoising loop never stalls for a preview; the worker turns frames into PNGs on another thread.
    """

    def __init__(self, rgb: torch.Tensor):
        self._ready = None
        if rgb.device.type == "cuda":
            self._host = torch.empty(rgb.shape, dtype=torch.uint8, pin_memory=True)  # cached by torch
            self._host.copy_(rgb, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = rgb

    def __len__(self) -> int:
        return self._host.shape[0]

    def images(self) -> list[Image.Image]:
        if self._ready is not None:
            self._ready.synchronize()
        return [Image.fromarray(x) for x in self._host.numpy()]


def latents_to_preview(latents: torch.Tensor) -> list[Image.Image]:
    """Preview images of `latents`, about free next to a VAE decode."""
    return PreviewFrames(latents_to_rgb(latents)).images()


def load(config: WorkerConfig) -> ProductPipeline:
    """The worker's pipeline factory (`interfaces.PipelineFactory`, the default `--worker-pipeline`)."""
    return ProductPipeline(
        config.model, config.device, config.adapter_cache_size, config.hotswap_rank, compile=config.compile
    )


class ProductPipeline:
    """Text-to-image with stacked product/style LoRAs. One instance per worker (an `interfaces.Pipeline`)."""

    def __init__(
        self,
        model: str,
        device: str,
        adapter_cache_size: int = 8,
        hotswap_rank: int = 0,
        compile: CompileOptions | None = None,
    ):
        self.device_name = device
        self.device, self.dtype = resolve_device(device)
        # The fast path's switches (services/generator/compiled.py): dtype, SDPA, channels_last, torch.compile.
        self.accel = Accelerator(compile)
        if compile is not None:
            self.dtype = self.accel.dtype(self.device.type)
        started = time.perf_counter()
        self.pipe = load_text2image(model, self.device, self.dtype)
        compiled_adapters = self.accel.setup(self.pipe, adapter_cache_size)
        self.inpaint = inpainting_from(self.pipe)
        # A trained inpainting UNet (9 input channels) reads the mask itself; 4-channel ones inpaint by latent blend.
        self.inpaint_unet_masked = self.pipe.unet.config.in_channels == 9
        # Second pipeline objects over the same modules, whose `unet` one job may wrap (regional.py)
        self.views = {id(self.pipe): text2image_from(self.pipe), id(self.inpaint): inpainting_from(self.pipe)}
        self.load_seconds = time.perf_counter() - started
        self.base_scheduler_config = self.pipe.scheduler.config
        self.adapters: AdapterSet = compiled_adapters or AdapterCache(self.pipe, adapter_cache_size, hotswap_rank)
        self._default_scheduler = type(self.pipe.scheduler)
        self.size_multiple = self.pipe.vae_scale_factor
        self.default_size = int(self.pipe.unet.config.sample_size) * self.size_multiple

    def check_inputs(self, settings: RenderSettings, batch: int) -> None:
        scale = self.pipe.vae_scale_factor
        for name in ("width", "height"):
            value = getattr(settings, name)
            if value % scale:
                raise InvalidJob(name, f"{value} is not a multiple of {scale} for this model")
        placed = settings.placement
        if placed is not None and (placed.width, placed.height) != (settings.width, settings.height):
            raise InvalidJob("product_image", "the product frame's size differs from the image size")
        if settings.scheduler and settings.scheduler not in SCHEDULERS:
            raise InvalidJob("scheduler", f"unknown {settings.scheduler!r}")
        if batch < 1:
            raise InvalidJob("num_images", "empty batch")

    def make_scheduler(self, name: str) -> Any:
        # A fresh scheduler per job: schedulers hold per-run state.
        if not name:
            return self._default_scheduler.from_config(self.base_scheduler_config)
        cls_name, extra = SCHEDULERS[name]
        return getattr(diffusers, cls_name).from_config(self.base_scheduler_config, **extra)

    @torch.inference_mode()
    def __call__(
        self,
        settings: RenderSettings,
        seeds: tuple[int, ...],
        on_step: StepHook | None = None,
        preview_every: int = 0,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> list[Image.Image]:
        # 1. Check inputs
        self.check_inputs(settings, len(seeds))

        # 2. Activate exactly this job's adapters, from the cache when possible. Placement mode asks for the
        # scene only: the product is already in the picture (placement.scene_adapters).
        placed = settings.placement
        scene_only = placed is not None and bool(settings.scene_prompt)
        self.adapters.activate(placement.scene_adapters(settings.adapters) if scene_only else settings.adapters)

        # 3. Prompt embeddings, with each stacked adapter's words read by its own text-encoder LoRA
        prompt = ({} if scene_only else self.encode_prompt(settings)) or {
            "prompt": settings.scene_prompt if scene_only else settings.prompt,
            "negative_prompt": settings.negative_prompt or None,
        }

        # 4. Fresh scheduler; one generator per image so results do not depend on batching
        scheduler = self.make_scheduler(settings.scheduler)
        for pipe in (self.pipe, self.inpaint, *self.views.values()):
            pipe.scheduler = scheduler
        gen_device = "cpu" if self.device.type != "cuda" else self.device
        generators = [torch.Generator(gen_device).manual_seed(int(s)) for s in seeds]

        # 5. Step hook: progress, previews and cancellation, outside the denoising loop itself
        # Latent-blend inpainting (a 4-channel UNet) holds the product's latents from `join` on; before it the
        # blend mask is all ones, so the scene is drawn without the product first (placement.join_step).
        join = 0
        if placed is not None and not self.inpaint_unet_masked:
            join = placement.join_step(settings.steps, placed.scene_first)
        joins_part_way = 0 < join < settings.steps  # else from the first step, or never (an all-white mask)
        held_mask: list = []

        def callback(pipe, step: int, timestep, kwargs: dict) -> dict:
            if should_stop():
                raise JobCancelled()
            if joins_part_way and step == 0:
                held_mask.append(kwargs["mask"])
                kwargs["mask"] = torch.ones_like(held_mask[0])
            if joins_part_way and step == join - 1:
                kwargs["mask"] = held_mask[0]
            if on_step is not None:
                done = step + 1
                want_preview = preview_every > 0 and (done % preview_every == 0 or done == settings.steps)
                frames = PreviewFrames(latents_to_rgb(kwargs["latents"])) if want_preview else None
                on_step(done, settings.steps, frames)
            return kwargs

        # 6. Denoise and decode; placement mode inpaints around the product, then composites it back
        extra = {}
        if placed is not None:
            extra = {
                "image": placement.init_image(placed),
                "mask_image": placement.repaint_mask(placed, everything=join >= settings.steps),
                "strength": 1.0,
            }
        pipe = self.inpaint if placed is not None else self.pipe
        cfg = settings.guidance_scale > 1
        guard: AbstractContextManager[None] = nullcontext()
        if not scene_only and settings.scene_only_styles and regional.applies(settings.adapters):
            # A second pipeline object over the same modules: its `unet` can be wrapped for this job while the
            # adapter cache keeps switching weights through the real one.
            pipe = self.views[id(pipe)]
            guard = regional.scene_only_styles(
                pipe, self.adapters.unet_switcher(settings.adapters), settings.adapters, cfg
            )
        with self.accel.watch(settings.width, settings.height, len(seeds), cfg), guard:
            out = pipe(
                **prompt,
                num_images_per_prompt=len(seeds),
                num_inference_steps=settings.steps,
                guidance_scale=settings.guidance_scale,
                width=settings.width,
                height=settings.height,
                generator=generators,
                callback_on_step_end=callback,
                callback_on_step_end_tensor_inputs=["latents", "mask"] if joins_part_way else ["latents"],
                **extra,
            )
        if placed is not None:
            return [placement.composite(image, placed) for image in out.images]
        return list(out.images)

    def encode_prompt(self, settings: RenderSettings) -> dict:
        """Prompt embeddings where a product adapter is stacked with style/background adapters, else {}.

        A product's text-encoder LoRA was trained on its own captions; left on, it also re-reads the words
        a stacked style adds ("at night") and the end-of-prompt states that summarise the prompt, and
        weakens the style (docs/FIDELITY.md, night). So the states from the first stacked phrase to the
        end come from a second text-encoder pass with the product at weight 0; the product's token and
        the scene before it keep the product's LoRA. The negative prompt is encoded as usual.
        SD 1.x/2.x only for now: SDXL's two text encoders and pooled embeddings are left to diffusers."""
        product, stacked = (settings.adapters or (None,))[0], settings.adapters[1:]
        if product is None or product.kind != "product" or product.weight == 0 or not stacked:
            return {}
        if getattr(self.pipe, "text_encoder_2", None) is not None:
            return {}
        start = first_phrase_position(self.pipe.tokenizer, settings.prompt, [p for a in stacked for p in a.phrases])
        if start is None:
            return {}
        cfg = settings.guidance_scale > 1
        negative = settings.negative_prompt or None
        with_product, negative_embeds = self.pipe.encode_prompt(settings.prompt, self.device, 1, cfg, negative)
        self.adapters.activate((replace(product, weight=0.0), *stacked))
        without_product, _ = self.pipe.encode_prompt(settings.prompt, self.device, 1, False)
        self.adapters.activate(settings.adapters)
        embeds = with_product.clone()
        embeds[:, start:] = without_product[:, start:]
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative_embeds}

    def warmup(self, size: int = 64) -> float:
        if self.accel.options.enabled:  # compiles every configured shape before the worker reports Ready
            return self.accel.warm_up(self)
        started = time.perf_counter()
        size = min(size, self.default_size)
        settings = RenderSettings("warm-up", "", 2, 1.0, size, size, "", ())
        self(settings, (0,))
        return time.perf_counter() - started


def first_phrase_position(tokenizer, prompt: str, phrases: list[str]) -> int | None:
    """Token index (BOS counted, as the text encoder sees it) where the earliest of `phrases` starts in
    `prompt`, using each phrase's last occurrence; None when none survives truncation."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    found = []
    for phrase in phrases:
        sub = tokenizer(phrase, add_special_tokens=False).input_ids
        starts = [i for i in range(len(ids) - len(sub), 0, -1) if sub and ids[i : i + len(sub)] == sub]
        if starts:
            found.append(starts[0])
    return min(found, default=None)
