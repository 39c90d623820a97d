"""Generator settings: one object, from flags (`--port 50051`) or env (`PIA_GENERATOR_PORT`)."""

from __future__ import annotations

import os

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings
from services.generator.options import (
    DEFAULT_PIPELINE,
    DTYPES,
    CompileOptions,
    WorkerConfig,
    WorkerPolicy,
    adapter_rank,
    batch_limits,
    parse_devices,
    parse_shapes,
    resolve_mode,
)

# Modules whose pipelines are test stand-ins (testkit/): refused unless this environment variable is 1.
TEST_MODULES = ("testkit.", "tests.")
ALLOW_TEST_PIPELINES = "PIA_ALLOW_TEST_PIPELINES"


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
    # The fast path (services/generator/compiled.py, docs/PERFORMANCE.md)
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
        DEFAULT_PIPELINE,
        description=f"Pipeline factory, module:callable (testkit stand-ins need {ALLOW_TEST_PIPELINES}=1).",
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
        resolve_mode(value, "cpu")  # raises on an unknown mode
        return value

    @field_validator("warm_shapes")
    @classmethod
    def _valid_shapes(cls, value: str) -> str:
        parse_shapes(value)
        return value

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        if value not in DTYPES:
            raise ValueError(f"dtype: {value!r} is not one of {', '.join(DTYPES)}")
        return value

    @field_validator("worker_pipeline")
    @classmethod
    def _production_pipeline(cls, value: str) -> str:
        # Stand-ins inject faults (crash, hang) on request: never reachable in a server nobody marked as a test.
        if value.startswith(TEST_MODULES) and os.environ.get(ALLOW_TEST_PIPELINES) != "1":
            raise ValueError(
                f"worker_pipeline: {value!r} is a test stand-in; only tests and benchmarks may use it "
                f"({ALLOW_TEST_PIPELINES}=1)"
            )
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

    def batch_limits(self, devices: list[str]) -> tuple[int, int]:
        """(images per batch, pixel budget per batch; 0 = none) for these devices."""
        return batch_limits(self.max_batch, self.batch_pixels, devices)

    def compile_options(self, device: str, adapter_files: list[str], auto_batch: int) -> CompileOptions:
        """A worker's CompileOptions: these settings, its device and the adapter files found at start-up."""
        return CompileOptions(
            mode=resolve_mode(self.compile, device),
            vae=self.compile_vae,
            channels_last=self.channels_last,
            sdpa=self.sdpa,
            dtype=self.dtype,
            lora_slots=self.lora_slots,
            target_rank=self.hotswap_rank,
            layout=tuple(sorted(adapter_files)),
            warm_shapes=parse_shapes(self.warm_shapes),
            auto_batch=auto_batch,
            cache_dir=self.compile_cache_dir,
        )

    def worker_configs(self, adapter_files: list[str]) -> list[WorkerConfig]:
        """One config per device; with compile on, the LoRA slots are built over `adapter_files`."""
        devices = parse_devices(self.devices)
        auto_batch, _ = self.batch_limits([d for d, _ in devices])
        return [
            WorkerConfig(
                model=self.model,
                device=device,
                threads=self.cpu_threads if self.cpu_threads and device.startswith("cpu") else threads,
                adapter_cache_size=self.adapter_cache_size,
                hotswap_rank=self.hotswap_rank,
                log_level=self.log_level,
                pipeline=self.worker_pipeline,
                compile=self.compile_options(device, adapter_files, auto_batch),
            )
            for device, threads in devices
        ]

    def slot_rank(self, adapter_files: list[str]) -> int:
        """The rank adapters must not exceed: --hotswap-rank, or with compile on the largest found now; 0: none."""
        if self.hotswap_rank:
            return self.hotswap_rank
        if all(resolve_mode(self.compile, device) == "off" for device, _ in parse_devices(self.devices)):
            return 0
        return max((adapter_rank(f) for f in adapter_files), default=0)
