"""The Catalogue tab's views (client.web_catalogue) against a stand-in generator on a real socket: picks
become a file of what each product offers, every bad row is said at once, and a job's items and images
are shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from client import web_catalogue
from client.catalogue.commands import JobOptions
from client.catalogue.jobs import JobRegistry, JobState
from client.catalogue.runner import FlowControl
from client.web_logic import Backends
from tests.helpers import free_port, standin_server


@pytest.fixture(scope="module")
async def generator_target(tiny_world, tmp_path_factory):
    async with standin_server(tiny_world, tmp_path_factory.mktemp("tab-generator")) as (app, _, _):
        yield f"127.0.0.1:{app.port}"


@pytest.fixture
async def backends(generator_target, tmp_path):
    backends = Backends(generator_target, f"127.0.0.1:{free_port()}", tmp_path / "files")
    yield backends
    await backends.close()


@pytest.fixture
def registry(backends, tmp_path) -> JobRegistry:
    return JobRegistry(tmp_path / "jobs", backends.generator, JobOptions(flow=FlowControl(concurrency=2), zip=True))


async def test_picks_offer_every_ready_made_scene_and_tell_same_names_apart(backends):
    products, scenes, message = await web_catalogue.load_picks(backends)
    assert message == ""
    assert {value for _, value in products.choices} == {"tiny-mug", "tiny-star"}
    labels = dict((value, label) for label, value in scenes.choices)
    assert "custom" not in labels and "demo-custom" not in labels, "free-text scenes need a prompt"
    assert labels["beach"] == "Beach · beach" and labels["demo-beach"] == "Beach · demo-beach"
    assert labels["demo-city"] == "Minimal city"


async def test_picking_products_narrows_the_scenes_to_those_offered(backends):
    everything, _ = await web_catalogue.scenes_for(backends, [])
    narrowed, message = await web_catalogue.scenes_for(backends, ["tiny-star", "tiny-mug"])
    offered = {t.id for t in await backends.generator().templates(product_id="tiny-star") if not t.free_text}
    assert message == "" and {value for _, value in narrowed.choices} == offered
    assert "demo-beach" in {value for _, value in everything.choices} and "demo-beach" not in offered
    assert dict((v, label) for label, v in narrowed.choices)["beach"] == "Beach"  # no other "Beach" left to tell apart


async def test_picks_keep_the_scenes_each_product_offers(backends, registry):
    path, notes = await web_catalogue.picked_catalogue(backends, ["tiny-star"], ["beach", "demo-beach"], 2)
    assert path is not None and path.read_text() == "product,scenes,images\ntiny-star,beach,2\n"
    assert notes == ["tiny-star: demo-beach not offered for it, left out."]
    problems, images = await web_catalogue.check(registry, backends, path)
    assert (problems, images) == ([], 2)
    assert web_catalogue.problems_markdown(problems, notes, images).startswith("The catalogue is valid: 2 image(s).")

    none, why = await web_catalogue.picked_catalogue(backends, ["tiny-star"], ["demo-beach"], 1)
    assert none is None and why[-1] == "No picked scene is offered for the picked products."
    assert (await web_catalogue.picked_catalogue(backends, [], ["beach"], 1))[0] is None
    down = Backends(f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}", backends.files_dir)
    try:
        none, why = await web_catalogue.picked_catalogue(down, ["tiny-star"], ["beach"], 1)
    finally:
        await down.close()
    assert none is None and why == [
        f"The generator is unreachable ({down.generator_address}). Try again once it is back."
    ]


async def test_an_uploaded_file_with_bad_rows_is_refused_with_every_row(backends, registry, tmp_path):
    path = tmp_path / "upload.yaml"
    path.write_text("- {product: nope, scenes: beach}\n- {product: tiny-star, scenes: beach, images: 0}\n")
    problems, _ = await web_catalogue.check(registry, backends, path)
    shown = web_catalogue.problems_markdown(problems, [], 0)
    assert shown.startswith("**2 problem(s); the job cannot start:**")
    assert "row 1, column product: unknown product &#x27;nope&#x27;" in shown
    assert "row 2, column images: must be between 1 and 1000, got 0" in shown


async def test_a_jobs_items_images_and_zip_are_shown(backends, registry, tmp_path):
    path = tmp_path / "two.csv"
    path.write_text("product,scenes\ntiny-star,beach;flowers\n")
    job = registry.start(path)
    assert web_catalogue.can_stop(registry.view(job))
    view = await registry.wait(job)
    assert view.state == JobState.FINISHED and view.zip_file == tmp_path / "jobs" / job / "images.zip"
    assert not web_catalogue.can_stop(view) and not web_catalogue.can_resume(view)
    table = web_catalogue.jobs_html(registry.jobs())
    assert f'data-job="{job}" data-state="finished"' in table
    detail = web_catalogue.job_html(view)
    assert "2 done, 0 failed, 2 in all" in detail and detail.count('tr data-state="done"') == 2
    shown = await web_catalogue.gallery(backends, view)
    assert [caption.split(" · seed")[0] for _, caption in shown] == ["tiny-star · beach #0", "tiny-star · flowers #0"]
    assert all(
        Path(p).read_bytes().startswith(b"\x89PNG") and Path(p).is_relative_to(backends.files_dir) for p, _ in shown
    )
    choices = web_catalogue.job_choices(registry.jobs(), None)
    assert choices.value == job and choices.choices == [(f"{job} · finished", job)]
