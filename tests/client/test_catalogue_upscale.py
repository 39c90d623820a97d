"""Rows with `upscale`: each stored image is upscaled next to itself, once, and a resumed job upscales only
what is missing."""

from __future__ import annotations

import json
import zipfile

from client import cli
from tests.fixtures_upscaler import upscaler_settings
from tests.helpers import standin_server

CATALOGUE = "product,scenes,images,upscale\ntiny-star,beach,2,true\ntiny-mug,dogs,1,false\n"


def lines(out) -> list[dict]:
    return [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]


async def test_rows_with_upscale_get_an_upscaled_copy_once(tiny_world, tmp_path, capsys):
    from services.upscaler.app import start_upscaler

    storage = tmp_path / "images"
    upscaler = await start_upscaler(
        upscaler_settings("bicubic", str(storage), engine="tests.fixtures_upscaler:BicubicEngine")
    )
    try:
        async with standin_server(tiny_world, tmp_path, storage=str(storage)) as (app, _, _):
            path = tmp_path / "catalogue.csv"
            path.write_text(CATALOGUE)
            out = tmp_path / "out"
            args = ["--generator", f"127.0.0.1:{app.port}", "catalogue", "run", str(path), "--out", str(out)]
            args += ["--upscaler", f"127.0.0.1:{upscaler.port}", "--job", "up", "--zip", "--log-format", "json"]
            assert await cli._main(cli._parser().parse_args(args)) == 0
            events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
            assert sum(e["type"] == "upscaled" for e in events) == 2
            records = {r["request_id"]: r for r in lines(out)}  # the last line of an id wins
            upscaled = [r for r in records.values() if r["upscaled_uri"]]
            assert len(records) == 3 and len(upscaled) == 2 and all(r["upscale"] for r in upscaled)
            for r in upscaled:
                assert r["upscaled_uri"].startswith(r["uri"].removesuffix(".png") + ".x4.up-")
                assert (storage / r["request_id"]).joinpath(r["upscaled_uri"].rsplit("/", 1)[1]).exists()
            with zipfile.ZipFile(out / "images.zip") as zf:
                assert sum(n.endswith(".upscaled.png") for n in zf.namelist()) == 2 and len(zf.namelist()) == 5
            assert json.loads((out / "summary.json").read_text())["upscaled"] == 2

            # A run stopped between an image and its upscale: the next one upscales it, and renders nothing.
            steps = app.record.read_text()
            first = next(iter(upscaled))
            with (out / "index.jsonl").open("a") as f:
                f.write(json.dumps({**first, "upscaled_uri": "", "upscaled_url": ""}) + "\n")
            assert await cli._main(cli._parser().parse_args(args)) == 0
            events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
            assert events[0]["pending"] == 0 and app.record.read_text() == steps
            assert [e["request_id"] for e in events if e["type"] == "upscaled"] == [first["request_id"]]
            assert lines(out)[-1]["upscaled_uri"] == first["upscaled_uri"], "the same key: stored once"
            assert len(list(storage.glob("up-*/0.x4.*.png"))) == 2
    finally:
        await upscaler.stop()
