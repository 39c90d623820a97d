"""Health probe for containers: exit 0 when the service says it can serve, 1 otherwise.

    python -m services.common.probe generator      # grpc.health.v1 Check on $PIA_GENERATOR_PORT (50051)
    python -m services.common.probe upscaler       # ... on $PIA_UPSCALER_PORT (50052)
    python -m services.common.probe web            # HTTP GET / on $PIA_WEB_PORT (7860)
    python -m services.common.probe generator --target 10.0.0.7:50051

The Dockerfiles' HEALTHCHECK and compose's healthcheck run it; Kubernetes uses its native gRPC
probe on the same health service instead. Health is open without a token (services/common/auth.py),
so the probe needs none. Only the standard library and grpcio: it must start fast every few seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass


@dataclass(frozen=True)
class Probe:
    env_prefix: str
    default_port: int
    health_service: str | None  # None: an HTTP service


PROBES = {
    "generator": Probe("PIA_GENERATOR_", 50051, "productinaction.v1.Generator"),
    "upscaler": Probe("PIA_UPSCALER_", 50052, "productinaction.v1.Upscaler"),
    "web": Probe("PIA_WEB_", 7860, None),
}


def check_grpc(target: str, service: str, timeout: float, ca_file: str | None = None) -> tuple[bool, str]:
    """grpc.health.v1 Check of `service` at `target`; (serving, what it said)."""
    import grpc  # only here: the web probe, run every few seconds, starts without loading grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc  # likewise only for the gRPC probes

    if ca_file:
        with open(ca_file, "rb") as f:
            channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=f.read()))
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def check_http(url: str, timeout: float) -> tuple[bool, str]:
    """GET `url`; (a 2xx answer, what it said)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 200 <= response.status < 300, f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}"
    except OSError as exc:
        return False, f"unreachable: {exc}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m services.common.probe", description=__doc__.split("\n\n")[0])
    p.add_argument("service", choices=sorted(PROBES))
    p.add_argument("--target", help="host:port to probe (default: 127.0.0.1 and the service's PIA_*_PORT)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds")
    p.add_argument("--tls-ca-file", default=None, help="CA (PEM) when the service serves TLS")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    probe = PROBES[args.service]
    target = args.target or f"127.0.0.1:{os.environ.get(probe.env_prefix + 'PORT') or probe.default_port}"
    if probe.health_service is None:
        ok, said = check_http(f"http://{target}/", args.timeout)
    else:
        ok, said = check_grpc(target, probe.health_service, args.timeout, args.tls_ca_file)
    print(f"{args.service} at {target}: {said}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
