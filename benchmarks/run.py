"""`make bench`: every benchmark, one JSON file each in --out."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

BENCHES = ["benchmarks.generator", "benchmarks.upscaler"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for module in BENCHES:
        name = module.rsplit(".", 1)[1]
        print(f"== {module}", flush=True)
        code = subprocess.call([sys.executable, "-m", module, "--out", str(args.out / f"{name}.json")])
        failed += code != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
