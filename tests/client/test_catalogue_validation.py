"""Catalogue files checked before anything runs: every bad row at once, with its row and column."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from client import cli
from client.catalogue import spec
from client.catalogue.plan import Shard, plan_items, request_id
from services.common.ids import is_valid_id
from tests.helpers import ROOT, standin_server

ROWS = """product,photo,scenes,images,size,adapters,seed
tiny-star,,beach;flowers,2,,,
no-such-product,,beach,1,,,
tiny-star,,demo-beach,1,,,
tiny-mug,,beach,0,,,
tiny-mug,,beach,1,500x512,,
tiny-mug,,beach,1,,nope:0.5,
,missing.png,beach,1,,,
,notes.png,beach,1,,,
tiny-star,,beach,-1,,,
,photo.png,beach|dogs,1,,tiny-sunset:0.8,
tiny-mug,,all,1,64x64,,7
tiny-mug,,custom,1,,,
tiny-star,,flowers,1,,,
"""
EXPECTED = {
    (2, "product"),  # unknown product
    (3, "scenes"),  # a demo scene: not for the tiny category
    (4, "images"),  # zero
    (5, "size"),  # not a multiple of 8
    (6, "adapters"),  # unknown adapter
    (7, "photo"),  # missing
    (8, "photo"),  # not an image
    (9, "images"),  # negative
    (12, "scenes"),  # free text without a prompt
    (13, "scenes"),  # repeats row 1's tiny-star flowers
}


def write_catalogue(folder: Path) -> Path:
    photo = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    ImageDraw.Draw(photo).ellipse((6, 6, 26, 26), fill=(200, 40, 40, 255))
    photo.save(folder / "photo.png")
    (folder / "notes.png").write_text("not an image")
    path = folder / "catalogue.csv"
    path.write_text(ROWS)
    return path


async def main(*argv: str) -> int:
    return await cli._main(cli._parser().parse_args(list(argv)))


async def test_every_bad_row_is_reported_at_once_and_only_good_rows_run_when_asked(tiny_world, tmp_path, capsys):
    path = write_catalogue(tmp_path)
    async with standin_server(tiny_world, tmp_path) as (app, _stub, _health):
        target = f"127.0.0.1:{app.port}"
        assert await main("--generator", target, "catalogue", "validate", str(path)) == 1
        _, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert len(lines) == len(EXPECTED), err
        for row, column in EXPECTED:
            assert any(f"row {row} (line {row + 1}), column {column}:" in line for line in lines), (row, column, err)
        assert "unknown product 'no-such-product'" in err and "'demo-beach' is not offered" in err
        assert "missing.png: no such file" in err and "notes.png: not an image" in err
        assert "unknown adapter 'nope'" in err and "repeats row 1" in err

        # Bad rows refuse the whole run: nothing is rendered.
        out = tmp_path / "out"
        args = ["--generator", target, "catalogue", "run", str(path), "--out", str(out), "--log-format", "plain"]
        assert await main(*args) == 1
        assert "--skip-bad-rows" in capsys.readouterr().err
        assert not app.record.exists() and not (out / "index.jsonl").exists()

        # With --skip-bad-rows the good rows run: 1 (2 scenes x 2), 10 (a photo, 2 scenes), 11 (every scene).
        assert await main(*args, "--skip-bad-rows", "--job", "val") == 0
        printed = capsys.readouterr().out
        assert "job: 11 images, 0 already stored, 11 to render" in printed
        summary = (out / "summary.json").read_text()
        assert '"done": 11' in summary and '"row": 13' in summary


def test_scenes_all_ids_seeds_and_shards(tiny_world, tmp_path):
    path = write_catalogue(tmp_path)
    parsed = spec.parse(path)
    offer = spec.Offer(
        products=frozenset({"tiny-star", "tiny-mug"}),
        product_scenes={p: ("flowers", "beach", "dogs", "custom") for p in ("tiny-star", "tiny-mug")},
        placement_scenes=("flowers", "beach", "dogs", "custom"),
        free_text=frozenset({"custom"}),
        adapters=frozenset({"tiny-sunset"}),
    )
    checked = spec.check_offer(parsed, offer)
    rows = {r.number: r for r in spec.without_bad_rows(checked).rows}
    assert sorted(rows) == [1, 10, 11]
    assert rows[11].scenes == ("flowers", "beach", "dogs")  # `all` without the free-text scene
    assert rows[11].seed == 7 and (rows[11].width, rows[11].height) == (64, 64)

    items = plan_items("job1", list(rows.values()))
    assert len(items) == 4 + 2 + 3
    assert all(is_valid_id(i.request_id) for i in items) and len({i.request_id for i in items}) == len(items)
    assert [i.seed for i in items if i.row.number == 11] == [7, 7, 7]  # a fixed seed: seed + index
    assert items == plan_items("job1", list(rows.values())), "ids and seeds are deterministic"
    assert {i.request_id for i in plan_items("job2", list(rows.values()))}.isdisjoint(i.request_id for i in items)
    shards = [plan_items("job1", list(rows.values()), Shard(k, 3)) for k in range(3)]
    assert sorted(i.request_id for s in shards for i in s) == sorted(i.request_id for i in items)

    # A long scene id still gives a valid id of at most 64 characters.
    long = request_id("j" * 24, "abcdef12", "s" * 60, 999)
    assert is_valid_id(long) and len(long) <= 64


def test_yaml_rows_with_their_problems(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "- {product: tiny-star, scenes: [beach, dogs], images: 2, adapters: {tiny-sunset: 0.5}, upscale: true}\n"
        "- {product: tiny-mug, scenes: all, size: 64x}\n"
        "- {product: tiny-mug, scenes: [beach], colour: red}\n"
    )
    parsed = spec.parse(path)
    assert [(p.row, p.column) for p in parsed.problems] == [(2, "size"), (3, "colour")]
    good = spec.without_bad_rows(parsed).rows
    assert [r.number for r in good] == [1]
    assert good[0].scenes == ("beach", "dogs") and good[0].images == 2 and good[0].upscale
    assert good[0].adapters == (spec.AdapterUse("tiny-sunset", 0.5),)


def test_the_demo_catalogue_is_valid_for_the_demo_world():
    """demo/catalogue.csv against what `make run` serves: the demo products, the demo scenes, `night`."""
    from services.generator.catalog import TemplateCatalog

    templates = TemplateCatalog.load(ROOT / "templates" / "catalog.yaml")
    demo = tuple(t.id for t in templates.for_category("demo"))
    offer = spec.Offer(
        products=frozenset(p.name for p in (ROOT / "products").iterdir() if (p / "manifest.yaml").exists()),
        product_scenes={"split-star": demo, "striped-mug": demo},
        placement_scenes=tuple(t.id for t in templates.templates if t.placement is not None),
        free_text=frozenset(t.id for t in templates.templates if t.free_text),
        adapters=frozenset(p.name for p in (ROOT / "adapters").iterdir() if (p / "manifest.yaml").exists()),
    )
    checked = spec.check_offer(spec.parse(ROOT / "demo" / "catalogue.csv"), offer)
    assert checked.problems == []
    assert [r.subject for r in checked.rows] == ["split-star", "striped-mug", "catalogue-photo.png"]
    assert "demo-custom" not in checked.rows[0].scenes and len(plan_items("demo", checked.rows)) == 6 + 6 + 2
