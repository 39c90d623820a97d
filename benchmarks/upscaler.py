"""Upscaler benchmark: seconds and peak memory of the real Swin2SR x4 architecture, tiled vs untiled.

    python -m benchmarks.upscaler --out bench-results/upscaler.json

The model is `caidas/swin2SR-classical-sr-x4-64`'s architecture built from its config with random
weights (no download; compute and memory do not depend on the weight values). It goes through the
service's own Swin2SREngine and tiling code. Every (device, size, mode) runs in a fresh child
process, because peak RSS only ever grows within a process; a run past --timeout is killed and
recorded as such.

Memory: on CPU, the child's peak RSS (getrusage ru_maxrss) and its rise over the RSS after load and
warm-up; tracemalloc cannot see torch's allocations. On CUDA, torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# caidas/swin2SR-classical-sr-x4-64 (Swin2SR_ClassicalSR_X4_64): SwinIR-medium sized, 12.2M parameters.
CLASSICAL_X4 = dict(
    image_size=64,
    patch_size=1,
    num_channels=3,
    embed_dim=180,
    depths=[6, 6, 6, 6, 6, 6],
    num_heads=[6, 6, 6, 6, 6, 6],
    window_size=8,
    mlp_ratio=2.0,
    upscale=4,
    img_range=1.0,
    resi_connection="1conv",
    upsampler="pixelshuffle",
)


def build_model(out: Path) -> Path:
    import torch
    from transformers import Swin2SRConfig, Swin2SRForImageSuperResolution, Swin2SRImageProcessor

    torch.manual_seed(0)
    model = Swin2SRForImageSuperResolution(Swin2SRConfig(**CLASSICAL_X4)).eval()
    model.save_pretrained(out, safe_serialization=True)
    Swin2SRImageProcessor(do_rescale=True, rescale_factor=1 / 255, do_pad=True, size_divisor=8).save_pretrained(out)
    return out


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(model: str, device: str, size: int, tile: int, overlap: int, threads: int, variant: str = "default") -> dict:
    """One measurement, in this (fresh) process; `variant` is "default" or flags joined by "+" from
    fp16, bf16, fp32, channels_last, compile (mode default), compile-reduce-overhead."""
    import resource

    import numpy as np
    import torch
    from PIL import Image

    from services.upscaler.engine import Swin2SREngine, upscale_image, warm_up
    from services.upscaler.tiling import plan_tiles

    flags = set(variant.split("+")) - {"default"}
    dtype = next((f for f in ("fp16", "bf16", "fp32") if f in flags), "auto")
    mode = "reduce-overhead" if "compile-reduce-overhead" in flags else "default" if "compile" in flags else "off"
    engine = Swin2SREngine(
        model, device, threads=threads, dtype=dtype, channels_last="channels_last" in flags, compile=mode
    )
    engine.load()
    started = time.perf_counter()
    warm_up(engine)
    if mode != "off":  # compile the shapes this run uses (the plan's tiles) before timing it
        rng0 = np.random.default_rng(0)
        upscale_image(engine, Image.fromarray(rng0.integers(0, 256, (size, size, 3), dtype=np.uint8)), tile, overlap)
    warm_seconds = time.perf_counter() - started
    rng = np.random.default_rng(size)
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")
    plan = plan_tiles(size, size, tile, overlap, engine.align)
    cuda = engine.device_name.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = _rss_mb()
    started = time.perf_counter()
    out = upscale_image(engine, image, tile, overlap)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    result = {
        "variant": variant,
        "warm_up_s": round(warm_seconds, 2),
        "seconds": round(seconds, 3),
        "tiles": plan.total,
        "tile_px": [plan.tile_h, plan.tile_w],
        "output": list(out.size),
        # Pixels the model computed over the image's: the price of the overlap.
        "computed_pixels_ratio": round(
            sum(min(plan.tile_h, size - y) * min(plan.tile_w, size - x) for y in plan.ys for x in plan.xs) / size**2, 3
        ),
        "torch_threads": torch.get_num_threads(),
        "dtype": str(engine.model.dtype),
        # This machine may be shared: the 1-minute load average puts the seconds in context.
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result.update(peak_rss_mb=round(peak_rss, 1), peak_rss_over_loaded_mb=round(peak_rss - rss_before, 1))
    if cuda:
        result["cuda_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def run_one(
    args, model: Path, device: str, size: int, mode: str, tile: int, overlap: int, variant: str = "default"
) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.upscaler", "--child", "--model", str(model), "--device", device]
    cmd += ["--size", str(size), "--tile", str(tile), "--overlap", str(overlap), "--threads", str(args.threads)]
    cmd += ["--variant", variant]
    entry: dict = {"device": device, "size": size, "mode": mode, "tile": tile, "overlap": overlap, "variant": variant}
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        entry.update(status="timeout", seconds=None, note=f"killed after {args.timeout:.0f}s")
        return entry
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        entry.update(status="failed", returncode=proc.returncode, error=" | ".join(tail))
        return entry
    entry.update(status="ok", **json.loads(proc.stdout.strip().splitlines()[-1]))
    entry["process_seconds"] = round(time.perf_counter() - started, 1)
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-results/upscaler.json"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument(
        "--tiles",
        nargs="+",
        default=["64:16", "256:32"],
        help="tile:overlap settings to compare with untiled (256:32 is the service default)",
    )
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda:0 when present")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before a run is killed")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["default"],
        help="engine switches to compare: default, or flags joined by '+' from fp16, bf16, fp32, channels_last, "
        "compile, compile-reduce-overhead (e.g. default channels_last fp16+compile)",
    )
    parser.add_argument("--variant", default="default", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=128, help=argparse.SUPPRESS)
    parser.add_argument("--tile", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--overlap", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    if args.child:
        print(
            json.dumps(child(args.model, args.device, args.size, args.tile, args.overlap, args.threads, args.variant))
        )
        return

    import torch

    devices = args.devices or (["cpu"] + (["cuda:0"] if torch.cuda.is_available() else []))
    report: dict = {
        "benchmark": "upscaler",
        "model": "swin2SR-classical-sr-x4-64 architecture, random weights",
        "config": CLASSICAL_X4,
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "load_average_at_start": list(os.getloadavg()),
            "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "settings": {"threads": args.threads, "timeout_s": args.timeout},
        "memory_method": "CPU: child peak RSS (ru_maxrss) and its rise over the loaded+warm RSS; "
        "CUDA: torch.cuda.max_memory_allocated",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "runs": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "swin2sr-classical-x4-random")
        for device in devices:
            for size in args.sizes:
                modes = [("untiled", size, 0)]
                for spec in args.tiles:
                    tile, overlap = (int(v) for v in spec.split(":"))
                    if tile < size:  # otherwise it is one tile: the untiled run
                        modes.append((f"tiled-{tile}", tile, overlap))
                for (mode, tile, overlap), variant in itertools.product(modes, args.variants):
                    entry = run_one(args, model, device, size, mode, tile, overlap, variant)
                    report["runs"].append(entry)
                    print(json.dumps(entry), flush=True)
                    args.out.write_text(json.dumps(report, indent=2))
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
