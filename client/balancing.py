"""Replicas behind one target: the addresses it names, each one's health (for the web page's banner),
and what to tell the person when a stream breaks part-way (docs/DEPLOYMENT.md, "Several replicas").

The service config that spreads calls over the replicas travels on every channel (client/channel.py).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.channel import ChannelSecurity


def split_target(target: str) -> tuple[str, list[tuple[str, int]]]:
    """(scheme, [(host, port), ...]) of a gRPC target; names are not resolved here."""
    if target.startswith(("ipv4:", "ipv6:")):
        scheme, _, rest = target.partition(":")
        return scheme, [_host_port(address) for address in rest.split(",") if address]
    if target.startswith("dns:"):
        rest = target[len("dns:") :]
        if rest.startswith("//"):
            rest = rest[2:].partition("/")[2]  # dns://[authority]/host:port
        return "dns", [_host_port(rest)]
    if target.startswith("unix:"):
        return "unix", []
    return "dns", [_host_port(target)]


def _host_port(address: str) -> tuple[str, int]:
    if address.startswith("["):
        host, _, port = address[1:].partition("]:")
    else:
        host, _, port = address.rpartition(":")
    return host, int(port or 443)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def replica_addresses(target: str) -> list[str]:
    """Every `ip:port` the target stands for, in the order gRPC would connect (duplicates dropped)."""
    scheme, pairs = split_target(target)
    if scheme == "unix":
        return [target]
    if scheme in ("ipv4", "ipv6"):
        return [_join(host, port) for host, port in pairs]
    loop = asyncio.get_running_loop()
    addresses: list[str] = []
    for host, port in pairs:
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            addresses.append(_join(host, port))  # unresolvable: reported as unreachable
            continue
        for *_, sockaddr in infos:
            address = _join(str(sockaddr[0]), port)
            if address not in addresses:
                addresses.append(address)
    return addresses


async def replica_health(
    target: str, security: ChannelSecurity | None = None, service: str = "", timeout: float = 2.0
) -> dict[str, str]:
    """{address: 'SERVING' | 'NOT_SERVING' | 'UNREACHABLE'} for each replica behind `target`."""
    security = security or ChannelSecurity()
    _, pairs = split_target(target)
    # Certificates name the service, not the pod's IP: verify against the name the target used.
    options = [("grpc.ssl_target_name_override", pairs[0][0])] if pairs and security.tls else []

    async def one(address: str) -> str:
        channel = security.open(address, options=[*options, ("grpc.enable_retries", 0)])
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.aio.AioRpcError:
            return "UNREACHABLE"
        finally:
            await channel.close()
        return "SERVING" if reply.status == health_pb2.HealthCheckResponse.SERVING else "NOT_SERVING"

    addresses = await replica_addresses(target)
    return dict(zip(addresses, await asyncio.gather(*(one(a) for a in addresses)), strict=True))


def replicas_line(health: dict[str, str], what: str = "Generator") -> str:
    """'Generator replicas: 1 of 2 up (127.0.0.1:5001 up, 127.0.0.1:5002 unreachable).'; '' for one replica."""
    if len(health) < 2:
        return ""
    words = {"SERVING": "up", "NOT_SERVING": "starting", "UNREACHABLE": "unreachable"}
    up = sum(state == "SERVING" for state in health.values())
    each = ", ".join(f"{address} {words[state]}" for address, state in health.items())
    return f"{what} replicas: {up} of {len(health)} up ({each})."


def interrupted_stream_message(exc: grpc.aio.AioRpcError, images_received: int, images_expected: int) -> str:
    """What to tell the person when a stream broke after it had started: not retried, and why."""
    reason = exc.details() or exc.code().name
    if images_received:
        done = f"{images_received} of {images_expected} images arrived and are kept"
    else:
        done = "no image had arrived yet"
    return (
        f"The request stopped part-way ({exc.code().name}: {reason}): {done}. It was not retried automatically, "
        "because it had already started (a retry would render again); run it again for the rest."
    )


async def replicas_banner(target: str, security: ChannelSecurity | None = None, what: str = "Generator") -> str:
    """The banner line for a target that names replicas (`dns:///...`, `ipv4:a,b`); '' for a plain host:port."""
    scheme, pairs = split_target(target)
    if not target.startswith(("dns:", "ipv4:", "ipv6:")) or (scheme != "dns" and len(pairs) < 2):
        return ""
    return replicas_line(await replica_health(target, security), what)


async def reporting_interruption(
    call: AsyncIterator[Any], images_received: Callable[[], int], images_expected: int, report: Callable[[str], Any]
) -> AsyncIterator[Any]:
    """Yield a stream's events; when it breaks after its first event, `report` what happened, then re-raise."""
    started = False
    try:
        async for event in call:
            started = True
            yield event
    except grpc.aio.AioRpcError as exc:
        if started:
            report(interrupted_stream_message(exc, images_received(), images_expected))
        raise
