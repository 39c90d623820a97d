"""What the page's Catalogue tab does, without Gradio: picks or a file in, problems and views out.

The jobs themselves belong to a `client.catalogue.jobs.JobRegistry` (one per web process); this module
turns picks into a catalogue file, validates it as the CLI does, and shows the registry's jobs.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import time
from collections import Counter
from pathlib import Path

import grpc

from client.catalogue.commands import fetch_offer
from client.catalogue.jobs import ItemState, JobRegistry, JobState, JobView
from client.catalogue.results import JobDir, read_image
from client.web_logic import Backends, Choices, friendly_error
from productinaction.v1 import generator_pb2

MAX_ITEMS_SHOWN = 200  # rows of the items table; the counts above it cover the rest
MAX_GALLERY = 120  # newest images shown in the page's gallery; images.zip holds them all


async def load_picks(backends: Backends) -> tuple[Choices, Choices, str]:
    """The products (ListProducts) and ready-made scenes (ListTemplates) to pick from, or why there are none."""
    try:
        products = await backends.generator().products()
        templates = await backends.generator().templates()
    except grpc.aio.AioRpcError as exc:
        return Choices(), Choices(), friendly_error(exc, "generator", backends.generator_address)
    product_choices = [(p.display_name or p.id, p.id) for p in products]
    return Choices(product_choices), _scene_choices(templates), ""


def _scene_choices(templates: list[generator_pb2.Template]) -> Choices:
    ready_made = [t for t in templates if not t.free_text]
    names = Counter(t.name or t.id for t in ready_made)
    # Scenes of other categories may share a name ("Beach"): then the id tells them apart.
    return Choices(
        [(t.name if names[t.name] == 1 else f"{t.name} · {t.id}", t.id) if t.name else (t.id, t.id) for t in ready_made]
    )


async def scenes_for(backends: Backends, products: list[str]) -> tuple[Choices, str]:
    """The ready-made scenes offered for any of the picked products (all of them when none is picked), so
    the list never offers a scene the generator would refuse for every pick; or why there are none."""
    generator = backends.generator()
    try:
        if not products:
            return _scene_choices(await generator.templates()), ""
        offered: dict[str, generator_pb2.Template] = {}
        for product in products:
            for template in await generator.templates(product_id=product):
                offered.setdefault(template.id, template)
    except grpc.aio.AioRpcError as exc:
        return Choices(), friendly_error(exc, "generator", backends.generator_address)
    return _scene_choices(list(offered.values())), ""


async def picked_catalogue(
    backends: Backends, products: list[str], scenes: list[str], images: float | None
) -> tuple[Path | None, list[str]]:
    """A catalogue file of the picks (one row per product, the picked scenes it offers) and notes on what
    was left out; no file, with the reason, when nothing is left."""
    if not products or not scenes:
        return None, ["Pick at least one product and one scene, or upload a catalogue file."]
    try:
        offer = await fetch_offer(backends.generator(), set(products))
    except grpc.aio.AioRpcError as exc:
        return None, [friendly_error(exc, "generator", backends.generator_address)]
    rows, notes = [], []
    for product in products:
        offered = offer.product_scenes.get(product)
        if offered is None:
            rows.append((product, ";".join(scenes)))  # unknown: validation says so, by row
            continue
        kept = [s for s in scenes if s in offered]
        left = [s for s in scenes if s not in offered]
        if left:
            notes.append(f"{product}: {', '.join(left)} not offered for it, left out.")
        if kept:
            rows.append((product, ";".join(kept)))
    if not rows:
        return None, [*notes, "No picked scene is offered for the picked products."]
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["product", "scenes", "images"])
    count = int(images) if images is not None and images == images else 1
    writer.writerows((product, scene_list, count) for product, scene_list in rows)
    # Named by its content: validating the same picks again (then starting them) writes no second file.
    folder = backends.files_dir / "catalogue-picks" / hashlib.sha256(text.getvalue().encode()).hexdigest()[:12]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "picked.csv"
    path.write_text(text.getvalue())
    return path, notes


async def check(registry: JobRegistry, backends: Backends, path: Path) -> tuple[list[str], int]:
    """Every problem of the file, as `client.catalogue.spec` says them (none: it can run), and its images."""
    try:
        return await registry.validate(path)
    except grpc.aio.AioRpcError as exc:
        return [friendly_error(exc, "generator", backends.generator_address)], 0


def problems_markdown(problems: list[str], notes: list[str], images: int) -> str:
    lines = [f"- {html.escape(n)}" for n in notes]
    if problems:
        lines.insert(0, f"**{len(problems)} problem(s); the job cannot start:**")
        lines += [f"- {html.escape(p)}" for p in problems]
    else:
        lines.insert(0, f"The catalogue is valid: {images} image(s).")
    return "\n".join(lines)


def job_choices(views: list[JobView], current: str | None) -> Choices:
    choices = [(f"{v.job} · {v.state.value}", v.job) for v in views]
    ids = [v.job for v in views]
    return Choices(choices, current if current in ids else (ids[0] if ids else None))


def jobs_html(views: list[JobView]) -> str:
    """Every job with its state and counts, newest first."""
    if not views:
        return "<p>No catalogue jobs yet.</p>"
    rows = "".join(
        f'<tr data-job="{html.escape(v.job)}" data-state="{v.state.value}"><td>{html.escape(v.job)}</td>'
        f"<td>{v.state.value}</td><td>{v.done}</td><td>{v.failed}</td><td>{v.total}</td>"
        f"<td>{v.images_per_minute:.1f}</td><td>{time.strftime('%H:%M:%S', time.localtime(v.started))}</td></tr>"
        for v in views
    )
    names = ("Job", "State", "Done", "Failed", "Total", "Images/min", "Started")
    head = "<tr>" + "".join(f"<th>{n}</th>" for n in names) + "</tr>"
    return f'<table class="catalogue-jobs">{head}{rows}</table>'


def job_html(view: JobView | None) -> str:
    """The chosen job: a bar, its counts and message, and its items with their state."""
    if view is None:
        return ""
    fraction = view.done / view.total if view.total else 0.0
    counts = (
        f"<b>{html.escape(view.job)}</b>: {view.state.value}. {view.done} done, {view.failed} failed, "
        f"{view.total} in all; {view.images_per_minute:.1f} images per minute."
    )
    parts = [f'<progress max="1" value="{fraction:.3f}"></progress>', f'<div class="job-counts">{counts}</div>']
    if view.message:
        parts.append(f'<div class="job-message">{html.escape(view.message)}</div>')
    if view.problems:
        parts.append("<ul>" + "".join(f"<li>{html.escape(p)}</li>" for p in view.problems) + "</ul>")
    order = {ItemState.FAILED: 0, ItemState.RETRYING: 1, ItemState.PENDING: 2, ItemState.DONE: 3}
    items = sorted(view.items, key=lambda i: order[i.state])
    rows = "".join(
        f'<tr data-state="{i.state.value}"><td>{html.escape(i.subject)}</td><td>{html.escape(i.scene)}</td>'
        f"<td>{i.index}</td><td>{i.state.value}</td><td>{html.escape(i.note)}</td></tr>"
        for i in items[:MAX_ITEMS_SHOWN]
    )
    more = f"<p>… and {len(items) - MAX_ITEMS_SHOWN} more.</p>" if len(items) > MAX_ITEMS_SHOWN else ""
    if rows:
        head = "<tr><th>Product</th><th>Scene</th><th>#</th><th>State</th><th>Note</th></tr>"
        parts.append(f'<table class="catalogue-items">{head}{rows}</table>{more}')
    return "".join(parts)


def can_stop(view: JobView | None) -> bool:
    return view is not None and view.state in (JobState.CHECKING, JobState.RUNNING)


def can_resume(view: JobView | None) -> bool:
    return view is not None and view.state in (JobState.STOPPED, JobState.FAILED)


async def gallery(backends: Backends, view: JobView | None) -> list[tuple[str, str]]:
    """The job's stored images (the newest MAX_GALLERY), copied where the page serves files from."""
    if view is None:
        return []
    records = list(JobDir(view.folder).read_index().values())[-MAX_GALLERY:]
    folder = backends.files_dir / "catalogue" / view.job
    shown = []
    for r in sorted(records, key=lambda r: (r.row, r.subject, r.scene, r.index)):
        path = folder / f"{r.request_id}.png"
        if not path.exists():
            try:
                data = await read_image(r, None)
            except Exception:
                continue  # e.g. an S3 URL that expired: the zip and gallery.html say more
            folder.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        shown.append((str(path), f"{r.subject} · {r.scene} #{r.index} · seed {r.seed}"))
    return shown
