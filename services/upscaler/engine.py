"""Swin2SR on one device: load, warm up, upscale a PIL image tile by tile.

Everything here runs on the device's worker thread (see runner.py); nothing touches the event loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from services.upscaler.images import restore_alpha
from services.upscaler.tiling import plan_tiles, upscale_tiled

if TYPE_CHECKING:
    from transformers import Swin2SRForImageSuperResolution

log = logging.getLogger(__name__)


class Engine(Protocol):
    """What the runner needs of a model. Tests and benchmarks swap in stand-ins (settings.engine)."""

    scale: int
    align: int
    device_name: str
    model_name: str

    def load(self) -> None: ...

    def run_tile(self, tile: torch.Tensor) -> torch.Tensor: ...


def resolve_device(spec: str) -> str:
    """'auto' -> 'cuda:0' when CUDA is present, else 'cpu'; 'cpu' and 'cuda:N' are checked."""
    spec = spec.strip().lower()
    if spec == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return spec
    if spec.startswith("cuda:") and spec[5:].isdigit():
        if not torch.cuda.is_available() or int(spec[5:]) >= torch.cuda.device_count():
            raise ValueError(f"device: {spec!r} is not available on this machine")
        return spec
    raise ValueError(f"device: {spec!r} is not auto, cpu or cuda:N")


class Swin2SREngine:
    """transformers' Swin2SRForImageSuperResolution, fp16 on CUDA and fp32 on CPU."""

    def __init__(
        self,
        model: str,
        device: str = "auto",
        threads: int = 0,
        dtype: str = "auto",
        channels_last: bool = False,
        compile: str = "off",
    ):
        self.model_name = model
        self.device_name = resolve_device(device)
        self.threads = threads
        # Switches measured by benchmarks/upscaler.py (docs/PERFORMANCE.md); the defaults are what the service runs.
        self.dtype_name = dtype
        self.channels_last = channels_last
        self.compile_mode = compile
        self.scale = 0
        self.align = 8
        self.model: Swin2SRForImageSuperResolution | None = None

    def load(self) -> None:
        # transformers takes seconds to import, and stand-in engines (tests, benchmarks) never need it.
        from transformers import Swin2SRForImageSuperResolution
        from transformers.utils import logging as hf_logging  # as above: only when a Swin2SR loads

        hf_logging.disable_progress_bar()
        if self.threads and self.device_name == "cpu":
            torch.set_num_threads(self.threads)
        device = torch.device(self.device_name)
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(
            self.dtype_name, torch.float16 if device.type == "cuda" else torch.float32
        )
        local = Path(self.model_name).is_dir()
        started = time.perf_counter()
        try:
            model = Swin2SRForImageSuperResolution.from_pretrained(self.model_name, dtype=dtype, local_files_only=local)
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"cannot load a Swin2SR from {self.model_name!r} (a folder or a hub id): {exc}") from exc
        # Moved through its nn.Module face (the same object): transformers' @wraps'd `to` hides `self` from mypy.
        module: torch.nn.Module = model
        module.to(device).eval()
        if self.channels_last:
            module.to(memory_format=torch.channels_last)
        self.model = model
        if self.compile_mode != "off":
            # Tiles vary in size at the image's edges: dynamic shapes, so each edge tile does not recompile.
            self.model.compile(mode=None if self.compile_mode == "default" else self.compile_mode, dynamic=True)
        self.scale = int(model.config.upscale)
        processor = _load_processor(self.model_name, local)
        # Pad to a multiple of both the attention window and the processor's divisor (both 8 upstream).
        divisor = int(getattr(processor, "size_divisor", None) or getattr(processor, "pad_size", None) or 8)
        self.align = int(np.lcm(int(model.config.window_size), divisor))
        log.info(
            "loaded %s (x%d, window %d, %s) in %.1fs",
            self.model_name,
            self.scale,
            self.align,
            dtype,
            time.perf_counter() - started,
        )

    @torch.inference_mode()
    def run_tile(self, tile: torch.Tensor) -> torch.Tensor:
        """(1, 3, h, w) float in [0, 1] on the CPU -> (1, 3, h*s, w*s) float32 on the CPU.

        Pads to the window multiple (reflect, or replicate when the tile is too small to reflect)
        and crops back: Swin2SR cannot take other sizes.
        """
        assert self.model is not None, "load() first"
        h, w = tile.shape[-2:]
        pad_h, pad_w = (-h) % self.align, (-w) % self.align
        x = tile.to(self.model.device, self.model.dtype)
        if pad_h or pad_w:
            mode = "reflect" if pad_h < h and pad_w < w else "replicate"
            x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
        out = self.model(pixel_values=x).reconstruction
        return out[:, :, : h * self.scale, : w * self.scale].clamp_(0, 1).float().cpu()


def _load_processor(model: str, local: bool):
    """The checkpoint's Swin2SR processor config (only its pad divisor is used), or None.

    Always the PIL variant: it reads the same config, and the torchvision one would warn about its
    fallback on machines without torchvision (ours: it does not import beside this torch).
    """
    from transformers import Swin2SRImageProcessorPil as Processor  # slow to import: only when a Swin2SR loads

    try:
        return Processor.from_pretrained(model, local_files_only=local)
    except OSError:
        log.warning("%s has no preprocessor_config.json; using Swin2SR defaults", model)
        return None


def upscale_image(
    engine: Engine,
    image: Image.Image,
    tile_size: int,
    overlap: int,
    on_tile: Callable[[int, int], object] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Image.Image:
    """RGB or RGBA in, the same mode out, `engine.scale` times larger.

    Alpha does not go through the model (it was trained on RGB): it is upscaled with bicubic
    and put back, so transparent product cut-outs stay transparent.
    """
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0)
    plan = plan_tiles(image.height, image.width, tile_size, overlap, engine.align)
    out = upscale_tiled(tensor, engine.run_tile, engine.scale, plan, on_tile, should_stop)
    pixels = (out[0].permute(1, 2, 0).clamp_(0, 1) * 255).round_().to(torch.uint8).numpy()
    return restore_alpha(Image.fromarray(pixels, "RGB"), image)


def warm_up(engine: Engine) -> float:
    """One small tile through the model, so the first request does not pay for lazy init."""
    started = time.perf_counter()
    size = 2 * engine.align
    out = engine.run_tile(torch.rand(1, 3, size, size))
    if out.shape[-2:] != (size * engine.scale, size * engine.scale):
        raise RuntimeError(f"warm-up returned {tuple(out.shape)} for a {size}x{size} tile")
    return time.perf_counter() - started
