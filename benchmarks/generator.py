"""Generator benchmarks (not tests): JSON with side-by-side measurements from one run.

    python -m benchmarks.generator --out bench-results/generator.json            # tiny model, CPU
    python -m benchmarks.generator --fullsize --device cuda:0                     # SD 1.5 size, GPU

- scheduler efficiency with 4 simulated devices (stand-in pipeline, fixed time per step);
- throughput alternating 2 products vs 1 product, and the cost of reloading on every switch;
- time to first image for n=4 on one device;
- micro-batching (max_batch 1 vs 4) and step-preview overhead;
- the parts behind those figures, timed in-process: an adapter switch, a reload, one preview;
- the service overhead: the same 8 images through gRPC (storage included) vs a direct call of the same
  diffusers pipeline with the same seeds (`service_overhead`);
- the fast path, eager against compiled and each switch on/off (`fast_path`, `--variants`): seconds per
  image by batch size, images/s, peak memory, fraction of the compute floor, cost per 1,000 images,
  product-switch cost and recompilations; and a restart that reuses the compile cache (`cache_restart`).

Conditions that are compared run interleaved on the same server (A B A B ...), so drift in a shared
machine's speed falls on both sides instead of on whichever ran second.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import grpc

from benchmarks.report import save_report
from client.api import generate_request
from productinaction.v1 import generator_pb2_grpc
from services.generator.app import start_generator
from services.generator.settings import GeneratorSettings
from testkit.standin import FACTORY

ROOT = Path(__file__).resolve().parent.parent
STANDIN = FACTORY
os.environ.setdefault("PIA_ALLOW_TEST_PIPELINES", "1")  # benchmarks run the testkit stand-in
# Most important first: --budget-s skips from the end.
CUDA_VARIANTS = [
    "off",
    "reduce-overhead",
    "off+channels_last",
    "off+bf16",
    "off+nosdpa",
    "off+fuse_qkv",
    "default",
    "reduce-overhead+channels_last",
    "reduce-overhead+vae",
    "max-autotune-no-cudagraphs",
]


async def _serve(args, settings: GeneratorSettings):
    """Start a generator; return it, its channel, and `request(**fields)` with the run's defaults."""
    app = await start_generator(settings)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    stub = generator_pb2_grpc.GeneratorStub(channel)
    size = args.size or None
    return app, channel, partial(_request, stub, template_id=args.template, width=size, height=size)


async def _request(stub, **fields) -> dict:
    started = time.perf_counter()
    first = None
    async for event in stub.Generate(generate_request(**fields), timeout=3600):
        kind = event.WhichOneof("event")
        if kind == "image_ready" and first is None:
            first = time.perf_counter() - started
        if kind == "completed":
            t = event.completed.timings
    return {"wall_s": time.perf_counter() - started, "first_s": first, "total_s": t.total_seconds}


def _settings(args, out: Path, **overrides) -> GeneratorSettings:
    fields = dict(
        host="127.0.0.1",
        port=0,
        model=args.model,
        products_dir=args.products_dir,
        adapters_dir=args.adapters_dir,
        templates_file=str(ROOT / "templates" / "catalog.yaml"),
        storage=str(out),
        devices=args.device,
        default_steps=args.steps,
        log_level="WARNING",
    )
    fields.update(overrides)
    return GeneratorSettings(**fields)


async def simulated_devices(args, out: Path) -> dict:
    step = 0.05
    results = {}
    for devices in ("cpu:1", "cpu:4"):
        app, channel, request = await _serve(
            args,
            _settings(args, out, model=f"standin:step={step}", worker_pipeline=STANDIN, devices=devices, cpu_threads=1),
        )
        try:
            plain = dict(product_id=args.product, width=None, height=None)
            await request(**plain, num_images=4, steps=2)  # warm
            results[devices] = await request(**plain, num_images=16, steps=10)
        finally:
            await channel.close()
            await app.stop()
    t1, t4 = results["cpu:1"]["total_s"], results["cpu:4"]["total_s"]
    return {
        "stand_in_step_s": step,
        "steps": 10,
        "images": 16,
        "seconds_1_device": t1,
        "seconds_4_devices": t4,
        "ideal_4_devices": 16 * 10 * step / 4,
        "efficiency": t1 / (4 * t4),
        "goal": ">= 0.9",
    }


async def _interleaved(rounds: int, conditions: dict) -> dict:
    """Run each condition's block once per round, in turn; return per-condition lists of block results."""
    results = {name: [] for name in conditions}
    for _ in range(rounds):
        for name, block in conditions.items():
            results[name].append(await block())
    return results


async def _seconds_per_image(request, products: list[str], block: int, seed0: int = 0) -> float:
    """One block of 1-image requests, cycling through `products`; mean server-side seconds per image."""
    runs = [await request(product_id=products[i % len(products)], num_images=1, seed=seed0 + i) for i in range(block)]
    return statistics.fmean(r["total_s"] for r in runs)


async def product_switching(args, out: Path) -> dict:
    one, two = [args.product], [args.product, args.other_product]
    runs = {}
    for label, cache in (("cached", 8), ("reload_every_switch", 1)):
        app, channel, request = await _serve(args, _settings(args, out, adapter_cache_size=cache))
        try:
            for product in two:
                await request(product_id=product, num_images=1, seed=1)
            blocks = await _interleaved(
                args.rounds,
                {
                    "single": partial(_seconds_per_image, request, one, args.block),
                    "alternating": partial(_seconds_per_image, request, two, args.block),
                },
            )
        finally:
            await channel.close()
            await app.stop()
        single, alternating = statistics.median(blocks["single"]), statistics.median(blocks["alternating"])
        runs[label] = {
            "seconds_per_image_1_product": single,
            "seconds_per_image_alternating": alternating,
            # Median over neighbouring block pairs: robust to the machine's speed drifting.
            "ratio": statistics.median(a / b for a, b in zip(blocks["single"], blocks["alternating"], strict=True)),
            "blocks": blocks,
        }
    reload = runs["reload_every_switch"]
    return {
        "requests_per_block": args.block,
        "blocks_per_condition": args.rounds,
        "throughput_ratio_alternating_vs_single": runs["cached"]["ratio"],
        "goal": ">= 0.95",
        "cached": runs["cached"],
        "reload_every_switch": reload,
        # Every alternating request is a switch, so the per-image difference is the per-switch cost.
        "reload_cost_s_per_switch": statistics.median(
            a - b for a, b in zip(reload["blocks"]["alternating"], reload["blocks"]["single"], strict=True)
        ),
    }


async def first_image_and_batching(args, out: Path) -> dict:
    four = dict(product_id=args.product, num_images=4)
    result = {}
    for label, overrides in (("batch_1", {"max_batch": 1}), ("batch_4", {"max_batch": 4})):
        app, channel, request = await _serve(args, _settings(args, out, **overrides))
        try:
            await request(**four, seed=0)
            conditions = {"off": partial(request, **four, seed=1)}
            if label == "batch_1":
                conditions["every_step"] = partial(request, **four, seed=1, preview_every=1)
            runs = await _interleaved(args.repeats, conditions)
        finally:
            await channel.close()
            await app.stop()
        result[label] = {
            "seconds_4_images": statistics.median(r["total_s"] for r in runs["off"]),
            "first_image_s": statistics.median(r["first_s"] for r in runs["off"]),
        }
        if label == "batch_1":
            ratios = [on["total_s"] / off["total_s"] for on, off in zip(runs["every_step"], runs["off"], strict=True)]
            result["previews"] = {
                "seconds_4_images_every_step": statistics.median(r["total_s"] for r in runs["every_step"]),
                "overhead_per_pair": [r - 1 for r in ratios],
                "overhead": statistics.median(ratios) - 1,
            }
    b1 = result["batch_1"]
    return {
        "time_to_first_image": {
            "n": 4,
            "first_image_s": b1["first_image_s"],
            "whole_request_s": b1["seconds_4_images"],
            "ratio": b1["first_image_s"] / b1["seconds_4_images"],
            "goal": "<= 0.35",
        },
        "micro_batching": {
            "seconds_4_images_batch_1": b1["seconds_4_images"],
            "seconds_4_images_batch_4": result["batch_4"]["seconds_4_images"],
            "speedup": b1["seconds_4_images"] / result["batch_4"]["seconds_4_images"],
            "first_image_s_batch_1": b1["first_image_s"],
            "first_image_s_batch_4": result["batch_4"]["first_image_s"],
        },
        "step_previews": {
            "seconds_4_images_off": b1["seconds_4_images"],
            **result["previews"],
            "goal": "<= 0.05",
        },
    }


async def service_overhead(args, out: Path) -> dict:
    """The same images through the gRPC service (storage included) and by a direct call of the same diffusers
    pipeline with the same seeds, interleaved; ratio = service / direct (goal <= 1.05)."""
    import numpy as np
    import torch
    from PIL import Image

    from services.generator.catalog import Catalog
    from services.generator.options import parse_devices
    from services.generator.pipeline import ProductPipeline

    n, seed = 8, 100
    settings = _settings(
        args, out, compile=args.compile, warm_shapes=args.warm_shapes, compile_cache_dir=args.cache_dir
    )
    app, channel, _ = await _serve(args, settings)
    stub = generator_pb2_grpc.GeneratorStub(channel)
    try:
        params = None
        async for event in stub.Generate(
            generate_request(
                product_id=args.product,
                template_id=args.template,
                width=args.size or None,
                height=args.size or None,
                num_images=1,
                seed=seed,
            ),
            timeout=3600,
        ):
            if event.WhichOneof("event") == "image_ready":
                params = event.image_ready.parameters
        device, _ = parse_devices(args.device)[0]
        batch, _ = settings.batch_limits([device])
        catalog = Catalog(args.products_dir, args.adapters_dir, ROOT / "templates" / "catalog.yaml")
        spec = catalog.product(args.product).spec(params.product_scale or 1.0)
        files = [str(e.adapter_path) for e in catalog.entries()]
        direct = ProductPipeline(
            args.model,
            device if device.startswith("cuda") else "cpu",
            compile=settings.compile_options(device, files, batch),
        )
        direct.warmup()
        direct.adapters.activate((spec,))
        gen_device = direct.device if direct.device.type == "cuda" else "cpu"

        def run_direct() -> list:
            images = []
            for start in range(0, n, batch):
                seeds = range(seed + start, seed + min(n, start + batch))
                images += direct.pipe(
                    prompt=params.prompt,
                    negative_prompt=params.negative_prompt or None,
                    num_images_per_prompt=len(seeds),
                    num_inference_steps=params.steps,
                    guidance_scale=params.guidance_scale,
                    width=params.width,
                    height=params.height,
                    generator=[torch.Generator(gen_device).manual_seed(s) for s in seeds],
                ).images
            return images

        uris: list[str] = []

        async def via_service() -> float:
            started = time.perf_counter()
            uris.clear()
            async for event in stub.Generate(
                generate_request(
                    product_id=args.product,
                    template_id=args.template,
                    width=params.width,
                    height=params.height,
                    num_images=n,
                    seed=seed,
                ),
                timeout=3600,
            ):
                if event.WhichOneof("event") == "image_ready":
                    uris.append(event.image_ready.image.uri)
            return time.perf_counter() - started

        async def via_direct() -> float:
            started = time.perf_counter()
            run_direct()
            if direct.device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - started

        await via_service()
        await via_direct()
        runs = await _interleaved(args.repeats, {"service": via_service, "direct": via_direct})
        # The same pixels: the service renders what the direct call renders.
        mine = run_direct()
        served = [np.asarray(Image.open(u.removeprefix("file://")).convert("RGB"), dtype=np.int16) for u in uris]
        diffs = [int(np.abs(a - np.asarray(b, dtype=np.int16)).max()) for a, b in zip(served, mine, strict=False)]
    finally:
        await channel.close()
        await app.stop()
    ratios = [a / b for a, b in zip(runs["service"], runs["direct"], strict=True)]
    return {
        "images": n,
        "batch": batch,
        "compile": settings.compile,
        "seconds_service": statistics.median(runs["service"]),
        "seconds_direct": statistics.median(runs["direct"]),
        "ratio_per_pair": ratios,
        "ratio": statistics.median(ratios),
        "goal": "<= 1.05",
        "max_pixel_difference_service_vs_direct": max(diffs) if diffs else None,
    }


# SD 1.5 at 512², 25 steps with CFG on one H100 (issue 14): ~0.045 s of dense fp16 compute per image.
COMPUTE_FLOOR_S = 0.045


def _variant(spec: str):
    """ "reduce-overhead+vae+channels_last" -> CompileOptions fields (and fuse_qkv); flags: vae, channels_last, bf16,
    nosdpa, fuse_qkv (fuse_qkv, a benchmark-only option, runs without LoRA: see `fuse_qkv`)."""
    mode, *flags = spec.split("+")
    unknown = set(flags) - {"vae", "channels_last", "bf16", "nosdpa", "fuse_qkv"}
    if unknown:
        raise SystemExit(f"--variants: unknown flag(s) {sorted(unknown)} in {spec!r}")
    return dict(
        mode=mode,
        vae="vae" in flags,
        channels_last="channels_last" in flags,
        dtype="bf16" if "bf16" in flags else "auto",
        sdpa="nosdpa" not in flags,
        fuse_qkv="fuse_qkv" in flags,
    )


def fuse_qkv(pipe) -> None:
    """diffusers' fused QKV: benchmarks only. Its fused to_qkv bypasses LoRA on to_q/to_k/to_v, so the service
    never fuses, and here it is refused on a UNet with LoRA layers."""
    if any("lora_A" in n for n, _ in pipe.unet.named_modules()):
        raise ValueError("fuse_qkv: the UNet has LoRA layers, which diffusers' fused to_qkv would bypass")
    pipe.unet.fuse_qkv_projections()


@contextlib.contextmanager
def _fusing_qkv(enabled: bool):
    """While a pipeline is built, fuse QKV right after its kernels are set (before adapters and compile)."""
    from unittest import mock

    from services.generator import compiled

    if not enabled:
        yield
        return
    original = compiled.set_kernels_and_layout

    def set_and_fuse(pipe, options) -> None:
        original(pipe, options)
        fuse_qkv(pipe)

    with mock.patch.object(compiled, "set_kernels_and_layout", set_and_fuse):
        yield


def fast_path(args, catalog_dirs: tuple[str, str]) -> dict:
    """Eager against compiled, and each switch on/off, in this process: one pipeline per variant."""
    import gc

    import torch

    from services.generator.catalog import Catalog
    from services.generator.compiled import compile_counters
    from services.generator.messages import RenderSettings
    from services.generator.options import CompileOptions
    from services.generator.pipeline import ProductPipeline

    cuda = args.device.startswith("cuda")
    device = args.device if cuda else "cpu"
    catalog = Catalog(*catalog_dirs, ROOT / "templates" / "catalog.yaml")
    specs = [catalog.product(p).spec(1.0) for p in (args.product, args.other_product)]
    layout = tuple(sorted(str(e.adapter_path) for e in catalog.entries()))
    size = args.size or 64  # --fullsize sets 512; the tiny model is 64²
    batches = [int(b) for b in args.batches.split(",")]
    report: dict = {
        "size": size,
        "steps": args.steps,
        "gpu_price_per_hour": args.gpu_price,
        "compute_floor_s": COMPUTE_FLOOR_S,
        "variants": {},
    }
    started_all = time.perf_counter()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for spec in args.variants:
        if time.perf_counter() - started_all > args.budget_s:
            report["variants"][spec] = {"skipped": f"over --budget-s {args.budget_s:.0f}"}
            continue
        fields = _variant(spec)
        fused = fields.pop("fuse_qkv")
        lora = not fused
        options = CompileOptions(
            **fields, layout=layout, warm_shapes=tuple((size, size, b) for b in batches), cache_dir=args.cache_dir
        )
        row: dict = {"lora": lora, "fuse_qkv": fused, **fields}
        begun = time.perf_counter()
        try:
            with _fusing_qkv(fused):
                pipe = ProductPipeline(args.model, device, adapter_cache_size=8, compile=options)
        except ValueError as exc:
            report["variants"][spec] = {"refused": str(exc)}
            continue
        row["load_s"] = time.perf_counter() - begun
        adapters = (specs[0],) if lora else ()
        pipe.adapters.activate(adapters)
        before = compile_counters()
        begun = time.perf_counter()
        if options.enabled:
            pipe.warmup()
        row["compile_s"] = time.perf_counter() - begun
        row["compile_counters"] = {k: v - before[k] for k, v in compile_counters().items()}
        sweep = []
        for batch in batches:
            settings = RenderSettings("a photo on the beach", "", args.steps, 7.0, size, size, "", adapters)
            seeds = tuple(range(batch))
            pipe(settings, seeds)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            sync()
            t0 = time.perf_counter()
            reps = 3
            for _ in range(reps):
                pipe(settings, seeds)
            sync()
            seconds = (time.perf_counter() - t0) / reps
            point = {"batch": batch, "seconds": seconds, "seconds_per_image": seconds / batch}
            if cuda:
                point["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
            sweep.append(point)
            print(json.dumps({"variant": spec, **point}), file=sys.stderr, flush=True)
        row["sweep"] = sweep
        if max(batches) > 1:
            # Batched images against single renders of the same seeds (fp16 on CUDA: not bit-equal).
            import numpy as np

            settings = RenderSettings("a photo on the beach", "", args.steps, 7.0, size, size, "", adapters)
            seeds = tuple(range(max(batches)))
            batched = pipe(settings, seeds)
            singles = [pipe(settings, (s,))[0] for s in seeds]
            row["batched_vs_single_max_diff"] = max(
                int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())
                for a, b in zip(batched, singles, strict=True)
            )
        if lora:
            # Product switches between renders: their cost, and whether any of them recompiled.
            before = compile_counters()
            settings = RenderSettings("a photo on the beach", "", 2, 7.0, size, size, "", (specs[1],))
            pipe(settings, (0,))
            switch = []
            with torch.inference_mode():  # as the pipeline activates them (its tensors are inference tensors)
                for i in range(20):
                    sync()
                    t0 = time.perf_counter()
                    pipe.adapters.activate((specs[i % 2],))
                    sync()
                    switch.append(time.perf_counter() - t0)
            pipe(settings, (0,))
            row["switch_s_median"] = statistics.median(switch)
            row["recompiles_across_switches"] = compile_counters()["graphs"] - before["graphs"]
        report["variants"][spec] = row
        del pipe
        gc.collect()
        torch._dynamo.reset()  # frees compiled code and CUDA graph pools before the next variant
        if cuda:
            torch.cuda.empty_cache()
    report["summary"] = _fast_summary(report, args)
    return report


def _fast_summary(report: dict, args) -> dict:
    """Per variant: s/image at batch 1 and at the auto batch, images/s, floor fraction, cost per 1,000 images."""
    from services.generator.options import CUDA_AUTO_BATCH

    out = {}
    for spec, row in report["variants"].items():
        sweep = {p["batch"]: p for p in row.get("sweep", [])}
        if not sweep:
            continue
        auto = CUDA_AUTO_BATCH if args.device.startswith("cuda") else 1
        at_auto = sweep.get(auto) or sweep[max(sweep)]
        best = at_auto["seconds_per_image"]
        out[spec] = {
            "seconds_per_image_batch_1": sweep[min(sweep)]["seconds_per_image"],
            "seconds_per_image_auto_batch": best,
            "auto_batch": at_auto["batch"],
            "images_per_second": 1 / best,
            "fraction_of_compute_floor": COMPUTE_FLOOR_S / best,
            "dollars_per_1000_images": best * 1000 / 3600 * args.gpu_price,
            "peak_cuda_mb": at_auto.get("peak_cuda_mb"),
            "switch_s_median": row.get("switch_s_median"),
            "recompiles_across_switches": row.get("recompiles_across_switches"),
            "batched_vs_single_max_diff": row.get("batched_vs_single_max_diff"),
        }
    return out


CACHE_CHILD = """
import json, sys, time
started = time.perf_counter()
from services.generator.compiled import compile_counters
from services.generator.options import CompileOptions
from services.generator.pipeline import ProductPipeline
fields = json.loads(sys.argv[3])
fields["warm_shapes"] = tuple(tuple(s) for s in fields["warm_shapes"])
pipe = ProductPipeline(sys.argv[1], sys.argv[2], compile=CompileOptions(**fields))
loaded = time.perf_counter()
warm = pipe.warmup()
print(json.dumps({"load_s": loaded - started, "warm_up_s": warm, "ready_s": time.perf_counter() - started,
                  **compile_counters()}))
"""


def cache_restart(args) -> dict:
    """Start-up to Ready, twice, in fresh processes sharing one new --compile-cache-dir: cold, then from the cache."""
    import subprocess

    size = args.size or 64
    mode = args.compile if args.compile not in ("auto", "off") else "default"
    runs = {}
    with tempfile.TemporaryDirectory() as cache:
        fields = {"mode": mode, "warm_shapes": [[size, size, 1]], "cache_dir": cache}
        for label in ("cold", "from_cache"):
            proc = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    CACHE_CHILD,
                    args.model,
                    args.device if args.device.startswith("cuda") else "cpu",
                    json.dumps(fields),
                ],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=1800,
            )
            if proc.returncode:
                return {"failed": proc.stderr.strip().splitlines()[-3:]}
            runs[label] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(json.dumps({label: runs[label]}), file=sys.stderr, flush=True)
    return {
        "mode": mode,
        "warm_shapes": [[size, size, 1]],
        **runs,
        "warm_up_ratio": runs["from_cache"]["warm_up_s"] / runs["cold"]["warm_up_s"],
        "ready_ratio": runs["from_cache"]["ready_s"] / runs["cold"]["ready_s"],
        "goal": "ready from the cache <= 0.2 of a cold compile",
    }


def components(args, catalog_dirs: tuple[str, str]) -> dict:
    """The parts behind the end-to-end figures, timed in this process on the benchmark's device."""
    import torch

    from services.common.pngmeta import encode_png
    from services.generator.catalog import Catalog
    from services.generator.pipeline import ProductPipeline, latents_to_preview

    def pipe_device(name: str) -> str:
        return name if name.startswith("cuda") else "cpu"

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def timed(fn, n: int) -> float:
        sync()
        started = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        return (time.perf_counter() - started) / n

    catalog = Catalog(*catalog_dirs, ROOT / "templates" / "catalog.yaml")
    specs = [catalog.product(p).spec(1.0) for p in (args.product, args.other_product)]
    report = {}
    with torch.inference_mode():
        pipe = None  # the cache-of-8 pipeline, kept for the sweep and the probe
        for label, capacity in (("cached", 8), ("reload", 1)):
            loaded = ProductPipeline(args.model, args.device, adapter_cache_size=capacity)
            cache = loaded.adapters
            for spec in reversed(specs):  # specs[0] last: "same" starts from a hit
                cache.activate((spec,))
            n = 20 if label == "cached" else 6
            report[f"activate_same_s_{label}"] = timed(partial(cache.activate, (specs[0],)), n)
            pair = itertools.cycle(specs)
            report[f"activate_switch_s_{label}"] = timed(lambda c=cache, p=pair: c.activate((next(p),)), n)
            if pipe is None:
                pipe = loaded
            del loaded, cache
        size = args.size or 512
        latents = torch.randn(1, 4, size // 8, size // 8, device=pipe_device(args.device))
        report["preview_s"] = timed(lambda: latents_to_preview(latents), 50)
        image = latents_to_preview(latents)[0]
        report["preview_png_s"] = timed(lambda: encode_png(image), 50)
        report["preview_png_bytes"] = len(encode_png(image))
        report["batch_sweep"] = batch_sweep(args, pipe, specs[0], timed)
        if catalog.adapters:
            report["stacked_style"] = stacked_style(args, pipe, specs[0], next(iter(catalog.adapters.values())), timed)
        # The demo templates' empty-scene set-up (a backdrop adapter, the scene drawn before the product joins).
        beach = next((t for t in catalog.templates.templates if t.id == "demo-beach"), None)
        backdrop = beach.placement if beach and beach.placement and beach.placement.backdrop else None
        extra = (catalog.adapter(backdrop.backdrop), backdrop.scene_first) if backdrop else None
        report["placement"] = placement_cost(args, pipe, specs[0], timed, extra)
        if args.probe_compile:  # last: it compiles the pipeline's UNet in place
            report["compile_probe"] = compile_probe(args, pipe, specs[0], timed)
    return report


def compile_probe(args, pipe, spec, timed) -> dict:
    """Experiment, not a service path yet: the UNet under torch.compile, against eager.

    PEFT layers stay unmerged (as the service runs them); mode reduce-overhead adds CUDA graphs,
    which is what a launch-bound batch 1 needs.
    """
    import torch

    from services.generator.messages import RenderSettings

    size = args.size or pipe.default_size
    settings = RenderSettings("a photo on the beach", "", args.steps, 7.0, size, size, "", (spec,))
    result: dict = {"mode": args.probe_compile, "size": size, "steps": args.steps}
    for label in ("eager", "compiled"):
        if label == "compiled":
            started = time.perf_counter()
            pipe.pipe.unet = torch.compile(pipe.pipe.unet, mode=args.probe_compile)
            for batch in (1, 4):
                pipe(settings, tuple(range(batch)))  # compile both shapes
            result["compile_s"] = time.perf_counter() - started
        for batch in (1, 4):
            pipe(settings, tuple(range(batch)))
            result[f"{label}_batch_{batch}_s"] = timed(lambda b=batch: pipe(settings, tuple(range(b))), 3)
    print(json.dumps(result), file=sys.stderr, flush=True)
    return result


def stacked_style(args, pipe, product, style, timed) -> dict:
    """Seconds per request of a product with a style stacked: plain stacking vs the style kept on the scene
    (services/generator/regional.py: three UNet evaluations per step), beside the product alone."""
    from dataclasses import replace

    from services.generator.messages import RenderSettings

    size = args.size or pipe.default_size
    alone = RenderSettings("a photo on the beach", "", args.steps, 7.0, size, size, "", (product,))
    stacked = replace(
        alone,
        prompt=f"a photo on the beach, {', '.join(style.manifest.tokens)}",
        adapters=(product, style.spec(style.manifest.default_scale)),
    )
    out = {
        "style": style.id,
        **time_each(
            pipe,
            timed,
            product_alone_s=alone,
            stacked_plain_s=replace(stacked, scene_only_styles=False),
            stacked_scene_only_s=stacked,
        ),
    }
    out["scene_only_over_plain"] = out["stacked_scene_only_s"] / out["stacked_plain_s"]
    print(json.dumps(out), file=sys.stderr, flush=True)
    return out


def time_each(pipe, timed, **settings) -> dict[str, float]:
    """Seconds for one 1-image request of each named `RenderSettings`, each warmed first."""
    out = {}
    for label, one in settings.items():
        pipe(one, (0,))  # warm
        out[label] = timed(lambda s=one: pipe(s, (0,)), 3)
    return out


def placement_cost(args, pipe, product, timed, backdrop=None) -> dict:
    """Seconds per placement request (a catalogue shot with the product adapter): the scene prompt with the
    product adapter off (placement.scene_adapters) against the request's prompt and adapter, beside plain
    text-to-image; with `backdrop` (an adapter entry and a scene_first), also as the demo templates serve it.
    The composite with a shadow is included in all."""
    from dataclasses import replace

    from demo.placement_eval import png_bytes, product_photo
    from services.generator import placement
    from services.generator.messages import RenderSettings, Shadow

    size = args.size or pipe.default_size
    photo, _ = product_photo("split-star", "white", size=size)
    placed, _ = placement.place_upload(
        png_bytes(photo),
        b"",
        None,
        placement.ProductBox(0.5, 0.5, 0.6),
        size,
        size,
        max_pixels=1 << 24,
        ground=0.85,
        shadow=Shadow(0.45, 0.5),
    )
    text = RenderSettings("a photo on the beach", "", args.steps, 7.0, size, size, "", (product,))
    one_prompt = replace(text, placement=placed)
    scene = replace(one_prompt, scene_prompt="on the beach")
    cases = dict(text2image_s=text, placement_one_prompt_s=one_prompt, placement_scene_s=scene)
    if backdrop is not None:
        entry, scene_first = backdrop
        cases["placement_empty_scene_s"] = replace(
            scene,
            scene_prompt=f"on the beach, {', '.join(entry.manifest.tokens)}",
            adapters=(product, entry.spec(entry.manifest.default_scale)),
            placement=replace(placed, scene_first=scene_first),
        )
    out: dict = {"size": size, **time_each(pipe, timed, **cases)}
    out["scene_over_one_prompt"] = out["placement_scene_s"] / out["placement_one_prompt_s"]
    print(json.dumps(out), file=sys.stderr, flush=True)
    return out


def batch_sweep(args, pipe, spec, timed) -> list[dict]:
    """Seconds per image and peak memory by batch size and image size: what --max-batch and
    --batch-pixels are chosen from."""
    import torch

    from services.generator.messages import RenderSettings

    cuda = args.device.startswith("cuda")
    base = args.size or pipe.default_size
    rows = []
    for scale, batches in ((1.0, (1, 2, 4, 8)), (1.5, (1, 2, 4))):
        size = int(base * scale) // pipe.size_multiple * pipe.size_multiple
        settings = RenderSettings("a photo on the beach", "", args.steps, 7.0, size, size, "", (spec,))
        for batch in batches:
            seeds = tuple(range(batch))
            pipe(settings, seeds)  # warm this shape
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            seconds = timed(lambda s=settings, b=seeds: pipe(s, b), 2)
            row = {"size": size, "batch": batch, "seconds": seconds, "seconds_per_image": seconds / batch}
            if cuda:
                row["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


async def main_async(args) -> dict:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        report = {
            "machine": {
                "python": platform.python_version(),
                "processor": platform.processor() or platform.machine(),
                "torch": torch.__version__,
                "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            },
            "model": args.model,
            "device": args.device,
            "steps": args.steps,
            "size": args.size or "model default",
            "template": args.template,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        for name, section in (
            ("simulated_devices", simulated_devices),
            ("product_switching", product_switching),
            ("first_image_and_batching", first_image_and_batching),
            ("service_overhead", service_overhead),
        ):
            if name not in args.skip:
                started = time.perf_counter()
                found = await section(args, out)
                report.update(found if name == "first_image_and_batching" else {name: found})
                print(f"{name}: {time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)
                _save(args, report)  # a later section that fails keeps this one's figures
        if "components" not in args.skip:
            report["components"] = components(args, (args.products_dir, args.adapters_dir))
        if "fast_path" not in args.skip:
            report["fast_path"] = fast_path(args, (args.products_dir, args.adapters_dir))
            _save(args, report)
        if "cache_restart" not in args.skip and (args.cache_restart or args.device.startswith("cuda")):
            report["cache_restart"] = cache_restart(args)
    return report


def _save(args, report: dict) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


def main(argv: list[str] | None = None) -> dict:
    embedded = ROOT / ".cache" / "embedded"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench-results" / "generator.json")
    p.add_argument(
        "--fullsize",
        type=Path,
        nargs="?",
        const=ROOT / ".cache" / "sd15-random",
        help="SD 1.5-sized random model built in this folder (benchmarks.fullsize); 512², 25 steps",
    )
    p.add_argument("--model", default=str(embedded / "tiny-sd"))
    p.add_argument("--products-dir", default=str(embedded / "products"))
    p.add_argument("--adapters-dir", default=str(embedded / "adapters"))
    p.add_argument("--product", default="tiny-star")
    p.add_argument("--other-product", default="tiny-mug")
    p.add_argument("--template", default="beach")
    p.add_argument("--device", default="cpu:1", help="device of the real-model benches: cpu:1 or cuda:0")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--size", type=int, default=0, help="width and height (0: the model's own)")
    p.add_argument("--rounds", type=int, default=4, help="interleaved blocks per switching condition")
    p.add_argument("--block", type=int, default=4, help="1-image requests per block (even)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved 4-image requests per condition")
    p.add_argument(
        "--probe-compile",
        default="",
        metavar="MODE",
        help="also time the UNet under torch.compile(mode=MODE), e.g. reduce-overhead (an experiment)",
    )
    p.add_argument("--compile", default="auto", help="the served path's --compile (auto: reduce-overhead on CUDA)")
    p.add_argument("--warm-shapes", default="auto", help="the served path's --warm-shapes")
    p.add_argument("--cache-dir", default=str(ROOT / ".cache" / "compile-bench"), help="--compile-cache-dir")
    p.add_argument(
        "--variants",
        nargs="*",
        default=None,
        help="fast_path variants, MODE[+flag...] with flags vae, channels_last, bf16, nosdpa, fuse_qkv "
        "(default on CUDA: eager, reduce-overhead and each switch; on CPU: off only)",
    )
    p.add_argument("--batches", default="", help="fast_path batch sizes (default: 1,2,4,8 on CUDA, 1,2 on CPU)")
    p.add_argument("--budget-s", type=float, default=1e9, help="fast_path skips variants started after this")
    p.add_argument("--gpu-price", type=float, default=2.5, help="$ per GPU-hour for the cost per 1,000 images")
    p.add_argument("--cache-restart", action="store_true", help="also on CPU: time a restart from the compile cache")
    p.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=[
            "simulated_devices",
            "product_switching",
            "first_image_and_batching",
            "service_overhead",
            "components",
            "fast_path",
            "cache_restart",
        ],
    )
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.variants is None:
        args.variants = CUDA_VARIANTS if cuda else ["off"]
    args.batches = args.batches or ("1,2,4,8" if cuda else "1,2")
    if args.fullsize:
        from benchmarks import fullsize

        args.model = str(fullsize.ensure(args.fullsize))
        args.products_dir, args.adapters_dir = str(args.fullsize / "products"), str(args.fullsize / "adapters")
        args.product, args.other_product = fullsize.PRODUCTS[0][0], fullsize.PRODUCTS[1][0]
        if args.steps == p.get_default("steps"):
            args.steps = 25
        args.size = args.size or 512
    from services.common.logs import configure_logging

    configure_logging("WARNING", "bench")
    report = asyncio.run(main_async(args))
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return save_report(args.out, report)


if __name__ == "__main__":
    main()
