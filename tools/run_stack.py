"""`make run`: generator (:50051), upscaler (:50052) and web UI (:7860) on the embedded default.

The trained demo models in models/ are used when they ship; otherwise the tiny random ones
that `make embedded` builds under .cache/embedded. Ctrl-C (or SIGTERM) stops all three cleanly.
Every setting can still be overridden with the services' own PIA_* environment variables.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED = ROOT / ".cache" / "embedded"


def default_environment() -> dict[str, str]:
    env = dict(os.environ)
    demo_sd = ROOT / "models" / "demo-sd"
    if (demo_sd / "model_index.json").exists() and any((ROOT / "products").glob("*/manifest.yaml")):
        env.setdefault("PIA_GENERATOR_MODEL", str(demo_sd))
        env.setdefault("PIA_GENERATOR_PRODUCTS_DIR", str(ROOT / "products"))
        env.setdefault("PIA_GENERATOR_ADAPTERS_DIR", str(ROOT / "adapters"))
    else:
        env.setdefault("PIA_GENERATOR_MODEL", str(EMBEDDED / "tiny-sd"))
        env.setdefault("PIA_GENERATOR_PRODUCTS_DIR", str(EMBEDDED / "products"))
        env.setdefault("PIA_GENERATOR_ADAPTERS_DIR", str(EMBEDDED / "adapters"))
        env.setdefault("PIA_GENERATOR_DEFAULT_SIZE", "64")
        env.setdefault("PIA_GENERATOR_DEFAULT_STEPS", "10")
    demo_sr = ROOT / "models" / "demo-swin2sr"
    env.setdefault("PIA_UPSCALER_MODEL", str(demo_sr if (demo_sr / "config.json").exists() else EMBEDDED / "tiny-sr"))
    # Loopback only: `make run` is for this machine. Serving beyond it needs a token (docs/SECURITY.md).
    for name in ("GENERATOR", "UPSCALER", "WEB"):
        env.setdefault(f"PIA_{name}_HOST", "127.0.0.1")
    storage = str(ROOT / "outputs")
    env.setdefault("PIA_GENERATOR_STORAGE", storage)
    env.setdefault("PIA_UPSCALER_STORAGE", storage)
    env.setdefault("PIA_WEB_GENERATOR", f"localhost:{env.get('PIA_GENERATOR_PORT', '50051')}")
    env.setdefault("PIA_WEB_UPSCALER", f"localhost:{env.get('PIA_UPSCALER_PORT', '50052')}")
    env.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


SERVICES = [
    ("generator", [sys.executable, "-m", "services.generator"]),
    ("upscaler", [sys.executable, "-m", "services.upscaler"]),
    ("web", [sys.executable, "-m", "client.web"]),
]


def main() -> int:
    env = default_environment()
    print(f"model {env['PIA_GENERATOR_MODEL']}, products {env['PIA_GENERATOR_PRODUCTS_DIR']}", flush=True)
    procs: list[tuple[str, subprocess.Popen]] = []
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    for name, cmd in SERVICES:
        # Own process groups: Ctrl-C reaches only this launcher, which then stops each service in order.
        procs.append((name, subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)))
    ports = [env.get(f"PIA_{n}_PORT", d) for n, d in (("GENERATOR", "50051"), ("UPSCALER", "50052"), ("WEB", "7860"))]
    print(
        f"generator :{ports[0]}, upscaler :{ports[1]}, web UI http://localhost:{ports[2]} — Ctrl-C stops all",
        flush=True,
    )
    code = 0
    while not stopping:
        for name, proc in procs:
            if proc.poll() is not None:
                print(f"{name} exited with code {proc.returncode}; stopping the stack", flush=True)
                stopping, code = True, proc.returncode or 1
        time.sleep(0.5)
    for _, proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 40
    for name, proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"{name} did not stop in time; killing it", flush=True)
            proc.kill()
    print("stopped", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
