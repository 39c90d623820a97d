"""A stand-in for ProductPipeline (an `interfaces.Pipeline`): fixed time per step, deterministic images
from the seed.

Used by dispatch and reliability tests and by benchmarks to exercise the real workers, pool, dispatcher
and server without diffusion. It lives outside `services/` because it injects faults on request: the
generator loads it only with PIA_ALLOW_TEST_PIPELINES=1 (settings.py).

The "model" string configures it: `standin:step=0.02,load=0,record=/tmp/log`;
`noise=1` makes images incompressible (big PNGs), `die_on_load=PATH` exits while loading whenever
PATH exists, `slow_load_if=PATH` then loads for a minute, and `fail_load=1` fails the load (Fatal).
Prompts can ask for trouble: "fail" raises ValueError, "crash" kills the process on cpu:0,
"crash-always" kills it on every device, "oom-batch" runs out of memory on any batch above 1,
"hang" stops answering on cpu:0 and "hang-always" on every device.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from services.generator.interfaces import AdapterSwitch, CacheStats, InvalidJob, JobCancelled, StepHook
from services.generator.messages import AdapterSpec, RenderSettings
from services.generator.options import WorkerConfig

# What `--worker-pipeline` names to load this stand-in (tests and benchmarks use this one constant).
FACTORY = "testkit.standin:load"


class OutOfMemoryError(RuntimeError):
    """Named like torch's, which is how the worker recognises it."""


class Adapters:
    """An `interfaces.AdapterSet` that only counts."""

    def __init__(self) -> None:
        self.stats = CacheStats()
        self.loaded: set[str] = set()

    def activate(self, adapters: tuple[AdapterSpec, ...]) -> None:
        for spec in adapters:
            if spec.key in self.loaded:
                self.stats.hits += 1
            else:
                self.stats.misses += 1
                self.loaded.add(spec.key)

    def unet_switcher(self, adapters: tuple[AdapterSpec, ...]) -> AdapterSwitch:
        return lambda _specs: None


class Frames:
    """Blank previews (`interfaces.Frames`)."""

    def __init__(self, count: int):
        self.count = count

    def __len__(self) -> int:
        return self.count

    def images(self) -> list[Image.Image]:
        return [Image.new("RGB", (8, 8)) for _ in range(self.count)]


def load(config: WorkerConfig) -> StandInPipeline:
    """The stand-in's `interfaces.PipelineFactory`."""
    return StandInPipeline(config.model, config.device)


class StandInPipeline:
    def __init__(self, model: str, device: str):
        options = dict(kv.split("=", 1) for kv in model.removeprefix("standin").strip(":").split(",") if "=" in kv)
        self.step_seconds = float(options.get("step", 0.01))
        self.record = options.get("record")
        self.noise = options.get("noise") == "1"
        self.device_name = device
        self.default_size = 64
        self.size_multiple = 8
        self.adapters = Adapters()
        time.sleep(float(options.get("load", 0)))
        self.load_seconds = float(options.get("load", 0))
        if options.get("slow_load_if") and os.path.exists(options["slow_load_if"]):
            time.sleep(60)  # a long model load, for respawns only
        if options.get("die_on_load") and os.path.exists(options["die_on_load"]):
            os._exit(3)  # like a crash while loading: no Fatal message
        if options.get("fail_load") == "1":
            raise RuntimeError("stand-in: this model cannot load")

    def warmup(self, size: int = 64) -> float:
        return 0.0

    def _log(self, line: str) -> None:
        if self.record:
            with open(self.record, "a") as f:
                f.write(f"{line}\n")

    def __call__(
        self,
        settings: RenderSettings,
        seeds: Sequence[int],
        on_step: StepHook | None = None,
        preview_every: int = 0,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> list[Image.Image]:
        if "fail" in settings.prompt:
            raise InvalidJob("prompt", "the stand-in refuses prompts containing 'fail'")
        if "oom-batch" in settings.prompt and len(seeds) > 1:
            raise OutOfMemoryError(f"stand-in: no memory for a batch of {len(seeds)}")
        crash = "crash-always" in settings.prompt or ("crash" in settings.prompt and self.device_name == "cpu:0")
        hang = "hang-always" in settings.prompt or ("hang" in settings.prompt and self.device_name == "cpu:0")
        self.adapters.activate(settings.adapters)
        for step in range(1, settings.steps + 1):
            if should_stop():
                self._log(f"cancelled {tuple(seeds)} at {step}")
                raise JobCancelled()
            time.sleep(self.step_seconds * len(seeds))
            self._log(f"step {self.device_name} {tuple(seeds)} {step}")
            if crash and step == 1:
                os._exit(17)  # like an OOM kill: no goodbye message
            if hang and step == 1:
                time.sleep(3600)  # like a wedged driver: alive, silent
            if on_step is not None:
                want = preview_every > 0 and step % preview_every == 0
                frames = Frames(len(seeds)) if want else None
                on_step(step, settings.steps, frames)
        images = []
        for seed in seeds:
            rng = np.random.default_rng(seed)
            if self.noise:
                images.append(
                    Image.fromarray(rng.integers(0, 255, (settings.height, settings.width, 3), dtype=np.uint8))
                )
                continue
            noise = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
            images.append(Image.fromarray(noise).resize((settings.width, settings.height), Image.Resampling.NEAREST))
        return images
