"""What the parent decides for its workers, torch-free: devices, batch limits, the fast path's options,
the worker policy and each worker's config. The parent imports this; workers receive its dataclasses.

Nothing here imports torch (but `cuda_count`, which asks NVML, not CUDA), so the parent never creates a
CUDA context before its workers are spawned.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Provisional: the H200 probe (docs/PERFORMANCE.md) measured reduce-overhead at 0.32 s for batch 1 against
# 1.30 s eager; the other modes are still to be measured (benchmarks/gpu_session.sh).
AUTO_CUDA_MODE = "reduce-overhead"
DTYPES = ("auto", "fp16", "bf16", "fp32")
Shape = tuple[int, int, int]  # width, height, batch

# On an H200 (SD 1.5 size, eager PyTorch) a batch of 4 at 512² takes about as long as one image, and
# 2 at 768² 16% longer: the pixel budget sits at that knee. On a CPU batching delays the first image
# 2.5x for 1.55x throughput, so no batching there (docs/PERFORMANCE.md).
CUDA_AUTO_BATCH = 4

DEFAULT_PIPELINE = "services.generator.pipeline:load"


@dataclass(frozen=True)
class CompileOptions:
    """How a worker's pipeline runs (services/generator/compiled.py); `mode` is resolved (never "auto")."""

    mode: str = "off"
    vae: bool = False
    channels_last: bool = False
    sdpa: bool = True
    dtype: str = "auto"
    lora_slots: int = 2
    target_rank: int = 0
    # Adapter files whose UNet layers the LoRA slots must cover (the catalog at start-up).
    layout: tuple[str, ...] = ()
    # () = the model's own size at batch 1 and at `auto_batch`.
    warm_shapes: tuple[Shape, ...] = ()
    auto_batch: int = 1
    cache_dir: str = ""

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


@dataclass(frozen=True)
class WorkerPolicy:
    """How dead and hung workers are handled (services/generator/workers.py)."""

    backoff_s: float = 1.0  # before the 2nd respawn in a row (the 1st is immediate); doubles
    backoff_max_s: float = 30.0
    healthy_s: float = 60.0  # ready this long: the backoff starts over
    max_start_failures: int = 5  # deaths before Ready, in a row, after which a worker is given up
    watchdog_factor: float = 10.0  # a job may run this many times its expected time
    watchdog_min_s: float = 60.0  # ... and at least this long (adapter loads, first-call overheads)


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker process needs to start: sent to it once, at spawn."""

    model: str
    device: str
    threads: int = 0
    adapter_cache_size: int = 8
    hotswap_rank: int = 0
    warmup_size: int = 64
    log_level: str = "INFO"
    # "module:callable" taking this config and returning the pipeline (interfaces.PipelineFactory).
    pipeline: str = DEFAULT_PIPELINE
    # The fast path (dtype, SDPA, channels_last, torch.compile, warm shapes); None: the pipeline's defaults.
    compile: CompileOptions | None = None

    @property
    def max_adapters(self) -> int:
        """Adapters one job may activate at once: the compiled LoRA slots, else the eager cache's slots."""
        if self.compile is not None and self.compile.enabled:
            return self.compile.lora_slots
        return self.adapter_cache_size


def resolve_mode(setting: str, device: str) -> str:
    """ "auto" -> AUTO_CUDA_MODE on CUDA, "off" elsewhere; any other value must be one of MODES."""
    if setting == "auto":
        return AUTO_CUDA_MODE if device.startswith("cuda") else "off"
    if setting not in MODES:
        raise ValueError(f"compile: {setting!r} is not one of auto, {', '.join(MODES)}")
    return setting


def parse_shapes(spec: str) -> tuple[Shape, ...]:
    """ "512x512x1,512x512x4" -> ((512, 512, 1), (512, 512, 4)); "" or "auto" -> ()."""
    spec = spec.strip()
    if spec in ("", "auto"):
        return ()
    shapes = []
    for item in spec.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"warm_shapes: {item.strip()!r} is not WIDTHxHEIGHTxBATCH (e.g. 512x512x4)")
        shapes.append((int(parts[0]), int(parts[1]), int(parts[2])))
    return tuple(shapes)


def parse_devices(spec: str) -> list[tuple[str, int]]:
    """Device names with their CPU thread share: [("cuda:0", 0), ...] or [("cpu:0", 1), ("cpu:1", 1)]."""
    spec = spec.strip()
    cores = os.cpu_count() or 1
    if spec == "auto":
        count = cuda_count()
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


def batch_limits(max_batch: int, batch_pixels: int, devices: list[str]) -> tuple[int, int]:
    """(images per batch, pixel budget per batch; 0 = none) for these devices; `max_batch` 0 = auto."""
    if max_batch:
        return max_batch, 0
    if devices and all(d.startswith("cuda") for d in devices):
        return CUDA_AUTO_BATCH, batch_pixels
    return 1, 0


def adapter_rank(path: str | Path) -> int:
    """The largest LoRA rank in a .safetensors file, read from its header only (no tensors loaded)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    rank = 0
    for key, info in header.items():
        if key == "__metadata__" or not isinstance(info, dict) or not info.get("shape"):
            continue
        if "lora_A" in key or "lora_down" in key or key.endswith(("down", "down.weight")):
            rank = max(rank, int(info["shape"][0]))
    return rank


def cuda_count() -> int:
    # NVML-based count: the parent must not create a CUDA context before workers are spawned.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    try:
        import torch  # optional here: a CPU-only parent never needs it

        return torch.cuda.device_count()
    except Exception:
        return 0
