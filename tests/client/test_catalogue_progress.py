"""What a run prints: a bar on a terminal (done/total, images per minute, ETA), plain lines, JSON lines."""

from __future__ import annotations

import io
import json

from client.catalogue import progress, spec
from client.catalogue.plan import plan_items
from client.catalogue.runner import Failure, Finished, ImageDone, ItemFailed, Started, Stored


def events(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("product,scenes,images\ntiny-star,beach,3\n")
    items = plan_items("p", spec.parse(path).rows)
    stored = [Stored(i, f"file:///s/{i.request_id}/0.png", "", {}, "cpu:0") for i in items[:2]]
    return [
        Started(3, 0, 3),
        ImageDone(stored[0], 1, 3),
        ImageDone(stored[1], 2, 3),
        ItemFailed(Failure(items[2], "INVALID_ARGUMENT: prompt: no")),
        Finished(2, 1, 3, 1.5, False),
    ]


def test_the_bar_shows_done_rate_and_eta(tmp_path):
    out = io.StringIO()
    bar = progress.Bar(out)
    for event in events(tmp_path):
        bar(event)
    text = out.getvalue()
    assert "[####################----------] 2/3" in text and "img/min" in text and "ETA" in text
    assert "failed: tiny-star beach #2" in text and "INVALID_ARGUMENT" in text
    assert text.rstrip().endswith("finished: 2/3 stored, 1 failed, 1.5s")


def test_plain_and_json_lines(tmp_path):
    plain, machine = io.StringIO(), io.StringIO()
    for event in events(tmp_path):
        progress.Plain(plain)(event)
        progress.JsonLines(machine)(event)
    lines = plain.getvalue().splitlines()
    assert lines[0] == "job: 3 images, 0 already stored, 3 to render"
    assert lines[1].startswith("[1/3] tiny-star beach #0: stored (cpu:0) file:///s/p-")
    records = [json.loads(line) for line in machine.getvalue().splitlines()]
    assert [r["type"] for r in records] == ["started", "imagedone", "imagedone", "itemfailed", "finished"]
    assert records[3]["reason"].startswith("INVALID_ARGUMENT") and records[4]["failed"] == 1
