"""`make run`: generator (:50051), upscaler (:50052) and web UI (:7860) on the embedded default.

The trained demo models in models/ are used when they ship; otherwise the tiny random ones
that `make embedded` builds under .cache/embedded. A service that crashes is restarted with backoff
(the page shows its "unreachable" banner meanwhile); Ctrl-C (or SIGTERM) stops all three cleanly.
Every setting can still be overridden with the services' own PIA_* environment variables.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
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
    # The page's catalogue jobs list the generator's storage to resume (docs/CATALOGUE.md, "On the web page").
    env.setdefault("PIA_WEB_CATALOGUE_STORAGE", env["PIA_GENERATOR_STORAGE"])
    env.setdefault("PIA_WEB_GENERATOR", f"localhost:{env.get('PIA_GENERATOR_PORT', '50051')}")
    env.setdefault("PIA_WEB_UPSCALER", f"localhost:{env.get('PIA_UPSCALER_PORT', '50052')}")
    env.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    env.setdefault("HF_HUB_OFFLINE", "1")
    # No "Loading weights" progress bars in the log (transformers' bars follow huggingface_hub's switch).
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return env


SERVICES = [
    ("generator", [sys.executable, "-m", "services.generator"]),
    ("upscaler", [sys.executable, "-m", "services.upscaler"]),
    ("web", [sys.executable, "-m", "client.web"]),
]


# A crashed service comes back after 1, 2, 4 … 30 s; a run of RESET_AFTER_S seconds forgets earlier crashes.
BACKOFF_S, MAX_BACKOFF_S, RESET_AFTER_S = 1.0, 30.0, 60.0


@dataclass
class Service:
    name: str
    cmd: list[str]
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    crashes: int = 0
    restart_at: float | None = None

    def start(self, env: dict[str, str]) -> None:
        # Own process group: Ctrl-C reaches only this launcher, which then stops each service in order.
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=env, start_new_session=True)
        self.started_at, self.restart_at = time.monotonic(), None

    def check(self, env: dict[str, str]) -> None:
        """Restart this service with backoff if it has exited; say so on one line each time."""
        now = time.monotonic()
        if self.restart_at is not None:
            if now >= self.restart_at:
                self.start(env)
                print(f"{self.name} restarted (pid {self.proc.pid if self.proc else '?'})", flush=True)
            return
        if self.proc is None or self.proc.poll() is None:
            return
        code = self.proc.returncode
        if now - self.started_at >= RESET_AFTER_S:
            self.crashes = 0
        delay = min(MAX_BACKOFF_S, BACKOFF_S * 2**self.crashes)
        self.crashes += 1
        self.restart_at = now + delay
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        print(f"{self.name} {how}; restarting it in {delay:.0f} s (crash {self.crashes} in a row)", flush=True)

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)


def main() -> int:
    env = default_environment()
    print(f"model {env['PIA_GENERATOR_MODEL']}, products {env['PIA_GENERATOR_PRODUCTS_DIR']}", flush=True)
    services = [Service(name, cmd) for name, cmd in SERVICES]
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    for service in services:
        service.start(env)
    ports = [env.get(f"PIA_{n}_PORT", d) for n, d in (("GENERATOR", "50051"), ("UPSCALER", "50052"), ("WEB", "7860"))]
    print(
        f"generator :{ports[0]}, upscaler :{ports[1]}, web UI http://localhost:{ports[2]} — Ctrl-C stops all\n"
        f"  try: .venv/bin/python -m client.cli --generator localhost:{ports[0]} products\n"
        f"  try: .venv/bin/grpcurl -plaintext localhost:{ports[0]} list",
        flush=True,
    )
    while not stopping:
        for service in services:
            service.check(env)
        time.sleep(0.5)
    for service in reversed(services):
        service.terminate()
    deadline = time.monotonic() + 40
    for service in services:
        if service.proc is None:
            continue
        try:
            service.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"{service.name} did not stop in time; killing it", flush=True)
            service.proc.kill()
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
