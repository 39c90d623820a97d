"""Settings shared by both services. Read once at start-up from flags and environment."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.storage import StorageLimits


class ServiceSettings(BaseSettings):
    """Every field is a `--kebab-case` flag and a `PIA_<SERVICE>_<NAME>` environment variable."""

    model_config = SettingsConfigDict(cli_kebab_case=True, cli_implicit_flags=True, extra="ignore")

    host: str = Field(
        "127.0.0.1",
        description="Interface to bind (0.0.0.0: every interface, which needs a token or --insecure).",
    )
    port: int = Field(0, description="gRPC port (0: any free port).")
    storage: str = Field(
        "outputs",
        description="Where images go: a local directory (or file:///dir), or s3://bucket/prefix.",
    )
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint for MinIO/R2/moto; unset for AWS.")
    s3_region: str = Field("us-east-1", description="S3 region.")
    presign_expiry_s: int = Field(3600, description="Lifetime of presigned GET URLs.")
    max_queue: int = Field(64, description="Queued jobs beyond which requests get RESOURCE_EXHAUSTED.")
    grace_period_s: float = Field(30.0, description="On SIGTERM, how long running requests may finish.")
    metrics_port: int | None = Field(None, description="Prometheus metrics port (unset: no endpoint).")
    log_level: str = Field("INFO", description="Logging level.")

    # Security (docs/SECURITY.md). Tokens are SecretStr so that printing the settings never shows them.
    token: SecretStr | None = Field(
        None,
        description="Bearer token(s) callers must send, comma-separated (several: rotation). Prefer the "
        "environment variable or --token-file: a flag's value shows in the process list.",
    )
    token_file: str | None = Field(None, description="File of accepted bearer tokens, one a line (# comments).")
    tls_cert_file: str | None = Field(None, description="TLS certificate chain (PEM); with --tls-key-file: TLS on.")
    tls_key_file: str | None = Field(None, description="TLS private key (PEM).")
    tls_client_ca_file: str | None = Field(
        None, description="CA (PEM) that must have signed client certificates: mutual TLS."
    )
    insecure: bool = Field(
        False, description="Serve a non-loopback host without a token (private network or authenticating proxy)."
    )

    # Reliability (docs/RELIABILITY.md): every storage call is bounded.
    storage_timeout_s: float = Field(5.0, gt=0, description="Storage: limit of one attempt (connect, send, answer).")
    storage_deadline_s: float = Field(15.0, gt=0, description="Storage: limit of one call, all attempts included.")
    storage_attempts: int = Field(3, ge=1, description="Storage: attempts per call, with backoff between them.")

    def storage_limits(self) -> StorageLimits:
        return StorageLimits(self.storage_timeout_s, self.storage_deadline_s, self.storage_attempts)

    @classmethod
    def from_cli(cls, argv: Sequence[str] | None = None) -> Self:
        """Flags override environment variables, which override defaults; --help lists them all."""
        return cls(_cli_parse_args=list(argv) if argv is not None else True)
