"""The fast path, worker side: dtype, attention kernels, memory layout, `torch.compile`, warm-up, compile cache.

With `--compile` on, the UNet (and with `--compile-vae` the VAE decoder) runs under `torch.compile`. What
keeps one compiled graph valid for every product is the LoRA slots (lora_slots.py): created once before
compiling, switched by in-place hot-swap. The text encoder is not compiled.

Warm-up compiles each configured (width, height, batch) shape before the worker reports Ready, so health
stays NOT_SERVING until then; a request for any other shape still renders, after a compile that is logged.
The inductor cache lives in `--compile-cache-dir` (a volume), so a restart or a second replica reuses it.

The parent's side (the options, torch-free) is options.py.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from services.generator.interfaces import AdapterSet
from services.generator.lora_slots import LoraSlotAdapters
from services.generator.messages import RenderSettings
from services.generator.options import DTYPES, CompileOptions

if TYPE_CHECKING:
    from services.generator.pipeline import ProductPipeline

log = logging.getLogger(__name__)


def torch_dtype(name: str, device_type: str) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device_type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype: {name!r} is not one of {', '.join(DTYPES)}")
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def use_cache_dir(path: str) -> None:
    """Point inductor (and triton) at a persistent folder; must run before the first compile."""
    if not path:
        return
    root = Path(path).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(root / "triton")


def compile_counters() -> dict[str, int]:
    """Dynamo/inductor counters that tell a compile, a recompile and a cache hit apart."""
    from torch._dynamo.utils import counters  # private module: imported only when asked

    return {
        "graphs": int(counters["stats"]["unique_graphs"]),
        "frames_ok": int(counters["frames"]["ok"]),
        "recompiles": int(sum(counters["recompiles"].values())) if "recompiles" in counters else 0,
        "fxgraph_cache_hit": int(counters["inductor"]["fxgraph_cache_hit"]),
        "fxgraph_cache_miss": int(counters["inductor"]["fxgraph_cache_miss"]),
    }


def set_kernels_and_layout(pipe: Any, options: CompileOptions) -> None:
    """Attention kernels and memory layout; before adapters are loaded and before compiling."""
    # diffusers picks SDPA by default on torch 2; set it (or the classic path) explicitly so the benchmark's
    # on/off is real.
    processor = AttnProcessor2_0 if options.sdpa else AttnProcessor
    pipe.unet.set_attn_processor(processor())
    pipe.vae.set_attn_processor(processor())
    if options.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)


def compile_modules(pipe: Any, options: CompileOptions) -> None:
    """torch.compile the UNet (and the VAE decoder) in place: module names, and so LoRA keys, stay as they are."""
    dynamo = torch._dynamo.config
    # One graph per served shape (dynamic=False: specialised kernels, one CUDA graph each); allow many.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo, name):
            setattr(dynamo, name, max(64, getattr(dynamo, name)))
    kwargs: dict[str, Any] = {"mode": None if options.mode == "default" else options.mode, "dynamic": False}
    pipe.unet.compile(**kwargs)
    if options.vae:
        pipe.vae.decoder.compile(**kwargs)


class Accelerator:
    """The hooks ProductPipeline calls: dtype, preparation, adapter cache, compile, warm-up, cold-shape log."""

    def __init__(self, options: CompileOptions | None = None):
        options = options or CompileOptions()
        self.options = options
        self.warmed: set[tuple[int, int, int, bool]] = set()
        self.warming = False
        self.compile_seconds = 0.0
        if options.enabled:
            use_cache_dir(options.cache_dir)

    def dtype(self, device_type: str) -> torch.dtype:
        return torch_dtype(self.options.dtype, device_type)

    def setup(self, pipe: Any, adapter_cache_size: int) -> AdapterSet | None:
        """Prepare and compile `pipe`; return its adapter set when compiled (None: the eager AdapterCache)."""
        set_kernels_and_layout(pipe, self.options)
        if not self.options.enabled:
            return None
        adapters = LoraSlotAdapters(pipe, adapter_cache_size, self.options)
        compile_modules(pipe, self.options)
        return adapters

    @contextmanager
    def watch(self, width: int, height: int, batch: int, cfg: bool) -> Iterator[None]:
        """Log the compile a request causes (a shape that was not warmed up)."""
        if not self.options.enabled:
            yield
            return
        before = compile_counters()["graphs"]
        started = time.perf_counter()
        yield
        compiled = compile_counters()["graphs"] - before
        shape = (width, height, batch, cfg)
        if compiled and not self.warming:
            log.warning(
                "cold shape %dx%dx%d%s: this request compiled %d graph(s), %.1fs in all; add it to --warm-shapes",
                width,
                height,
                batch,
                "" if cfg else " (no CFG)",
                compiled,
                time.perf_counter() - started,
            )
        self.warmed.add(shape)

    def warm_up(self, pipeline: ProductPipeline, steps: int = 3) -> float:
        """Render each warm shape once (a compile per shape); returns the seconds it took."""
        shapes = self.options.warm_shapes or tuple(
            (pipeline.default_size, pipeline.default_size, b) for b in sorted({1, self.options.auto_batch})
        )
        started = time.perf_counter()
        self.warming = True
        try:
            for width, height, batch in shapes:
                begun = time.perf_counter()
                # Guidance > 1, as served: classifier-free guidance doubles the UNet's batch.
                settings = RenderSettings("warm-up", "", steps, 7.0, width, height, "", ())
                pipeline(settings, tuple(range(batch)))
                log.info("warmed %dx%dx%d in %.1fs", width, height, batch, time.perf_counter() - begun)
        finally:
            self.warming = False
        self.compile_seconds = time.perf_counter() - started
        return self.compile_seconds
