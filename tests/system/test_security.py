"""Security over real gRPC on loopback: bearer tokens (several, for rotation), health open without one,
reflection behind it, TLS and mutual TLS with throwaway certificates, the refusal to serve a public
address without a token, and no token or credential in the logs."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.api import GeneratorClient, UpscalerClient, generate_request
from client.channel import ChannelSecurity, open_channel
from client.web import WebSettings
from client.web_logic import Backends
from productinaction.v1 import generator_pb2, generator_pb2_grpc, upscaler_pb2
from services.common.auth import RefusedToStart, ServerSecurity, TokenAuth, is_loopback, load_tokens
from services.generator.app import start_generator
from services.upscaler.app import start_upscaler
from tests.fixtures_upscaler import png_bytes, upscaler_settings
from tests.helpers import ROOT, STANDIN, free_port, generator_settings

GRPCURL = str(Path(sys.executable).parent / "grpcurl")
BICUBIC = "tests.fixtures_upscaler:BicubicEngine"
OLD, NEW, WRONG = "tok-old-Zq81x", "tok-new-Pw27k", "tok-wrong-Ab33c"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


# Throwaway PKI


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate from another CA
    rogue_key: Path


def _write_pki(out: Path) -> Pki:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def save(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
        path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        path.with_suffix(".key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return path.with_suffix(".pem"), path.with_suffix(".key")

    def issue(cn, issuer_name, issuer_key, key, *, ca=False, san=None, usage=None) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        if usage:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def new_key():
        return ec.generate_private_key(ec.SECP256R1())

    ca_key, rogue_ca_key = new_key(), new_key()
    ca_cert = issue("pia test CA", name("pia test CA"), ca_key, ca_key, ca=True)
    ca, _ = save(out / "ca", ca_cert, ca_key)
    server_key = new_key()
    san = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    server = save(
        out / "server",
        issue("localhost", ca_cert.subject, ca_key, server_key, san=san, usage=ExtendedKeyUsageOID.SERVER_AUTH),
        server_key,
    )
    client_key, rogue_key = new_key(), new_key()
    client = save(
        out / "client",
        issue("web page", ca_cert.subject, ca_key, client_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH),
        client_key,
    )
    rogue = save(
        out / "rogue",
        issue("rogue", name("rogue CA"), rogue_ca_key, rogue_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH),
        rogue_key,
    )
    return Pki(ca, *server, *client, *rogue)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return _write_pki(tmp_path_factory.mktemp("pki"))


# Servers


@pytest.fixture(scope="module")
async def token_generator(tiny_world, tmp_path_factory):
    """A stand-in generator that accepts two tokens (mid-rotation): OLD from the setting, NEW from a file."""
    tmp = tmp_path_factory.mktemp("token-gen")
    token_file = tmp / "tokens"
    token_file.write_text(f"# rotated in on Monday\n{NEW}\n")
    settings = generator_settings(
        tiny_world,
        str(tmp / "images"),
        model="standin:step=0.01",
        worker_pipeline=STANDIN,
        token=OLD,
        token_file=str(token_file),
    )
    app = await start_generator(settings)
    yield app
    await app.stop()


async def _upscaler(tmp: Path, **security):
    settings = upscaler_settings("bicubic", str(tmp / "images"), engine=BICUBIC, **security)
    return await start_upscaler(settings)


def _request(n: int = 1):
    return generate_request(product_id="tiny-star", template_id="beach", num_images=n, steps=2, width=32, height=32)


async def _generate(stub, metadata=None) -> list[str]:
    return [e.WhichOneof("event") async for e in stub.Generate(_request(), metadata=metadata, timeout=60)]


async def _serving(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return reply.status


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


# Tokens


async def test_calls_without_a_valid_token_are_unauthenticated(token_generator):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{token_generator.port}") as channel:
        stub = generator_pb2_grpc.GeneratorStub(channel)
        for metadata, problem in [
            (None, "missing bearer token"),
            (bearer(WRONG), "invalid bearer token"),
            ((("authorization", f"Basic {OLD}"),), "malformed"),
            (bearer(OLD[:-1]), "invalid bearer token"),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as unary:
                await stub.ListProducts(generator_pb2.ListProductsRequest(), metadata=metadata, timeout=10)
            assert unary.value.code() == UNAUTHENTICATED and problem in unary.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as stream:
                await _generate(stub, metadata)
            assert stream.value.code() == UNAUTHENTICATED and problem in stream.value.details()
            for details in (unary.value.details(), stream.value.details()):
                assert OLD not in details and NEW not in details and WRONG not in details
        # Health answers without a token: orchestrators probe it.
        assert await _serving(channel) == health_pb2.HealthCheckResponse.SERVING


async def test_every_configured_token_works_unary_and_streaming(token_generator):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{token_generator.port}") as channel:
        stub = generator_pb2_grpc.GeneratorStub(channel)
        for token in (OLD, NEW):
            products = await stub.ListProducts(generator_pb2.ListProductsRequest(), metadata=bearer(token), timeout=10)
            assert "tiny-star" in {p.id for p in products.products}
            kinds = await _generate(stub, (("authorization", f"bearer  {token} "),))  # scheme is case-insensitive
            assert kinds[0] == "accepted" and kinds.count("image_ready") == 1 and kinds[-1] == "completed"


async def test_client_api_sends_its_token(token_generator):
    address = f"127.0.0.1:{token_generator.port}"
    client = GeneratorClient(address, ChannelSecurity(token=NEW))
    try:
        assert "tiny-star" in {p.id for p in await client.products()}
        kinds = [e.WhichOneof("event") async for e in client.generate(_request(), timeout=60)]
        assert kinds.count("image_ready") == 1
        assert await client.health() == "SERVING"
    finally:
        await client.close()
    anonymous = GeneratorClient(address)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await anonymous.products()
        assert refused.value.code() == UNAUTHENTICATED
        assert await anonymous.health() == "SERVING"
    finally:
        await anonymous.close()


async def test_reflection_needs_the_token(token_generator):
    addr = f"127.0.0.1:{token_generator.port}"

    async def grpcurl(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            GRPCURL, "-plaintext", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode, out.decode(), err.decode()

    code, _, err = await grpcurl(addr, "list")
    assert code != 0 and "Unauthenticated" in err, err
    code, _, err = await grpcurl("-H", f"authorization: Bearer {WRONG}", addr, "list")
    assert code != 0 and "Unauthenticated" in err and WRONG not in err, err
    code, out, err = await grpcurl("-H", f"authorization: Bearer {OLD}", addr, "list")
    assert code == 0, err
    assert {"productinaction.v1.Generator", "grpc.health.v1.Health"} <= set(out.split())
    body = json.dumps({"product_id": "tiny-star", "template_id": "beach", "num_images": 1, "steps": 2})
    args = ["-H", f"authorization: Bearer {NEW}", "-d", body, addr, "productinaction.v1.Generator/Generate"]
    code, out, err = await grpcurl(*args)
    assert code == 0 and '"completed"' in out, err
    # grpcurl finds even Health's schema through reflection, so it needs the token there (stubs do not).
    code, out, err = await grpcurl("-H", f"authorization: Bearer {OLD}", addr, "grpc.health.v1.Health/Check")
    assert code == 0 and "SERVING" in out, err


async def test_cli_passes_the_token(token_generator, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(f"{NEW}\n")
    cli = [sys.executable, "-m", "client.cli", "--generator", f"127.0.0.1:{token_generator.port}"]

    async def run(*args: str, env: dict | None = None) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            *cli, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env={**os.environ, **(env or {})}
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode, out.decode(), err.decode()

    env_free = {"PIA_TOKEN": "", "PIA_TOKEN_FILE": ""}
    code, out, err = await run("--token-file", str(token_file), "products", env=env_free)
    assert code == 0 and "tiny-star" in out, err
    code, out, err = await run("products", env={"PIA_TOKEN": OLD})
    assert code == 0 and "tiny-star" in out, err
    code, out, err = await run("products", env=env_free)
    assert code == 1 and "UNAUTHENTICATED" in err and "missing bearer token" in err, err
    code, out, err = await run("--token", WRONG, "products", env=env_free)
    assert code == 1 and "UNAUTHENTICATED" in err and WRONG not in err, err


async def test_web_backends_pass_settings_token(token_generator, tmp_path, monkeypatch):
    monkeypatch.setenv("PIA_WEB_TOKEN", OLD)
    settings = WebSettings.from_cli(["--generator", f"127.0.0.1:{token_generator.port}"])
    assert OLD not in repr(settings)
    backends = Backends(settings.generator, settings.upscaler, tmp_path, settings.channel_security())
    try:
        assert "tiny-star" in {p.id for p in await backends.generator().products()}
    finally:
        await backends.close()


def test_web_login_from_settings(tmp_path, monkeypatch):
    logins = tmp_path / "logins"
    logins.write_text("# page users\nbob:hunter2\n")
    monkeypatch.setenv("PIA_WEB_AUTH_USERS", "ann:s3cret")
    check = WebSettings.from_cli(["--auth-file", str(logins)]).login()
    assert check("ann", "s3cret") and check("bob", "hunter2")
    assert not check("ann", "hunter2") and not check("eve", "") and not check("bob", "hunter")
    monkeypatch.delenv("PIA_WEB_AUTH_USERS")
    assert WebSettings.from_cli([]).login() is None


def test_web_page_behind_gradio_login(tmp_path):
    import http.cookiejar
    import urllib.error
    import urllib.parse
    import urllib.request

    from client.web import launch

    closed = f"127.0.0.1:{free_port()}"
    port = free_port()
    settings = WebSettings(
        host="127.0.0.1", port=port, generator=closed, upscaler=closed, auth_users="ann:s3cret", files_dir=str(tmp_path)
    )
    demo = launch(settings, block=False)
    base = f"http://127.0.0.1:{port}"
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{base}/config", timeout=10)
        assert refused.value.code == 401
        browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        with pytest.raises(urllib.error.HTTPError):
            browser.open(f"{base}/login", urllib.parse.urlencode({"username": "ann", "password": "no"}).encode())
        browser.open(f"{base}/login", urllib.parse.urlencode({"username": "ann", "password": "s3cret"}).encode())
        assert browser.open(f"{base}/config", timeout=10).status == 200
    finally:
        demo.close()


def test_token_sources_and_constant_time_check(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"\n# old one below\n{OLD}\n  {NEW}  \n")
    assert load_tokens("a,b , ", path) == ["a", "b", OLD, NEW]
    auth = TokenAuth(load_tokens(token_file=path))
    assert auth.problem(bearer(NEW)) is None and auth.problem(bearer(OLD)) is None
    assert auth.problem(bearer(NEW + "x")) == "invalid bearer token"
    assert auth.problem(()) and auth.problem((("authorization", "Bearer "),))
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(RefusedToStart, match="holds no token"):
        load_tokens(token_file=tmp_path / "empty")
    with pytest.raises(RefusedToStart, match="cannot be read"):
        load_tokens(token_file=tmp_path / "missing")
    with pytest.raises(RefusedToStart, match="printable ASCII"):
        load_tokens("has space")


# Upscaler: tokens, TLS, mTLS


async def test_upscaler_token(tmp_path):
    app = await _upscaler(tmp_path, token=f"{OLD},{NEW}")
    address = f"127.0.0.1:{app.port}"
    request = upscaler_pb2.UpscaleRequest(image=png_bytes((16, 16)), inline_image=True)
    try:
        anonymous = UpscalerClient(address)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            [e async for e in anonymous.upscale(request, timeout=30)]
        assert refused.value.code() == UNAUTHENTICATED
        assert await anonymous.health() == "SERVING"
        await anonymous.close()
        client = UpscalerClient(address, ChannelSecurity(token=OLD))
        kinds = [e.WhichOneof("event") async for e in client.upscale(request, timeout=30)]
        assert kinds[-1] == "completed" and "image_ready" in kinds
        await client.close()
    finally:
        await app.stop()


async def test_tls(pki, tmp_path):
    app = await _upscaler(tmp_path, tls_cert_file=str(pki.server_cert), tls_key_file=str(pki.server_key))
    try:
        for target in (f"127.0.0.1:{app.port}", f"localhost:{app.port}"):  # both names are in the certificate
            async with open_channel(target, ca_file=str(pki.ca)) as channel:
                assert await _serving(channel) == health_pb2.HealthCheckResponse.SERVING
        # Plaintext, or TLS without trusting our CA, gets nowhere.
        for channel in (open_channel(f"127.0.0.1:{app.port}"), open_channel(f"127.0.0.1:{app.port}", tls=True)):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _serving(channel)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            await channel.close()
    finally:
        await app.stop()


async def test_mutual_tls_with_token(pki, tmp_path):
    app = await _upscaler(
        tmp_path,
        tls_cert_file=str(pki.server_cert),
        tls_key_file=str(pki.server_key),
        tls_client_ca_file=str(pki.ca),
        token=NEW,
    )
    target = f"127.0.0.1:{app.port}"
    request = upscaler_pb2.UpscaleRequest(image=png_bytes((16, 16)), inline_image=True)
    try:
        for cert, key in ((None, None), (pki.rogue_cert, pki.rogue_key)):  # no client cert; one from another CA
            channel = open_channel(target, ca_file=str(pki.ca), cert_file=cert and str(cert), key_file=key and str(key))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _serving(channel)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            await channel.close()
        security = ChannelSecurity(
            token=NEW, ca_file=str(pki.ca), cert_file=str(pki.client_cert), key_file=str(pki.client_key)
        )
        client = UpscalerClient(target, security)
        assert await client.health() == "SERVING"
        kinds = [e.WhichOneof("event") async for e in client.upscale(request, timeout=30)]
        assert kinds[-1] == "completed"
        await client.close()
        # The certificate gets a client through TLS; the token is still needed for the API.
        no_token = UpscalerClient(
            target, ChannelSecurity(ca_file=security.ca_file, cert_file=security.cert_file, key_file=security.key_file)
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            [e async for e in no_token.upscale(request, timeout=30)]
        assert refused.value.code() == UNAUTHENTICATED
        await no_token.close()
    finally:
        await app.stop()


# Refusals


def test_public_address_needs_a_token_or_insecure():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.1.2.3")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("10.0.0.5")
    assert not is_loopback("gpu-1.example.com")
    from services.generator.settings import GeneratorSettings

    for host in ("0.0.0.0", "::", "10.0.0.5"):
        with pytest.raises(RefusedToStart, match="--insecure"):
            ServerSecurity.from_settings(GeneratorSettings(host=host))
        assert ServerSecurity.from_settings(GeneratorSettings(host=host, insecure=True)).tokens == ()
        assert ServerSecurity.from_settings(GeneratorSettings(host=host, token=OLD)).tokens == (OLD,)
    assert OLD not in repr(ServerSecurity.from_settings(GeneratorSettings(token=OLD)))
    assert ServerSecurity.from_settings(GeneratorSettings()).tokens == ()  # the default host is loopback


@pytest.mark.parametrize("service", ["generator", "upscaler"])
def test_service_refuses_to_start_on_all_interfaces_without_a_token(service, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIA_")}
    proc = subprocess.run(
        [sys.executable, "-m", f"services.{service}", "--host", "0.0.0.0", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 1
    assert "refusing to serve on 0.0.0.0" in proc.stderr and "--insecure" in proc.stderr
    assert f"PIA_{service.upper()}_TOKEN" in proc.stderr and "Traceback" not in proc.stderr


# No secrets in logs


def test_no_token_or_credential_in_logs(tiny_world, tmp_path, moto_s3):
    """A generator storing to S3, run with a token at DEBUG: failed and good calls leave neither the
    tokens nor the S3 secret in its log."""
    import boto3

    secret = "s3-secret-Kx93mQ"
    # A bucket made with the same credentials: this moto can tell credentials apart by their secret.
    boto3.client(
        "s3", endpoint_url=moto_s3, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key=secret
    ).create_bucket(Bucket="pia-security")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIA_")}
    env.update(PIA_GENERATOR_TOKEN=f"{OLD},{NEW}", AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY=secret)
    env["PIA_ALLOW_TEST_PIPELINES"] = "1"  # the testkit stand-in
    cmd = [
        *(sys.executable, "-m", "services.generator", "--host", "127.0.0.1", "--port", str(port)),
        *("--model", "standin:step=0.01", "--worker-pipeline", STANDIN, "--devices", "cpu:1"),
        *("--products-dir", str(tiny_world / "products"), "--adapters-dir", str(tiny_world / "adapters")),
        *("--storage", "s3://pia-security/renders", "--s3-endpoint-url", moto_s3, "--log-level", "DEBUG"),
        *("--grace-period-s", "1"),
    ]
    log_path = tmp_path / "generator.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        asyncio.run(_calls_with_and_without_tokens(f"127.0.0.1:{port}", proc))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    text = log_path.read_text()
    assert "invalid bearer token" in text and "missing bearer token" in text  # the refusals were logged
    assert "/productinaction.v1.Generator/Generate" in text
    for value in (OLD, NEW, WRONG, secret):
        assert value not in text, f"{value!r} leaked into the log"


async def _calls_with_and_without_tokens(address: str, proc: subprocess.Popen) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        for _ in range(600):
            assert proc.poll() is None, "the generator exited"
            try:
                if await _serving(channel) == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
        stub = generator_pb2_grpc.GeneratorStub(channel)
        for metadata in (None, bearer(WRONG), bearer(f"{OLD},{NEW}")):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _generate(stub, metadata)
            assert refused.value.code() == UNAUTHENTICATED
        kinds = await _generate(stub, bearer(NEW))
        assert kinds.count("image_ready") == 1 and kinds[-1] == "completed"
