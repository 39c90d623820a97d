"""`make bench`: every benchmark, one JSON file each in --out.

On a machine with CUDA the generator also runs on an SD 1.5-sized random model on cuda:0
(`generator-cuda.json`); the tiny-model CPU run stays, so figures compare across machines.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

BENCHES = [
    ("generator", ["benchmarks.generator"]),
    ("upscaler", ["benchmarks.upscaler"]),
    ("soak", ["benchmarks.soak"]),  # 20 clients x 200 requests: latency, throughput, RSS and fds over time
    ("catalogue", ["benchmarks.catalogue"]),  # 1,000 images: the runner against plain Generate calls, resume
    ("catalogue-demo", ["benchmarks.catalogue_demo"]),  # the demo catalogue on the demo model, 1 vs 2 replicas
]
CUDA_BENCHES = [("generator-cuda", ["benchmarks.generator", "--fullsize", "--device", "cuda:0"])]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    benches = BENCHES + (CUDA_BENCHES if torch.cuda.is_available() else [])
    failed = 0
    for name, command in benches:
        print(f"== {name}: {' '.join(command)}", flush=True)
        code = subprocess.call([sys.executable, "-m", *command, "--out", str(args.out / f"{name}.json")])
        failed += code != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
