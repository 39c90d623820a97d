"""Typed messages: between the parent (server, dispatcher, worker pool) and the per-device workers, and,
inside the parent, from the dispatcher and storage to a request's stream.

Every message is a small frozen dataclass tagged with the request id; nothing here imports
torch, so the parent can build and read them without touching CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# Scheduler names users may ask for -> (diffusers class, extra config).
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "dpm++": ("DPMSolverMultistepScheduler", {}),
    "dpm++_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    # clip_sample=False: clipping breaks models whose latents leave [-1, 1].
    "ddim": ("DDIMScheduler", {"clip_sample": False}),
    "pndm": ("PNDMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
}


@dataclass(frozen=True)
class AdapterSpec:
    """One LoRA to apply. `key` identifies the file version, so caches never serve stale weights."""

    key: str
    path: str
    weight: float
    embeddings: str | None = None
    tokens: tuple[str, ...] = ()
    kind: str = "product"  # "product", "style" or "background" (the manifest's kind)
    # Words a style/background adapter adds to the prompt: its text-encoder LoRA, not the product's, reads them.
    phrases: tuple[str, ...] = ()
    scene_only: bool = False  # a style/background kept off a stacked product (the manifest's `scope: scene`)


@dataclass(frozen=True)
class Shadow:
    """A contact shadow under a placed product (placement mode). strength 0: none."""

    strength: float  # 0..1: how much the shadow's core darkens the scene (0.5 halves its luminance)
    softness: float  # 0..1: blur, up to a quarter of the product's height
    offset_x: float = 0.0  # -1..1: shift to the right, as a fraction of the product's height (light from the left)
    offset_y: float = 0.0  # -1..1: shift downwards, likewise


@dataclass(frozen=True)
class PlacedProduct:
    """Placement mode: the product placed in the frame (services/generator/placement.py makes it).

    The pixels travel once per job. Equality (for batching) goes by digest and geometry, not by bytes.
    """

    width: int
    height: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 of the product in the frame
    feather: int  # width of the blended edge inside the mask; pixels further in are kept exactly
    digest: str  # sha256 of the uploaded image (and mask) bytes
    rgb: bytes = field(compare=False, repr=False)  # (height, width, 3) uint8; the product inside the mask
    mask: bytes = field(compare=False, repr=False)  # (height, width) uint8; 1 inside the mask
    # (height, width) uint8: the product's weight in the composite, 255 on the kept pixels, its coverage (or the
    # feather ramp) on the edge; empty: the feather ramp, computed from the mask.
    alpha: bytes = field(default=b"", compare=False, repr=False)
    shadow: Shadow | None = None
    # (height, width) uint8: the shadow's shape (255 at its core); empty without a shadow.
    shadow_map: bytes = field(default=b"", compare=False, repr=False)
    # Share of the denoising steps that draw the scene before the product's latents are held (placement.join_step).
    scene_first: float = 0.0


@dataclass(frozen=True)
class RenderSettings:
    """Everything but the seed. Jobs with equal settings may share a batch."""

    prompt: str
    negative_prompt: str
    steps: int
    guidance_scale: float
    width: int
    height: int
    scheduler: str
    adapters: tuple[AdapterSpec, ...]
    # Placement mode: inpaint the scene around these pixels, then composite them back.
    placement: PlacedProduct | None = None
    # Stacked style/background adapters act on the scene only (services/generator/regional.py); the service's
    # --scene-only-styles sets it per job.
    scene_only_styles: bool = True
    # Placement mode: the prompt around the product (the scene without the product's words), with the product's
    # adapter off (placement.scene_adapters). Empty: the request's prompt and adapters.
    scene_prompt: str = ""


# Parent -> worker


# A request inside the parent is a ticket; its key ("request_id~n") tags every message about it, so a reused
# request id never mixes with a finished ticket's late messages.


@dataclass(frozen=True)
class Job:
    ticket_key: str
    job_id: int
    settings: RenderSettings
    indices: tuple[int, ...]
    seeds: tuple[int, ...]
    preview_every: int = 0
    # PNG text metadata shared by the job's images; the worker adds each image's seed.
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Cancel:
    ticket_key: str


@dataclass(frozen=True)
class Shutdown:
    pass


# Worker -> parent


@dataclass(frozen=True)
class Ready:
    device: str
    load_seconds: float
    warmup_seconds: float
    # The model's native image size and the multiple sizes must be of.
    default_size: int = 512
    size_multiple: int = 8
    # Size of the warm-up's one image (2 steps): the first yardstick of the hang watchdog.
    warmup_megapixels: float = 0.0


@dataclass(frozen=True)
class Fatal:
    """The worker cannot serve at all (model failed to load); it exits after sending this."""

    device: str
    message: str


@dataclass(frozen=True)
class Progress:
    ticket_key: str
    job_id: int
    indices: tuple[int, ...]
    step: int
    total_steps: int
    previews: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class ImageResult:
    ticket_key: str
    job_id: int
    index: int
    seed: int
    png: bytes
    width: int
    height: int
    compute_seconds: float
    device: str = ""


ErrorKind = Literal["invalid_argument", "not_found", "resource_exhausted", "internal"]


@dataclass(frozen=True)
class JobError:
    """A job failed; the worker stays up. `field` names the offending request field, if any ("": none)."""

    ticket_key: str
    job_id: int
    kind: ErrorKind
    message: str  # the problem, without the field's name
    field: str = ""


@dataclass(frozen=True)
class JobDone:
    ticket_key: str
    job_id: int
    compute_seconds: float
    cancelled: bool = False
    cache_hits: int = 0
    cache_misses: int = 0


# Dispatcher and storage -> a request's stream (inside the parent)


@dataclass(frozen=True)
class QueuePosition:
    """Requests served before this one's next image (0: next)."""

    position: int


@dataclass(frozen=True)
class Stored:
    """An image is durably stored: only now may the stream announce it."""

    result: ImageResult
    uri: str
    url: str
    storage_seconds: float


@dataclass(frozen=True)
class Failed:
    """The request cannot finish: the one failure path of a stream (worker, storage or shutdown)."""

    error: Exception


StreamEvent = QueuePosition | Progress | Stored | Failed
ToWorker = Job | Cancel | Shutdown
FromWorker = Ready | Fatal | Progress | ImageResult | JobError | JobDone
