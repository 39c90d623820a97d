"""Upscaler settings: one object, from flags (`--port 50052`) or env (`PIA_UPSCALER_PORT`)."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings

# mv-lab/swin2sr on Replicate, pinned: a new version must be a deliberate change, not a surprise.
REPLICATE_MODEL = "mv-lab/swin2sr"
REPLICATE_VERSION = "a01b0512004918ca55d02e554914a9eca63909fa83a29ff0f115c78a7045574f"

Backend = Literal["local", "replicate"]


class UpscalerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="PIA_UPSCALER_", cli_prog_name="python -m services.upscaler")

    port: int = Field(50052, description="gRPC port.")
    model: str = Field(
        "models/demo-swin2sr",
        description="Swin2SR checkpoint: a local folder or a hub id "
        "(caidas/swin2SR-classical-sr-x4-64, caidas/swin2SR-realworld-sr-x4-64-bsrgan-psnr).",
    )
    device: str = Field("auto", description="'auto' (cuda:0 when present, else the CPU), 'cpu' or 'cuda:N'.")
    threads: int = Field(0, description="CPU threads for the model (0: torch's default).")
    engine: str = Field(
        "services.upscaler.engine:Swin2SREngine", description="Engine factory, module:callable (stand-ins for tests)."
    )
    default_backend: Backend = Field("local", description="Backend for requests that leave it unspecified.")
    tile_size: int = Field(256, description="Default tile size in input pixels (requests may override).")
    tile_overlap: int = Field(32, description="Overlap between neighbouring tiles, in input pixels.")
    min_tile_size: int = Field(32, description="Smallest tile_size a request may ask for.")
    max_tile_size: int = Field(1024, description="Largest tile_size a request may ask for (bounds device memory).")
    max_pixels: int = Field(1024 * 1024, description="Largest input image, in pixels (width*height).")
    max_input_bytes: int = Field(32 * 1024 * 1024, description="Largest encoded input image, in bytes.")
    max_queue: int = Field(8, description="Jobs that may wait for the device; beyond it: RESOURCE_EXHAUSTED.")
    start_timeout_s: float = Field(600.0, description="How long loading and warming up the model may take.")
    replicate_model: str = Field(REPLICATE_MODEL, description="Replicate model (owner/name).")
    replicate_version: str = Field(REPLICATE_VERSION, description="Pinned Replicate model version id.")
    replicate_task: Literal["classical_sr", "real_sr", "compressed_sr"] = Field(
        "classical_sr",
        description="mv-lab/swin2sr task. classical_sr matches the local default checkpoint; "
        "pair real_sr with caidas/swin2SR-realworld-sr-x4-64-bsrgan-psnr.",
    )
    replicate_base_url: str | None = Field(
        None, description="Replicate API base URL (unset: the client's default, https://api.replicate.com)."
    )
    replicate_poll_s: float = Field(1.0, description="Seconds between polls of a Replicate prediction.")
    replicate_timeout_s: float = Field(300.0, description="Give up on a Replicate prediction after this long.")
    replicate_max_concurrency: int = Field(4, description="Replicate predictions in flight at once.")
    replicate_max_output_bytes: int = Field(256 * 1024 * 1024, description="Largest output download accepted.")

    @model_validator(mode="after")
    def _check(self) -> Self:
        if not 0 < self.min_tile_size <= self.tile_size <= self.max_tile_size:
            raise ValueError("need 0 < min_tile_size <= tile_size <= max_tile_size")
        if self.tile_overlap < 0:
            raise ValueError("tile_overlap must not be negative (it is capped at half a tile)")
        if self.max_pixels < 1 or self.max_queue < 0:
            raise ValueError("max_pixels must be positive and max_queue not negative")
        return self
