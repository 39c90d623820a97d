"""The contracts between the worker and what it drives: the pipeline and its set of adapters.

`ProductPipeline` (pipeline.py), with either adapter set (adapter_cache.py eager, lora_slots.py compiled),
implements them, and so does the test stand-in (testkit/standin.py); the worker (worker.py) knows only
these. Torch-free, so the parent can import the errors.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from PIL import Image

    from services.generator.messages import AdapterSpec, RenderSettings
    from services.generator.options import WorkerConfig


class InvalidJob(ValueError):
    """A job the pipeline refuses; `field` names the request field at fault (the parent's INVALID_ARGUMENT)."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class JobCancelled(Exception):
    """Raised from the step callback to stop denoising at the next step."""


@contextmanager
def stacking_adapters() -> Iterator[None]:
    """Around loading or evicting one of several adapters: peft warns that a second adapter joins the model, and
    that an evicted one was active. Both describe what an adapter set is for, so exactly these two are dropped."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Already found a `peft_config` attribute", category=UserWarning)
        warnings.filterwarnings("ignore", message=r"Adapter \S+ was active which is now deleted", category=UserWarning)
        yield


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0


AdapterSwitch = Callable[["tuple[AdapterSpec, ...]"], None]


class AdapterSet(Protocol):
    """The LoRA adapters a pipeline holds, and which of them are active with what weights."""

    stats: CacheStats

    def activate(self, adapters: tuple[AdapterSpec, ...]) -> None:
        """Make exactly `adapters` active with their weights (loading what is not held)."""
        ...

    def unet_switcher(self, adapters: tuple[AdapterSpec, ...]) -> AdapterSwitch:
        """For a job whose `adapters` are active: a function that sets new weights for the same adapters on the
        UNet's LoRA layers only (the prompt is encoded already), called several times per denoising step."""
        ...


class Frames(Protocol):
    """One step's previews on their way to the host (pipeline.PreviewFrames)."""

    def __len__(self) -> int: ...

    def images(self) -> list[Image.Image]: ...


StepHook = Callable[[int, int, "Frames | None"], None]


class Pipeline(Protocol):
    """What a worker renders with: loaded once per device."""

    device_name: str
    default_size: int  # the model's native side
    size_multiple: int  # sides must be multiples of this
    load_seconds: float
    adapters: AdapterSet

    def warmup(self, size: int = 64) -> float:
        """Render once (compile every warm shape when compiling); the seconds it took."""
        ...

    def __call__(
        self,
        settings: RenderSettings,
        seeds: Sequence[int],
        on_step: StepHook | None = None,
        preview_every: int = 0,
        should_stop: Callable[[], bool] = ...,
    ) -> list[Image.Image]: ...


# What `WorkerConfig.pipeline` names ("module:callable").
PipelineFactory = Callable[["WorkerConfig"], Pipeline]
