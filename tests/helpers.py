"""Helpers shared by test modules (fixtures live in conftest.py); test modules never import each other."""

from __future__ import annotations

import asyncio
import copy
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from client.api import generate_request
from client.balancing import replica_health
from productinaction.v1 import generator_pb2_grpc
from services.generator.app import start_generator
from services.generator.messages import AdapterSpec
from testkit.standin import FACTORY

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def generator_settings(world: Path, storage: str, **overrides):
    from services.generator.settings import GeneratorSettings

    fields = dict(
        host="127.0.0.1",
        port=0,
        model=str(world / "tiny-sd"),
        products_dir=str(world / "products"),
        adapters_dir=str(world / "adapters"),
        templates_file=str(ROOT / "templates" / "catalog.yaml"),
        storage=storage,
        devices="cpu:1",
        default_steps=4,
        default_size=64,
        start_timeout_s=300,
    )
    fields.update(overrides)
    return GeneratorSettings(**fields)


async def render_product(stub, product: str, scale: float | None = None, seed: int = 5):
    """One 32x32, 3-step image of `product` (int16 array), optionally at another product scale."""
    import io

    from productinaction.v1 import generator_pb2 as pb

    request = pb.GenerateRequest(
        product_id=product,
        prompt="{product} on a table",
        num_images=1,
        seed=seed,
        steps=3,
        width=32,
        height=32,
        inline_images=True,
        guidance_scale=1.0,
    )
    if scale is not None:
        request.product_scale = scale
    async for event in stub.Generate(request, timeout=120):
        if event.WhichOneof("event") == "image_ready":
            return np.asarray(Image.open(io.BytesIO(event.image_ready.image.png)).convert("RGB")).astype(np.int16)
    raise AssertionError("no image")


STANDIN = FACTORY


@asynccontextmanager
async def standin_server(world: Path, tmp_path: Path, devices: str = "cpu:1", step: float = 0.01, **overrides):
    record = tmp_path / "steps.log"
    settings = generator_settings(
        world,
        overrides.pop("storage", str(tmp_path / "images")),
        model=overrides.pop("model", f"standin:step={step},record={record}"),
        worker_pipeline=STANDIN,
        devices=devices,
        **overrides,
    )
    app = await start_generator(settings, wait_ready=overrides.pop("wait_ready", True))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    try:
        app.record = record
        yield app, generator_pb2_grpc.GeneratorStub(channel), health_pb2_grpc.HealthStub(channel)
    finally:
        await channel.close()
        await app.stop()


def request(n: int = 1, prompt: str = "", steps: int = 5, **kw):
    return generate_request(product_id="tiny-star", template_id="beach", prompt=prompt, num_images=n, steps=steps, **kw)


async def run(stub, req, log: list | None = None, tag: str = "", timeout: float = 60):
    events = []
    async for event in stub.Generate(req, timeout=timeout):
        events.append(event)
        if log is not None:
            log.append((tag, event.WhichOneof("event")))
    return events


def images(events):
    return [e.image_ready for e in events if e.WhichOneof("event") == "image_ready"]


SERVING = health_pb2.HealthCheckResponse.SERVING


async def until(condition, timeout: float = 60.0, what: str = "") -> None:
    """Wait for `condition()`; fail (not hang) if it never holds."""
    try:
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"never happened: {what or condition}") from None


async def serving(health) -> bool:
    return (await health.Check(health_pb2.HealthCheckRequest())).status == SERVING


TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def write_lora(
    pipe, folder: Path, seed: int, rank: int, text_encoder: bool, fp16: bool = False, kohya: bool = False
) -> AdapterSpec:
    """A random LoRA (B random too, so it changes images) on the UNet and optionally the text encoder.

    `kohya` writes Kohya names, which the service converts into a state dict (not a path) before loading.
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import load_file, save_file

    from demo.tiny import LORA_TARGETS

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    layers = {}
    parts = [("unet", pipe.unet, LORA_TARGETS)] + ([("te", pipe.text_encoder, TE_TARGETS)] if text_encoder else [])
    for part, module, targets in parts:
        # On a copy: transformers' add_adapter needs a newer peft than diffusers does.
        module = inject_adapter_in_model(
            LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False), copy.deepcopy(module)
        )
        with torch.no_grad():
            for name, p in module.named_parameters():
                if "lora_B" in name:
                    p.mul_(3.0)
        layers[part] = get_peft_model_state_dict(module)
    path = folder / "pytorch_lora_weights.safetensors"
    if kohya:
        tensors = {}
        for part, prefix in (("unet", "lora_unet_"), ("te", "lora_te_")):
            for key, t in layers.get(part, {}).items():
                module_name, kind = key.rsplit(".lora_", 1)
                name = prefix + module_name.replace(".", "_")
                tensors[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = t.contiguous()
                tensors[f"{name}.alpha"] = torch.tensor(float(rank))
        save_file(tensors, str(path))
        return AdapterSpec(key=f"{folder.name}@1", path=str(path), weight=1.0)
    te = convert_state_dict_to_diffusers(layers["te"]) if "te" in layers else None
    unet = convert_state_dict_to_diffusers(layers["unet"])
    type(pipe).save_lora_weights(folder, unet_lora_layers=unet, text_encoder_lora_layers=te, safe_serialization=True)
    if fp16:
        save_file({k: v.half() for k, v in load_file(path).items()}, path)
    return AdapterSpec(key=f"{folder.name}@1", path=str(path), weight=1.0)


def write_adapter_set(tiny_world: Path, out: Path) -> dict[str, AdapterSpec]:
    """Ranks 4 and 8, UNet only or with text-encoder layers, Kohya names, an fp16 file (also test_compile's)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_world / "tiny-sd", local_files_only=True)
    return {
        "r4-unet-te": write_lora(pipe, out / "r4-unet-te", seed=21, rank=4, text_encoder=True),
        "r8-unet-te-kohya": write_lora(pipe, out / "r8-unet-te-kohya", seed=22, rank=8, text_encoder=True, kohya=True),
        "r4-unet": write_lora(pipe, out / "r4-unet", seed=23, rank=4, text_encoder=False),
        "r8-unet-fp16": write_lora(pipe, out / "r8-unet-fp16", seed=24, rank=8, text_encoder=False, fp16=True),
    }


ORDERS = {
    # The two defects found with hot-swap on: a larger rank after a smaller one (the UNet swaps, the text
    # encoder cannot), and a UNet-only adapter after one with text-encoder layers.
    "larger-rank-after-smaller": ["r4-unet-te", "r8-unet-te-kohya", "r4-unet-te"],
    "unet-only-after-text-encoder": ["r8-unet-te-kohya", "r4-unet", "r4-unet-te", "r4-unet"],
    "fp16-file-on-fp32-model": ["r4-unet", "r8-unet-fp16", "r4-unet-te", "r8-unet-fp16"],
}


def load_mask_png(data: bytes) -> np.ndarray:
    """A mask PNG (as `placement.mask_png` writes it) back to booleans."""
    import io

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("L")) >= 128


@asynccontextmanager
async def web_process(process, url: str, log, log_path: Path, timeout: float = 90.0):
    """`url` once the page `process` serves answers; on exit the process is stopped (killed after 10 s)."""
    import time
    import urllib.request

    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.returncode is not None:
                raise RuntimeError(f"web page exited: {log_path.read_text()[-3000:]}")
            try:
                await asyncio.to_thread(urllib.request.urlopen, url, timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"web page not up on {url}") from None
                await asyncio.sleep(0.3)
        yield url
    finally:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()
        log.close()


@dataclass
class Replica:
    """A generator in its own process group (server + worker), as one replica of a deployment."""

    proc: subprocess.Popen
    port: int
    metrics_port: int
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def counters(self) -> dict[str, float]:
        """From its /metrics: 'images' stored, 'ok' Generate requests completed, 'requests' ended in any way."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            text = response.read().decode()
        images = sum(float(v) for v in re.findall(r"^pia_images_generated_total\{[^}]*\} (\S+)$", text, re.M))
        outcomes = dict(re.findall(r'^pia_requests_total\{outcome="(\w+)"\} (\S+)$', text, re.M))
        ok = float(outcomes.get("ok", 0.0))
        return {"images": images, "ok": ok, "requests": sum(float(v) for v in outcomes.values())}

    def kill(self) -> None:
        """SIGKILL the whole process group (the server and its worker), as when a node dies."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def start_replica(world: Path, storage: Path | str, log: Path, **args: object) -> Replica:
    """`python -m services.generator` on the tiny world (1 CPU worker, 2 steps, 32 px), on free ports."""
    port, metrics_port = free_port(), free_port()
    flags = {
        "host": "127.0.0.1",
        "port": port,
        "metrics-port": metrics_port,
        "model": world / "tiny-sd",
        "products-dir": world / "products",
        "adapters-dir": world / "adapters",
        "templates-file": ROOT / "templates" / "catalog.yaml",
        "storage": storage,
        "devices": "cpu:1",
        "cpu-threads": 1,
        "default-steps": 2,
        "default-size": 32,
        "log-level": "WARNING",
        **args,
    }
    cmd = [sys.executable, "-m", "services.generator", *(f"--{k}={v}" for k, v in flags.items())]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    return Replica(proc, port, metrics_port, log)


async def wait_serving(replicas: list[Replica], timeout: float = 300.0) -> None:
    """Until every replica's health says SERVING; fails with a replica's log if one exits first."""
    target = "ipv4:" + ",".join(r.address for r in replicas)
    async with asyncio.timeout(timeout):
        while set((await replica_health(target)).values()) != {"SERVING"}:
            for r in replicas:
                assert r.proc.poll() is None, r.log.read_text()[-3000:]
            await asyncio.sleep(0.5)
