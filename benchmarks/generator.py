"""Generator benchmarks (not tests): JSON with side-by-side measurements from one run.

    python -m benchmarks.generator --out bench-results/generator.json

- scheduler efficiency with 4 simulated devices (stand-in pipeline, fixed time per step);
- throughput alternating 2 products vs 1 product, and the cost of reloading on every switch;
- time to first image for n=4 on one device;
- micro-batching (max_batch 1 vs 4) and step-preview overhead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import grpc

from client.api import generate_request
from productinaction.v1 import generator_pb2_grpc
from services.generator.app import start_generator
from services.generator.settings import GeneratorSettings

ROOT = Path(__file__).resolve().parent.parent
STANDIN = "services.generator.standin:StandInPipeline"


async def _serve(settings: GeneratorSettings):
    app = await start_generator(settings)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    return app, channel, generator_pb2_grpc.GeneratorStub(channel)


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
        app, channel, stub = await _serve(
            _settings(args, out, model=f"standin:step={step}", worker_pipeline=STANDIN, devices=devices, cpu_threads=1)
        )
        try:
            await _request(stub, product_id=args.product, template_id="beach", num_images=4, steps=2)  # warm
            results[devices] = await _request(
                stub, product_id=args.product, template_id="beach", num_images=16, steps=10
            )
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


async def product_switching(args, out: Path) -> dict:
    other = args.other_product
    rounds = args.rounds
    runs = {}
    for label, cache in (("cached", 8), ("reload_every_switch", 1)):
        app, channel, stub = await _serve(_settings(args, out, adapter_cache_size=cache))
        try:
            for product in (args.product, other):
                await _request(stub, product_id=product, template_id="beach", num_images=1, seed=1)
            same = [
                await _request(stub, product_id=args.product, template_id="beach", num_images=1, seed=i)
                for i in range(rounds)
            ]
            alternating = [
                await _request(stub, product_id=(args.product, other)[i % 2], template_id="beach", num_images=1, seed=i)
                for i in range(rounds)
            ]
        finally:
            await channel.close()
            await app.stop()
        one = statistics.median(r["total_s"] for r in same)
        two = statistics.median(r["total_s"] for r in alternating)
        runs[label] = {"seconds_per_image_1_product": one, "seconds_per_image_alternating": two, "ratio": one / two}
    return {
        "requests_per_mode": rounds,
        "throughput_ratio_alternating_vs_single": runs["cached"]["ratio"],
        "goal": ">= 0.95",
        "cached": runs["cached"],
        "reload_every_switch": runs["reload_every_switch"],
        "reload_cost_s_per_switch": runs["reload_every_switch"]["seconds_per_image_alternating"]
        - runs["cached"]["seconds_per_image_alternating"],
    }


async def first_image_and_batching(args, out: Path) -> dict:
    result = {}
    for label, overrides in (("batch_1", {"max_batch": 1}), ("batch_4", {"max_batch": 4})):
        app, channel, stub = await _serve(_settings(args, out, **overrides))
        try:
            await _request(stub, product_id=args.product, template_id="beach", num_images=4, seed=0)
            runs = [
                await _request(stub, product_id=args.product, template_id="beach", num_images=4, seed=i)
                for i in range(args.repeats)
            ]
            if label == "batch_1":
                previews = [
                    await _request(
                        stub, product_id=args.product, template_id="beach", num_images=4, seed=i, preview_every=1
                    )
                    for i in range(args.repeats)
                ]
        finally:
            await channel.close()
            await app.stop()
        result[label] = {
            "seconds_4_images": statistics.median(r["total_s"] for r in runs),
            "first_image_s": statistics.median(r["first_s"] for r in runs),
        }
        if label == "batch_1":
            result["previews_every_step_seconds_4_images"] = statistics.median(r["total_s"] for r in previews)
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
            "first_image_s_batch_4": result["batch_4"]["first_image_s"],
        },
        "step_previews": {
            "seconds_4_images_off": b1["seconds_4_images"],
            "seconds_4_images_every_step": result["previews_every_step_seconds_4_images"],
            "overhead": result["previews_every_step_seconds_4_images"] / b1["seconds_4_images"] - 1,
            "goal": "<= 0.05",
        },
    }


async def main_async(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        report = {
            "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine()},
            "model": args.model,
            "device": args.device,
            "steps": args.steps,
        }
        report["simulated_devices"] = await simulated_devices(args, out)
        report["product_switching"] = await product_switching(args, out)
        report.update(await first_image_and_batching(args, out))
    return report


def main(argv: list[str] | None = None) -> dict:
    embedded = ROOT / ".cache" / "embedded"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench-results" / "generator.json")
    p.add_argument("--model", default=str(embedded / "tiny-sd"))
    p.add_argument("--products-dir", default=str(embedded / "products"))
    p.add_argument("--adapters-dir", default=str(embedded / "adapters"))
    p.add_argument("--product", default="tiny-star")
    p.add_argument("--other-product", default="tiny-mug")
    p.add_argument("--device", default="cpu:1", help="device of the real-model benches: cpu:1 or cuda:0")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    from services.common.logs import configure_logging

    configure_logging("WARNING", "bench")
    report = asyncio.run(main_async(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
