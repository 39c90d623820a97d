"""Generator settings: one object, from flags (`--port 50051`) or env (`PIA_GENERATOR_PORT`)."""

from __future__ import annotations

import os

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings
from services.generator.scheduler import WorkerPolicy


class GeneratorSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="PIA_GENERATOR_", cli_prog_name="python -m services.generator")

    port: int = Field(50051, description="gRPC port.")
    model: str = Field("models/demo-sd", description="Base model: a local diffusers folder or a hub id.")
    products_dir: str = Field("products", description="Folder of product folders (manifest.yaml + LoRA).")
    adapters_dir: str = Field("adapters", description="Folder of style/background adapter folders.")
    templates_file: str = Field("templates/catalog.yaml", description="Scene template catalog (YAML).")
    devices: str = Field(
        "auto", description="'auto' (every CUDA device, else the CPU), 'cuda:0,cuda:1', or 'cpu:N' (N CPU workers)."
    )
    cpu_threads: int = Field(0, description="Torch threads per CPU worker (0: an equal share of the cores).")
    max_images: int = Field(16, description="Upper bound of num_images per request.")
    max_batch: int = Field(
        0,
        ge=0,
        description="Images of one request a device may render as one batch (0: auto, 4 on CUDA and 1 on CPU).",
    )
    batch_pixels: int = Field(
        2 * 768 * 768, ge=0, description="Upper bound of width*height*images in one auto-sized batch."
    )
    adapter_cache_size: int = Field(8, description="LoRA adapters each worker keeps loaded (LRU).")
    scene_only_styles: bool = Field(
        True,
        description="Style/background adapters stacked on a product act on the scene, not on the product "
        "(three UNet evaluations per step for such requests; off: plain stacking).",
    )
    hotswap_rank: int = Field(
        0,
        description="Enable diffusers LoRA hot-swap, padding ranks to this (0: off; must cover every adapter). "
        "With compile on, the slots' rank (0: the largest rank among the adapters found at start-up).",
    )
    # The fast path (services/generator/compile.py, docs/PERFORMANCE.md)
    compile: str = Field(
        "auto",
        description="torch.compile the UNet: auto (reduce-overhead on CUDA, off on CPU), off, default, "
        "reduce-overhead, max-autotune, max-autotune-no-cudagraphs.",
    )
    compile_vae: bool = Field(False, description="Also compile the VAE decoder (with --compile on).")
    compile_cache_dir: str = Field(
        "", description="Inductor/triton cache folder kept across restarts and replicas (a volume; '': torch's own)."
    )
    warm_shapes: str = Field(
        "auto",
        description="WIDTHxHEIGHTxBATCH shapes each worker compiles before serving, e.g. 512x512x1,512x512x4 "
        "(auto: the model's size at batch 1 and at the auto batch size).",
    )
    lora_slots: int = Field(
        2, ge=1, description="With compile on: LoRA slots always active (adapters one request may stack)."
    )
    channels_last: bool = Field(False, description="channels_last memory format for the UNet and VAE.")
    sdpa: bool = Field(True, description="PyTorch scaled-dot-product attention (off: diffusers' classic attention).")
    dtype: str = Field("auto", description="Weights' dtype: auto (fp16 on CUDA, fp32 on CPU), fp16, bf16, fp32.")
    default_steps: int = Field(25, description="Steps when a request gives none.")
    max_steps: int = Field(150, description="Upper bound of steps.")
    default_guidance: float = Field(7.0, description="Guidance scale when a request gives none.")
    default_size: int = Field(0, description="Width/height when a request gives none (0: the model's own).")
    max_pixels: int = Field(1536 * 1536, description="Upper bound of width*height.")
    max_product_bytes: int = Field(
        12 * 1024 * 1024,
        description="Largest product image plus its mask (placement mode), in bytes; below max_request_bytes.",
    )
    max_product_pixels: int = Field(
        4096 * 4096, description="Largest product image (placement mode) in pixels, checked before decoding."
    )
    start_timeout_s: float = Field(900.0, description="How long workers may take to load and warm up.")
    worker_pipeline: str = Field(
        "services.generator.pipeline:ProductPipeline", description="Pipeline factory (stand-ins for tests)."
    )

    # Reliability (docs/RELIABILITY.md)
    max_request_bytes: int = Field(
        16 * 1024 * 1024,
        ge=64 * 1024,
        description="Largest request accepted, in bytes: a few KB, plus the product image in placement mode.",
    )
    stall_timeout_s: float = Field(
        60.0, gt=0, description="A stream whose client reads nothing for this long is closed (images stay stored)."
    )
    max_buffered_progress: int = Field(
        32, ge=1, description="Unsent progress events kept per stream; older ones are dropped (images never are)."
    )
    respawn_backoff_s: float = Field(
        1.0, ge=0, description="A worker that dies is respawned at once, then after this, doubling each time."
    )
    respawn_backoff_max_s: float = Field(30.0, ge=0, description="Longest wait before respawning a worker.")
    healthy_reset_s: float = Field(60.0, ge=0, description="A worker ready this long has its backoff reset.")
    max_start_failures: int = Field(
        5, ge=1, description="Deaths while starting, in a row, after which a worker is given up (none left: exit 1)."
    )
    watchdog_factor: float = Field(
        10.0, gt=1, description="A job running this many times its expected time has its worker killed and respawned."
    )
    watchdog_min_s: float = Field(60.0, gt=0, description="The hang watchdog never acts on a job younger than this.")

    @field_validator("compile")
    @classmethod
    def _known_compile_mode(cls, value: str) -> str:
        from services.generator.compile import resolve_mode

        resolve_mode(value, "cpu")  # raises on an unknown mode
        return value

    @field_validator("warm_shapes")
    @classmethod
    def _valid_shapes(cls, value: str) -> str:
        from services.generator.compile import parse_shapes

        parse_shapes(value)
        return value

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        from services.generator.compile import DTYPES

        if value not in DTYPES:
            raise ValueError(f"dtype: {value!r} is not one of {', '.join(DTYPES)}")
        return value

    def worker_policy(self) -> WorkerPolicy:
        return WorkerPolicy(
            backoff_s=self.respawn_backoff_s,
            backoff_max_s=self.respawn_backoff_max_s,
            healthy_s=self.healthy_reset_s,
            max_start_failures=self.max_start_failures,
            watchdog_factor=self.watchdog_factor,
            watchdog_min_s=self.watchdog_min_s,
        )


def parse_devices(spec: str) -> list[tuple[str, int]]:
    """Device names with their CPU thread share: [("cuda:0", 0), ...] or [("cpu:0", 1), ("cpu:1", 1)]."""
    spec = spec.strip()
    cores = os.cpu_count() or 1
    if spec == "auto":
        count = _cuda_count()
        return [(f"cuda:{i}", 0) for i in range(count)] if count else [("cpu:0", 0)]
    if spec == "cpu" or (spec.startswith("cpu:") and "," not in spec):
        n = int(spec.partition(":")[2] or 1)
        if n < 1:
            raise ValueError(f"devices: {spec!r} asks for no workers")
        return [(f"cpu:{i}", max(1, cores // n)) for i in range(n)]
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    for d in devices:
        if not (d.startswith("cuda:") and d[5:].isdigit()):
            raise ValueError(f"devices: {d!r} is not cuda:N (or use 'auto' / 'cpu:N')")
    if len(set(devices)) != len(devices):
        raise ValueError(f"devices: {spec!r} repeats a device")
    return [(d, 0) for d in devices]


# On an H200 (SD 1.5 size, eager PyTorch) a batch of 4 at 512² takes about as long as one image, and
# 2 at 768² 16% longer: the pixel budget sits at that knee. On a CPU batching delays the first image
# 2.5x for 1.55x throughput, so no batching there (docs/PERFORMANCE.md).
CUDA_AUTO_BATCH = 4


def batch_limits(settings: GeneratorSettings, devices: list[str]) -> tuple[int, int]:
    """(images per batch, pixel budget per batch; 0 = none) for these devices."""
    if settings.max_batch:
        return settings.max_batch, 0
    if devices and all(d.startswith("cuda") for d in devices):
        return CUDA_AUTO_BATCH, settings.batch_pixels
    return 1, 0


def _cuda_count() -> int:
    # NVML-based count: the parent must not create a CUDA context before workers are spawned.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0
