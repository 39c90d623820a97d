"""Who may call, and over what: bearer tokens in gRPC metadata, TLS (optionally mutual), and the
refusal to serve an open port to the world.

Clients send `authorization: Bearer <token>`. Every method needs a valid token when tokens are
configured, reflection included (and so does /metrics, services/common/server.py); health stays
open so that orchestrators can probe without one.
Tokens are never logged or echoed: settings hold them as `SecretStr`, and a refusal names the
problem ("missing" or "invalid"), not the value.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from pydantic import SecretStr

from services.common.errors import Unauthenticated, abort

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
METADATA_KEY = "authorization"
SCHEME = "bearer"


class RefusedToStart(SystemExit):
    """A configuration the service will not start with. As a SystemExit, it ends `python -m services.*`
    with its message on stderr and status 1, without a traceback."""

    def __init__(self, message: str):
        super().__init__(f"error: {message}")
        self.message = message


def load_tokens(token: SecretStr | str | None = None, token_file: str | Path | None = None) -> list[str]:
    """Accepted tokens: `token` may hold several, comma-separated; the file has one a line (# comments).

    Several tokens exist for rotation: add the new one, move the clients over, then drop the old one.
    """
    values: list[str] = []
    if token is not None:
        raw = token.get_secret_value() if isinstance(token, SecretStr) else token
        values += raw.split(",")
    if token_file:
        try:
            text = Path(token_file).read_text()
        except OSError as exc:
            raise RefusedToStart(f"token file {str(token_file)!r} cannot be read ({exc.strerror})") from None
        values += [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    tokens = [v.strip() for v in values if v.strip()]
    for t in tokens:
        # A token becomes an HTTP/2 header value: printable ASCII without spaces, so it survives any client.
        if not all(33 <= ord(c) < 127 for c in t):
            raise RefusedToStart("a configured token has spaces or characters outside printable ASCII")
    if token_file and not tokens:
        raise RefusedToStart(f"token file {str(token_file)!r} holds no token")
    return tokens


def _digest(token: str | bytes) -> bytes:
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).digest()


class TokenAuth(grpc.aio.ServerInterceptor):
    """Refuses every call but health without a valid bearer token, as UNAUTHENTICATED.

    Comparison is in constant time over *all* configured tokens (SHA-256 digests, so that neither
    which token matched nor its length shows in the timing). A refused call's request bytes are
    never parsed.
    """

    def __init__(self, tokens: Iterable[str]):
        self._digests = [_digest(t) for t in tokens]
        if not self._digests:
            raise ValueError("TokenAuth needs at least one token")

    def problem(self, metadata: Sequence[tuple[str, Any]] | None) -> str | None:
        """Why these call metadata are refused, or None when they carry a valid token."""
        values = [v for k, v in metadata or () if k == METADATA_KEY]
        if not values:
            return "missing bearer token: send metadata 'authorization: Bearer <token>'"
        return self.header_problem(values[0])

    def header_problem(self, value: str | bytes | None) -> str | None:
        """Why this `authorization` value (gRPC metadata or HTTP header) is refused, or None when it is valid."""
        if not value:
            return "missing bearer token: send 'authorization: Bearer <token>'"
        scheme, _, credential = (value.decode(errors="replace") if isinstance(value, bytes) else value).partition(" ")
        credential = credential.strip()
        if scheme.lower() != SCHEME or not credential:
            return "malformed authorization: expected 'Bearer <token>'"
        given = _digest(credential)
        ok = False
        for digest in self._digests:
            ok |= hmac.compare_digest(given, digest)
        return None if ok else "invalid bearer token"

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(HEALTH_PREFIX):
            return handler
        problem = self.problem(handler_call_details.invocation_metadata)
        if problem is None:
            return handler
        return _refusing(handler, method, problem)


def _refusing(handler: grpc.RpcMethodHandler, method: str, problem: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED through the error boundary."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        log.info("refused %s from %s: %s", method, context.peer(), problem)
        await abort(context, Unauthenticated(problem))

    # request_deserializer=None: the refused caller's bytes stay unparsed.
    serializer = handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, response_serializer=serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse, response_serializer=serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, response_serializer=serializer)
    return grpc.stream_stream_rpc_method_handler(refuse, response_serializer=serializer)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach: 127.0.0.0/8, ::1, localhost."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, port: int, has_tokens: bool, insecure: bool, env_prefix: str = "PIA_") -> None:
    """Refuse to serve a non-loopback address without a token, unless the operator said --insecure."""
    if has_tokens or insecure or is_loopback(host):
        return
    raise RefusedToStart(
        f"refusing to serve on {host}:{port} without a token: anyone who can reach that address could use "
        f"the service. Set a token (--token-file FILE, or {env_prefix}TOKEN), bind --host 127.0.0.1, or pass "
        "--insecure to serve it open anyway (only on a private network, or behind a proxy that authenticates)."
    )


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise RefusedToStart(f"{what} {path!r} cannot be read ({exc.strerror})") from None


def server_credentials(
    cert_file: str | None, key_file: str | None, client_ca_file: str | None = None
) -> grpc.ServerCredentials | None:
    """TLS credentials, or None for plaintext. With a client CA, clients must present a certificate it signed."""
    if not cert_file and not key_file:
        if client_ca_file:
            raise RefusedToStart("--tls-client-ca-file needs --tls-cert-file and --tls-key-file")
        return None
    if not (cert_file and key_file):
        raise RefusedToStart("TLS needs both --tls-cert-file and --tls-key-file")
    pair = (_read(key_file, "TLS key file"), _read(cert_file, "TLS certificate file"))
    client_ca = _read(client_ca_file, "TLS client CA file") if client_ca_file else None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


@dataclass(frozen=True)
class ServerSecurity:
    """What HostedServer needs: accepted tokens (none: auth off) and TLS credentials (none: plaintext)."""

    tokens: tuple[str, ...] = field(default=(), repr=False)
    credentials: grpc.ServerCredentials | None = None

    @classmethod
    def from_settings(cls, settings: Any) -> ServerSecurity:
        """Read token and TLS files once, and refuse a non-loopback host without a token (unless --insecure)."""
        tokens = tuple(load_tokens(settings.token, settings.token_file))
        credentials = server_credentials(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
        prefix = settings.model_config.get("env_prefix", "PIA_")
        check_exposure(settings.host, settings.port, bool(tokens), settings.insecure, prefix)
        return cls(tokens, credentials)

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [TokenAuth(self.tokens)] if self.tokens else []
