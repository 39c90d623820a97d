"""Typed messages between the servicer (event loop) and the device's worker thread.

Each is a small frozen dataclass tagged with the request id. The worker computes and encodes;
the servicer stores, then announces.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from services.common.errors import ServiceError

# Servicer -> worker


@dataclass(frozen=True)
class UpscaleJob:
    request_id: str
    image: Image.Image  # RGB or RGBA, already decoded and checked
    tile_size: int
    tile_overlap: int
    # PNG text chunks for the result: the source's, plus provenance.
    text: dict[str, str] = field(default_factory=dict)
    # time.monotonic() after which the job is dropped (the gRPC deadline); None: no deadline.
    deadline: float | None = None


# Worker -> servicer


@dataclass(frozen=True)
class Started:
    request_id: str
    tiles_total: int


@dataclass(frozen=True)
class TileDone:
    request_id: str
    tiles_done: int
    tiles_total: int


@dataclass(frozen=True)
class UpscaleResult:
    request_id: str
    png: bytes
    width: int
    height: int
    compute_seconds: float
    device: str


@dataclass(frozen=True)
class JobFailed:
    request_id: str
    error: ServiceError
    # For history and metrics: cancelled, expired, oom, failed, shutdown.
    outcome: str = "failed"
