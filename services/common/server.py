"""Server assembly shared by both services: error boundary, health, reflection, graceful stop."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.auth import ServerSecurity
from services.common.errors import ErrorBoundary

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass
class Service:
    """One gRPC service to host: its full name, its servicer and the generated `add_*_to_server`."""

    name: str
    servicer: Any
    register: Callable[[Any, grpc.aio.Server], None]


class HostedServer:
    """A grpc.aio server with the error boundary, health (NOT_SERVING until told) and reflection.

    `security` adds the token check (inside the error boundary, so refusals are deliberate statuses)
    and TLS; without it the server is open plaintext, as tests on loopback want.
    """

    def __init__(
        self,
        services: Iterable[Service],
        interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
        security: ServerSecurity | None = None,
        max_receive_bytes: int = MAX_MESSAGE_BYTES,
    ):
        self.services = list(services)
        self.security = security or ServerSecurity()
        self.server = grpc.aio.server(
            interceptors=[ErrorBoundary(), *self.security.interceptors(), *interceptors],
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                # Sized per service to what a request can need: a bigger one costs memory before any check.
                ("grpc.max_receive_message_length", max_receive_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        for svc in self.services:
            svc.register(svc.servicer, self.server)
        reflection.enable_server_reflection(
            [svc.name for svc in self.services] + [health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        address = f"{host}:{port}"
        credentials = self.security.credentials
        self.port = (
            self.server.add_secure_port(address, credentials) if credentials else self.server.add_insecure_port(address)
        )
        if self.port == 0:
            raise RuntimeError(f"could not bind {host}:{port}")
        await self.server.start()
        await self.set_serving(False)
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = SERVING if serving else NOT_SERVING
        await self.health.set("", status)
        for svc in self.services:
            await self.health.set(svc.name, status)

    async def stop(self, grace: float) -> None:
        await self.set_serving(False)
        await self.server.stop(grace)


async def serve_until_signal(
    hosted: HostedServer,
    grace_s: float,
    on_stop: Callable[[], Awaitable[None]] | None = None,
    drain: Callable[[float], Awaitable[None]] | None = None,
) -> None:
    """Run until SIGTERM/SIGINT, then: stop accepting, let running requests finish up to `grace_s`."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining for up to %.0fs", grace_s)
    await hosted.set_serving(False)
    deadline = loop.time() + grace_s
    if drain is not None:
        await drain(grace_s)
    # One grace period in all: the server gets what the drain left, then cuts streams still open
    # (a client that stopped reading would otherwise hold the exit for a second grace period).
    await hosted.stop(max(0.0, deadline - loop.time()))
    if on_stop is not None:
        await on_stop()
    log.info("stopped")


def start_metrics(port: int | None, host: str = "127.0.0.1") -> None:
    """Prometheus endpoint, on the service's own interface (it has no token check: keep it private)."""
    if port is None:
        return
    from prometheus_client import start_http_server

    start_http_server(port, addr=host)
    log.info("metrics on %s:%d/metrics", host, port)
