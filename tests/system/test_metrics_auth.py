"""/metrics and the token: a service with a token configured serves its metrics only to a caller that
sends the same `Authorization: Bearer <token>` (401 otherwise); without a token they are open, as before.
Real HTTP over real sockets: the endpoint itself, then each service started as it ships."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path

import pytest

from services.common.server import start_metrics
from tests.helpers import ROOT, free_port

OLD, NEW, WRONG = "tok-old-Mq71z", "tok-new-Rt44v", "tok-wrong-Hb90c"


def _get(port: int, authorization: str | None = None) -> tuple[int, str, Message]:
    """(status, body, headers) of GET /metrics, with that Authorization header (None: without one)."""
    headers = {"Authorization": authorization} if authorization else {}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode(), response.headers
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read().decode(), refused.headers


def _check_token_required(port: int) -> None:
    for authorization, problem in [
        (None, "missing bearer token"),
        (f"Bearer {WRONG}", "invalid bearer token"),
        (f"Bearer {OLD[:-1]}", "invalid bearer token"),
        (f"Basic {OLD}", "malformed"),
        ("Bearer", "malformed"),
    ]:
        status, body, headers = _get(port, authorization)
        assert status == 401 and problem in body, (authorization, status, body)
        assert headers["WWW-Authenticate"].startswith("Bearer")
        assert OLD not in body and NEW not in body and WRONG not in body
    for token in (OLD, NEW):  # either token of a rotation
        status, body, _ = _get(port, f"Bearer {token}")
        assert status == 200 and "python_info" in body


def _check_open(port: int) -> None:
    for authorization in (None, f"Bearer {WRONG}"):
        status, body, _ = _get(port, authorization)
        assert status == 200 and "python_info" in body


def test_endpoint_with_tokens_needs_one():
    server = start_metrics(free_port(), tokens=(OLD, NEW))
    assert server is not None
    try:
        _check_token_required(server.port)
    finally:
        server.close()


def test_endpoint_without_tokens_is_open():
    server = start_metrics(free_port())
    assert server is not None
    try:
        _check_open(server.port)
    finally:
        server.close()
    assert start_metrics(None) is None


def _command(service: str, port: int, metrics_port: int, tmp: Path, world: Path) -> list[str]:
    common = ["--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics_port)]
    common += ["--storage", str(tmp / "images"), "--log-level", "WARNING"]
    if service == "upscaler":
        extra = ["--engine", "tests.fixtures_upscaler:BicubicEngine"]
    else:
        extra = ["--model", "standin:step=0.01", "--worker-pipeline", "services.generator.standin:StandInPipeline"]
        extra += ["--devices", "cpu:1", "--products-dir", str(world / "products")]
        extra += ["--adapters-dir", str(world / "adapters"), "--grace-period-s", "1"]
    return [sys.executable, "-m", f"services.{service}", *common, *extra]


def _wait_for_metrics(proc: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            _get(port)
            return
        except (urllib.error.URLError, ConnectionError):
            assert time.monotonic() < deadline, "no /metrics within 180 s"
            time.sleep(0.2)


@pytest.mark.parametrize(
    ("service", "with_token"),
    [
        ("generator", True),
        ("generator", False),
        ("upscaler", True),
        ("upscaler", False),
    ],
)
def test_service_metrics_follow_its_token(service, with_token, tiny_world, tmp_path):
    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIA_")}
    if with_token:
        env[f"PIA_{service.upper()}_TOKEN"] = f"{OLD},{NEW}"
    log = tmp_path / f"{service}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            _command(service, port, metrics_port, tmp_path, tiny_world),
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the generator's workers go with it
        )
    try:
        _wait_for_metrics(proc, metrics_port, log)
        (_check_token_required if with_token else _check_open)(metrics_port)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
