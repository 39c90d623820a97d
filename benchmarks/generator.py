"""Generator benchmarks (not tests): JSON with side-by-side measurements from one run.

    python -m benchmarks.generator --out bench-results/generator.json            # tiny model, CPU
    python -m benchmarks.generator --fullsize --device cuda:0                     # SD 1.5 size, GPU

- scheduler efficiency with 4 simulated devices (stand-in pipeline, fixed time per step);
- throughput alternating 2 products vs 1 product, and the cost of reloading on every switch;
- time to first image for n=4 on one device;
- micro-batching (max_batch 1 vs 4) and step-preview overhead;
- the parts behind those figures, timed in-process: an adapter switch, a reload, one preview.

Conditions that are compared run interleaved on the same server (A B A B ...), so drift in a shared
machine's speed falls on both sides instead of on whichever ran second.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import platform
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import grpc

from client.api import generate_request
from productinaction.v1 import generator_pb2_grpc
from services.generator.app import start_generator
from services.generator.settings import GeneratorSettings

ROOT = Path(__file__).resolve().parent.parent
STANDIN = "services.generator.standin:StandInPipeline"


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
        ):
            if name not in args.skip:
                started = time.perf_counter()
                found = await section(args, out)
                report.update(found if name == "first_image_and_batching" else {name: found})
                print(f"{name}: {time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)
        if "components" not in args.skip:
            report["components"] = components(args, (args.products_dir, args.adapters_dir))
    return report


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
    p.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["simulated_devices", "product_switching", "first_image_and_batching", "components"],
    )
    args = p.parse_args(argv)
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
