"""Server assembly shared by both services: error boundary, health, reflection, graceful stop, metrics."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import make_wsgi_app

from services.common.auth import ServerSecurity, TokenAuth
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


class MetricsServer:
    """Prometheus metrics over HTTP, in a daemon thread, on the service's own interface.

    With tokens (the service's own) every request needs `Authorization: Bearer <token>`, checked
    as gRPC calls are (TokenAuth); anything else gets 401. Without tokens it is open, like the gRPC port.
    """

    def __init__(self, port: int, host: str = "127.0.0.1", tokens: Sequence[str] = ()):
        app = make_wsgi_app()
        if tokens:
            app = _bearer_only(app, TokenAuth(tokens))
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        server_class = _HTTP6Server if family == socket.AF_INET6 else _HTTPServer
        self._httpd = make_server(host, port, app, server_class, handler_class=_QuietHandler)
        self.port = self._httpd.server_port
        threading.Thread(target=self._httpd.serve_forever, name="metrics", daemon=True).start()
        log.info("metrics on %s:%d/metrics (%s)", host, self.port, "token required" if tokens else "open")

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def start_metrics(port: int | None, host: str = "127.0.0.1", tokens: Sequence[str] = ()) -> MetricsServer | None:
    """The metrics endpoint on `port` (None: no endpoint). Pass the service's tokens (ServerSecurity.tokens)."""
    return None if port is None else MetricsServer(port, host, tokens)


class _HTTPServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape that never finishes does not hold the exit


class _HTTP6Server(_HTTPServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No access log: a scrape every few seconds would drown the service's own lines."""


def _bearer_only(app: WSGIApplication, auth: TokenAuth) -> WSGIApplication:
    def guarded(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        problem = auth.header_problem(environ.get("HTTP_AUTHORIZATION"))
        if problem is None:
            return app(environ, start_response)
        log.info("refused %s from %s: %s", environ.get("PATH_INFO"), environ.get("REMOTE_ADDR"), problem)
        headers = [("Content-Type", "text/plain; charset=utf-8"), ("WWW-Authenticate", 'Bearer realm="metrics"')]
        start_response("401 Unauthorized", headers)
        return [f"{problem}\n".encode()]

    return guarded
