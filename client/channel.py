"""The one place client channels are made: plaintext or TLS (optionally mutual), with a bearer token.

    channel = open_channel("gpu-1.example:50051", token=token, ca_file="ca.pem")

The token goes on every call as `authorization: Bearer <token>` (docs/SECURITY.md). Without TLS
it crosses the network in clear text, so use a token without TLS only on loopback or a private network.

Every channel also carries SERVICE_CONFIG, which spreads calls over service replicas
(docs/DEPLOYMENT.md, "Several replicas"):

- `round_robin`: one connection to every address the target resolves to, and each call goes to the
  next ready one. Targets are any gRPC target: `host:port`, `dns:///generator-headless:50051` (a
  Kubernetes headless Service: every pod's address), `ipv4:10.0.0.1:50051,10.0.0.2:50051`.
- retry on UNAVAILABLE (a replica down, or draining on SIGTERM): the retry goes to the next replica.
  gRPC retries a call only until the first response arrives, so a Generate stream that has already sent
  an event is never replayed behind the caller's back: the caller sees the error and says what happened
  (`client/balancing.py`'s `interrupted_stream_message`), since re-running it would re-render images it
  has already shown.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

SERVICES = ("productinaction.v1.Generator", "productinaction.v1.Upscaler", "grpc.health.v1.Health")

SERVICE_CONFIG: dict[str, Any] = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [{"service": service} for service in SERVICES],
            "retryPolicy": {
                "maxAttempts": 3,
                "initialBackoff": "0.1s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}

SERVICE_CONFIG_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
    ("grpc.enable_retries", 1),
    # Replicas come and go (scale-out, rolling updates): re-resolve DNS names sooner than the 30 s default.
    ("grpc.dns_min_time_between_resolutions_ms", 5000),
]

DEFAULT_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    # Cap reconnect backoff (default: up to 120 s) so a long-lived client notices a restarted service quickly.
    ("grpc.initial_reconnect_backoff_ms", 1000),
    ("grpc.max_reconnect_backoff_ms", 5000),
    # round_robin over every replica the target names, UNAVAILABLE retried on another.
    *SERVICE_CONFIG_OPTIONS,
]


def read_token_file(path: str | Path) -> str:
    """The first token in a file (blank lines and # comments skipped), as the services' token files hold them."""
    for line in Path(path).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            return line.strip()
    raise ValueError(f"token file {str(path)!r} holds no token")


@dataclass(frozen=True)
class ChannelSecurity:
    """How a client reaches a service: token and TLS files. The token never shows in repr or logs."""

    token: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @classmethod
    def load(
        cls,
        token: SecretStr | str | None = None,
        token_file: str | None = None,
        tls: bool = False,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
    ) -> ChannelSecurity:
        """From settings or flags: a token given directly wins over a token file."""
        value = token.get_secret_value() if isinstance(token, SecretStr) else token
        if not value and token_file:
            value = read_token_file(token_file)
        return cls(value or None, tls, ca_file or None, cert_file or None, key_file or None)

    def open(self, target: str, options: Sequence[tuple[str, Any]] | None = None) -> grpc.aio.Channel:
        return open_channel(
            target,
            token=self.token,
            tls=self.tls or None,
            ca_file=self.ca_file,
            cert_file=self.cert_file,
            key_file=self.key_file,
            options=options,
        )


class ChannelSettings(BaseSettings):
    """Client-side security settings, mixed into a client's own settings (e.g. PIA_WEB_TOKEN for the page)."""

    model_config = SettingsConfigDict(env_prefix="PIA_CLIENT_", extra="ignore")

    token: SecretStr | None = Field(None, description="Bearer token the services expect (prefer the env variable).")
    token_file: str | None = Field(None, description="File holding the bearer token.")
    tls: bool = Field(False, description="Use TLS with the system's CAs (implied by --ca-file or --cert-file).")
    ca_file: str | None = Field(None, description="CA (PEM) that signed the services' certificates: TLS on.")
    cert_file: str | None = Field(None, description="Client certificate (PEM) for services that require mTLS.")
    key_file: str | None = Field(None, description="Private key (PEM) of --cert-file.")

    def channel_security(self) -> ChannelSecurity:
        return ChannelSecurity.load(self.token, self.token_file, self.tls, self.ca_file, self.cert_file, self.key_file)


class _BearerToken:
    """Adds the authorization metadata to every call. Interceptors rather than call credentials,
    which gRPC sends only over TLS: a private-network or loopback service may use a token without TLS."""

    def __init__(self, token: str):
        self._pair = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add(*self._pair)
        return details._replace(metadata=metadata)


# One class per call kind: grpc.aio files an interceptor under the first kind it is an instance of.
class _UnaryUnaryToken(_BearerToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._with_token(client_call_details), request)


class _UnaryStreamToken(_BearerToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._with_token(client_call_details), request)


class _StreamUnaryToken(_BearerToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(self._with_token(client_call_details), request_iterator)


class _StreamStreamToken(_BearerToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(self._with_token(client_call_details), request_iterator)


def _token_interceptors(token: str | None) -> list[_BearerToken] | None:
    if not token:
        return None
    return [kind(token) for kind in (_UnaryUnaryToken, _UnaryStreamToken, _StreamUnaryToken, _StreamStreamToken)]


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def open_channel(
    target: str,
    *,
    token: str | None = None,
    tls: bool | None = None,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    options: Sequence[tuple[str, Any]] | None = None,
) -> grpc.aio.Channel:
    """An aio channel to `target`. TLS when asked, or when a CA or client certificate is given
    (no CA file: the system's roots); a client certificate and key make it mutual TLS."""
    options = list(DEFAULT_OPTIONS if options is None else options)
    interceptors = _token_interceptors(token)
    if tls is None:
        tls = bool(ca_file or cert_file)
    if not tls:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    if bool(cert_file) != bool(key_file):
        raise ValueError("a client certificate needs both cert_file and key_file")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file), private_key=_read(key_file), certificate_chain=_read(cert_file)
    )
    return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)


def add_security_flags(parser: argparse.ArgumentParser) -> None:
    """--token, --token-file, --tls, --ca-file, --cert-file, --key-file; defaults from PIA_TOKEN, PIA_TOKEN_FILE, ..."""
    env = os.environ.get
    parser.add_argument("--token", default=env("PIA_TOKEN"), help="bearer token (prefer PIA_TOKEN or --token-file)")
    parser.add_argument("--token-file", default=env("PIA_TOKEN_FILE"), help="file holding the bearer token")
    parser.add_argument("--tls", action="store_true", help="TLS with the system's CAs (implied by --ca-file)")
    parser.add_argument("--ca-file", default=env("PIA_CA_FILE"), help="CA (PEM) that signed the service's cert")
    parser.add_argument("--cert-file", default=env("PIA_CERT_FILE"), help="client certificate (PEM) for mTLS")
    parser.add_argument("--key-file", default=env("PIA_KEY_FILE"), help="private key (PEM) of --cert-file")


def security_from_args(args: argparse.Namespace) -> ChannelSecurity:
    return ChannelSecurity.load(args.token, args.token_file, args.tls, args.ca_file, args.cert_file, args.key_file)
