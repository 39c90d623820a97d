"""The command-line client against a real generator (tiny model): file names, `rerun`, and its errors."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from client import cli
from tests.helpers import ROOT, free_port

# Tiny and few steps: each image is a fraction of a second on an idle CPU.
FAST = ["--steps", "2", "--width", "32", "--height", "32"]


async def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """The CLI in this process (its asyncio entry point), with what it printed."""
    code = await cli._main(cli._parser().parse_args(list(argv)))
    out, err = capsys.readouterr()
    return code, out, err


def run_cli_process(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "client.cli", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def address(generator) -> str:
    return f"127.0.0.1:{generator.port}"


async def test_generate_twice_with_one_seed_keeps_both_runs(address, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--generator", address, "generate", "--product", "tiny-star", "--template", "beach", "-n", "2"]
    args += ["--seed", "5", *FAST, "--out", str(out)]
    code, first_out, _ = await run_cli(capsys, *args)
    assert code == 0, first_out
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(first) == ["tiny-star-0-5.png", "tiny-star-1-6.png"]

    code, second_out, _ = await run_cli(capsys, *args)
    assert code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["tiny-star-0-5-2.png", "tiny-star-0-5.png", "tiny-star-1-6-2.png", "tiny-star-1-6.png"]
    assert all((out / name).read_bytes() == data for name, data in first.items()), "the first run was overwritten"
    assert "tiny-star-1-6-2.png" in second_out


async def test_rerun_writes_beside_its_input_without_touching_it(address, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--generator", address, "generate", "--product", "tiny-mug", "--template", "flowers", "-n", "3"]
    code, _, _ = await run_cli(capsys, *args, "--seed", "40", *FAST, "--out", str(out))
    assert code == 0
    original = out / "tiny-mug-2-42.png"  # the third image: index 2, seed 40 + 2
    before = original.read_bytes()

    # Into the input's own folder: the input stays, the copy keeps index 2 in its name.
    code, printed, err = await run_cli(capsys, "--generator", address, "rerun", str(original), "--out", str(out))
    assert code == 0, err
    assert original.read_bytes() == before
    rerun = out / "tiny-mug-2-42-rerun.png"
    assert rerun.exists() and str(rerun) in printed and "warning" not in err
    pixels = [Image.open(io.BytesIO(path.read_bytes())).convert("RGB").tobytes() for path in (original, rerun)]
    assert pixels[0] == pixels[1], "a rerun reproduces the image exactly"

    code, _, _ = await run_cli(capsys, "--generator", address, "rerun", str(original), "--out", str(out))
    assert code == 0 and (out / "tiny-mug-2-42-rerun-2.png").exists() and rerun.exists()
    assert len(list(out.iterdir())) == 5


async def test_rerun_refuses_unusable_files_in_one_line(tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8), "red").save(plain)
    (tmp_path / "notes.png").write_text("not an image")
    closed = f"127.0.0.1:{free_port()}"
    cases = {
        tmp_path / "missing.png": "no such file",
        plain: "carries no generation settings",
        tmp_path / "notes.png": "not a PNG image",
    }
    results = await asyncio.gather(
        *(asyncio.to_thread(run_cli_process, "--generator", closed, "rerun", str(path)) for path in cases)
    )
    for (path, reason), result in zip(cases.items(), results, strict=True):
        assert result.returncode == 1, result
        assert result.stderr.strip() == result.stderr.strip().splitlines()[0], result.stderr
        assert result.stderr.startswith(f"error: {path}: {reason}"), result.stderr
        assert "Traceback" not in result.stderr and result.stdout == ""
    assert plain.exists() and not (tmp_path / "missing.png").exists()


async def test_templates_for_a_product_are_the_ones_made_for_it(address, capsys, tmp_path):
    from services.generator.catalog import TemplateCatalog

    catalog = TemplateCatalog.load(ROOT / "templates" / "catalog.yaml")
    code, printed, _ = await run_cli(capsys, "--generator", address, "templates", "--product", "tiny-star")
    assert code == 0
    listed = [line.split()[0] for line in printed.splitlines()]
    assert listed == [t.id for t in catalog.for_category("tiny")]  # the tiny products' category
    assert "beach" in listed and not any(name.startswith("demo-") for name in listed)
    # What `make run` serves: the demo products get exactly the demo scenes.
    assert [t.id for t in catalog.for_category("demo")] == [
        "demo-beach",
        "demo-fire",
        "demo-flowers",
        "demo-city",
        "demo-white",
        "demo-black",
        "demo-custom",
    ]

    # A scene made for other products is refused by the server, by name, and nothing is generated.
    code, _, err = await run_cli(
        capsys, "--generator", address, "generate", "--product", "tiny-star", "--template", "demo-beach", "-n", "1",
        *FAST, "--out", str(tmp_path),
    )  # fmt: skip
    assert code == 1 and "template 'demo-beach' is not among the scenes for product 'tiny-star'" in err
    assert "'tiny'" in err and not list(tmp_path.glob("*.png"))

    # Unknown product: one line, exit 1.
    code, _, err = await run_cli(capsys, "--generator", address, "templates", "--product", "nope")
    assert code == 1 and err.strip() == "error: product 'nope' not found; see ListProducts"


async def test_unreachable_generator_is_one_line(capsys):
    closed = f"127.0.0.1:{free_port()}"
    code, _, err = await run_cli(capsys, "--generator", closed, "products")
    assert code == 1 and err.strip() == f"error: the generator at {closed} is unreachable (is `make run` running?)"


def test_names_never_overwrite(tmp_path):
    assert cli.save_new(tmp_path, "a", b"1").name == "a.png"
    assert cli.save_new(tmp_path, "a", b"2").name == "a-2.png"
    assert (tmp_path / "a.png").read_bytes() == b"1"
    assert Path(tmp_path / "a-2.png").read_bytes() == b"2"
