"""The catalogue file: CSV or YAML, one row per product (or product photo), and its validation.

Validation reports every problem at once, each with its row, column and a sentence, in two passes:
`parse` needs only the file and the filesystem; `check_offer` checks what remains against what the live
generator offers (`Offer`: ListProducts, ListTemplates, ListAdapters), and resolves `scenes: all`.
Rows are numbered from 1 in the order they appear (the CSV header is not a row); CSV problems also name
the line, so an editor can jump to it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import urllib.parse
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from PIL import Image, UnidentifiedImageError

COLUMNS = ("product", "photo", "scenes", "images", "size", "adapters", "seed", "upscale", "prompt")
ALL = "all"
MAX_IMAGES_PER_SCENE = 1000  # a typo like 1000000 should be a problem, not a week of rendering
MAX_WEIGHT = 4.0  # the generator's own bound (planning.MAX_WEIGHT)
MAX_SEED = 2**63 - 1
TRUE = {"1", "true", "yes", "y", "on"}
FALSE = {"", "0", "false", "no", "n", "off"}


@dataclass(frozen=True)
class Problem:
    """One bad cell (or a whole-file problem when `row` is 0)."""

    row: int
    column: str
    problem: str
    line: int = 0

    def __str__(self) -> str:
        if not self.row:
            return f"{self.column}: {self.problem}" if self.column else self.problem
        where = f"row {self.row}" + (f" (line {self.line})" if self.line else "")
        return f"{where}, column {self.column}: {self.problem}"


@dataclass(frozen=True)
class Photo:
    """A product photo for placement mode: a local file (sent as bytes) or an s3:// URI (sent as a URI)."""

    location: str  # absolute path, or the s3:// URI
    is_uri: bool
    digest: str  # sha256 of a local file's bytes; of the URI for s3:// (the server reads it)


@dataclass(frozen=True)
class AdapterUse:
    adapter_id: str
    weight: float


@dataclass(frozen=True)
class Row:
    """One valid row. `scenes` is `("all",)` until `check_offer` resolves it."""

    number: int
    line: int
    product: str
    photo: Photo | None
    photo_text: str  # as written in the file, for the index and the gallery
    scenes: tuple[str, ...]
    images: int
    width: int
    height: int
    adapters: tuple[AdapterUse, ...]
    seed: int | None
    upscale: bool
    prompt: str

    @property
    def subject(self) -> str:
        """What the row shows, for people: the product id, else the photo's file name."""
        return self.product or Path(self.photo_text).name or self.photo_text


@dataclass
class Catalogue:
    path: Path
    rows: list[Row] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def bad_rows(self) -> set[int]:
        return {p.row for p in self.problems}


@dataclass(frozen=True)
class Offer:
    """What the live generator offers, fetched once before a job is checked or run."""

    products: frozenset[str]
    product_scenes: dict[str, tuple[str, ...]]  # ListTemplates(product_id), in the server's order
    placement_scenes: tuple[str, ...]  # every template that suits placement mode
    free_text: frozenset[str]  # templates whose scene is the row's prompt
    adapters: frozenset[str]


# Parsing


def read_table(path: Path) -> tuple[list[tuple[int, int, dict[str, Any]]], list[Problem]]:
    """[(row number, line, {column: value})] from a CSV or YAML file, and file-level problems."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        return [], [Problem(0, "", f"{path}: {exc.strerror or exc}")]
    except UnicodeDecodeError:
        return [], [Problem(0, "", f"{path}: not a UTF-8 text file")]
    if path.suffix.lower() in (".yaml", ".yml"):
        return _read_yaml(text)
    return _read_csv(text)


def _read_csv(text: str) -> tuple[list[tuple[int, int, dict[str, Any]]], list[Problem]]:
    reader = csv.DictReader(io.StringIO(text), skipinitialspace=True)
    header = [h.strip().lower() for h in reader.fieldnames or []]
    problems = [Problem(0, h, "unknown column; known: " + ", ".join(COLUMNS)) for h in header if h not in COLUMNS]
    if "product" not in header and "photo" not in header:
        problems.append(Problem(0, "", "the header needs a product column, a photo column, or both"))
    if problems:
        return [], problems
    reader.fieldnames = header
    rows: list[tuple[int, int, dict[str, Any]]] = []
    for raw in reader:
        values = {k: (v or "").strip() for k, v in raw.items() if k is not None}
        if any(values.values()):  # a line of empty cells is not a row
            # The line the row ends on: exact for one-line rows (a quoted newline is rare here).
            rows.append((len(rows) + 1, reader.line_num, values))
    return rows, []


def _read_yaml(text: str) -> tuple[list[tuple[int, int, dict[str, Any]]], list[Problem]]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return [], [Problem(0, "", f"not valid YAML: {exc}")]
    if isinstance(data, dict):
        data = data.get("rows")
    if not isinstance(data, list):
        return [], [Problem(0, "", "give a list of rows (or a mapping with `rows:`)")]
    rows, problems = [], []
    for number, entry in enumerate(data, 1):
        if not isinstance(entry, dict):
            problems.append(Problem(number, "", "a row is a mapping of column: value"))
            continue
        values = {str(k).strip().lower(): v for k, v in entry.items()}
        problems += [Problem(number, k, "unknown column") for k in values if k not in COLUMNS]
        rows.append((number, 0, values))
    return rows, problems


def parse(path: Path) -> Catalogue:
    """The file's rows, checked without the generator: counts, sizes, adapters' syntax, seeds, photos."""
    path = Path(path)
    table, problems = read_table(path)
    catalogue = Catalogue(path, problems=problems)
    for number, line, values in table:
        row, row_problems = _parse_row(number, line, values, path.parent)
        catalogue.problems += row_problems
        if row is not None and not row_problems:
            catalogue.rows.append(row)
    catalogue.problems.sort(key=lambda p: (p.row, p.column))
    return catalogue


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _parse_row(number: int, line: int, values: dict[str, Any], base: Path) -> tuple[Row | None, list[Problem]]:
    problems: list[Problem] = []

    def bad(column: str, problem: str) -> None:
        problems.append(Problem(number, column, problem, line))

    product = _text(values.get("product"))
    photo_text = _text(values.get("photo"))
    if not product and not photo_text:
        bad("product", "give a product id, a photo, or both")
    photo = _photo(photo_text, base, bad) if photo_text else None
    scenes = _scenes(values.get("scenes"), bad)
    images = _count(values.get("images"), bad)
    width, height = _size(_text(values.get("size")), bad)
    adapters = _adapters(values.get("adapters"), bad)
    seed = _seed(_text(values.get("seed")), images, bad)
    upscale = _bool(values.get("upscale"), bad)
    prompt = _text(values.get("prompt"))
    if problems:
        return None, problems
    row = Row(number, line, product, photo, photo_text, scenes, images, width, height, adapters, seed, upscale, prompt)
    return row, []


def _photo(text: str, base: Path, bad: Any) -> Photo | None:
    if text.startswith("s3://"):
        bucket, _, key = text[5:].partition("/")
        if not bucket or not key:
            bad("photo", f"{text!r} is not an s3://bucket/key URI")
            return None
        # The server reads it from its own storage (ProductImage.uri); it checks the bytes.
        return Photo(text, True, hashlib.sha256(text.encode()).hexdigest())
    if text.startswith("file://"):
        text = urllib.parse.unquote(urllib.parse.urlparse(text).path)
    elif "://" in text:
        bad("photo", f"{text!r}: give a path, a file:// URI or an s3:// URI")
        return None
    path = (base / Path(text).expanduser()).resolve()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        bad("photo", f"{path}: no such file")
        return None
    except IsADirectoryError:
        bad("photo", f"{path}: is a folder, not an image")
        return None
    except OSError as exc:
        bad("photo", f"{path}: {exc.strerror or exc}")
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()  # the header and structure, without decoding every pixel
            if im.format not in ("PNG", "JPEG", "WEBP"):
                bad("photo", f"{path}: a {im.format} image; give a PNG or JPEG")
                return None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        bad("photo", f"{path}: not an image (PNG or JPEG)")
        return None
    return Photo(str(path), False, hashlib.sha256(data).hexdigest())


def _scenes(value: Any, bad: Any) -> tuple[str, ...]:
    if isinstance(value, list):
        names = [_text(v) for v in value]
    else:
        names = [s.strip() for s in _text(value).replace("|", ";").split(";")]
    names = [n for n in names if n]
    if not names:
        bad("scenes", "give scene template ids separated by ';' (or 'all')")
        return ()
    if ALL in names:
        if len(names) > 1:
            bad("scenes", "'all' stands alone")
        return (ALL,)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        bad("scenes", f"listed twice: {', '.join(duplicates)}")
    return tuple(dict.fromkeys(names))


def _count(value: Any, bad: Any) -> int:
    text = _text(value)
    if not text:
        return 1
    try:
        count = int(text)
    except ValueError:
        bad("images", f"{text!r} is not a whole number")
        return 1
    if not 1 <= count <= MAX_IMAGES_PER_SCENE:
        bad("images", f"must be between 1 and {MAX_IMAGES_PER_SCENE}, got {count}")
    return count


def _size(text: str, bad: Any) -> tuple[int, int]:
    if not text:
        return 0, 0  # the template's, else the model's
    w, sep, h = text.lower().partition("x")
    try:
        width, height = int(w), int(h)
    except ValueError:
        bad("size", f"{text!r}: give WIDTHxHEIGHT, e.g. 512x512, or leave it empty")
        return 0, 0
    if not sep or width < 16 or height < 16 or width % 8 or height % 8:
        bad("size", f"{text!r}: both sides must be multiples of 8, at least 16")
    return width, height


def _adapters(value: Any, bad: Any) -> tuple[AdapterUse, ...]:
    if isinstance(value, dict):
        specs = [f"{k}:{v}" for k, v in value.items()]
    elif isinstance(value, list):
        specs = [_text(v) for v in value]
    else:
        specs = _text(value).replace("|", ";").split(";")
    uses: list[AdapterUse] = []
    for spec in (s.strip() for s in specs):
        if not spec:
            continue
        name, _, weight_text = spec.partition(":")
        name = name.strip()
        try:
            weight = float(weight_text) if weight_text.strip() else 0.0  # 0: the adapter's default
        except ValueError:
            bad("adapters", f"{spec!r}: the weight must be a number (id:weight)")
            continue
        if not name:
            bad("adapters", f"{spec!r}: give id:weight")
        elif not math.isfinite(weight) or abs(weight) > MAX_WEIGHT:
            bad("adapters", f"{spec!r}: the weight must be in [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}]")
        elif name in (u.adapter_id for u in uses):
            bad("adapters", f"{name!r} is listed twice")
        else:
            uses.append(AdapterUse(name, weight))
    return tuple(uses)


def _seed(text: str, images: int, bad: Any) -> int | None:
    if not text:
        return None
    try:
        seed = int(text)
    except ValueError:
        bad("seed", f"{text!r} is not a whole number")
        return None
    if not 0 <= seed <= MAX_SEED - images:
        bad("seed", f"must be in [0, 2^63 - images], got {seed}")
    return seed


def _bool(value: Any, bad: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = _text(value).lower()
    if text in TRUE:
        return True
    if text not in FALSE:
        bad("upscale", f"{text!r}: give true or false")
    return False


# Against the live generator


def check_offer(catalogue: Catalogue, offer: Offer) -> Catalogue:
    """Rows checked against what the generator offers, `all` resolved; bad rows move to `problems`."""
    rows, problems = [], list(catalogue.problems)
    for row in catalogue.rows:
        row_problems: list[Problem] = []

        def bad(column: str, problem: str, row: Row = row, out: list[Problem] = row_problems) -> None:
            out.append(Problem(row.number, column, problem, row.line))

        scenes = _offered_scenes(row, offer, bad)
        for use in row.adapters:
            if use.adapter_id not in offer.adapters:
                known = ", ".join(sorted(offer.adapters)) or "none"
                bad("adapters", f"unknown adapter {use.adapter_id!r}; ListAdapters offers: {known}")
        if row_problems:
            problems += row_problems
        else:
            rows.append(replace(row, scenes=scenes))
    return Catalogue(catalogue.path, rows, _with_duplicates(rows, problems))


def _offered_scenes(row: Row, offer: Offer, bad: Any) -> tuple[str, ...]:
    if row.product and row.product not in offer.products:
        bad("product", f"unknown product {row.product!r}; ListProducts offers: {', '.join(sorted(offer.products))}")
        return ()
    if row.product:
        offered = offer.product_scenes.get(row.product, ())
        whose = f"product {row.product!r}"
        if row.photo is not None:
            offered = tuple(s for s in offered if s in offer.placement_scenes)
            whose += " in placement mode"
    else:
        offered, whose = offer.placement_scenes, "placement mode"
    if row.scenes == (ALL,):
        # `all`: every scene offered, less the free-text ones unless the row gives the text.
        scenes = tuple(s for s in offered if row.prompt or s not in offer.free_text)
        if not scenes:
            bad("scenes", f"no scene is offered for {whose}")
        return scenes
    for scene in row.scenes:
        if scene not in offered:
            bad("scenes", f"scene {scene!r} is not offered for {whose}; offered: {', '.join(offered) or 'none'}")
        elif scene in offer.free_text and not row.prompt:
            bad("scenes", f"scene {scene!r} is free text: give the row a prompt")
    return row.scenes


def _with_duplicates(rows: list[Row], problems: list[Problem]) -> list[Problem]:
    """Two rows that would render the same images (same identity, overlapping scenes) are a mistake."""
    seen: dict[tuple[str, str], int] = {}
    for row in rows:
        key = row_key(row)
        for scene in row.scenes:
            first = seen.setdefault((key, scene), row.number)
            if first != row.number:
                problems.append(
                    Problem(
                        row.number,
                        "scenes",
                        f"scene {scene!r} repeats row {first} (same product and settings)",
                        row.line,
                    )
                )
                break
    return sorted(problems, key=lambda p: (p.row, p.column))


def row_key(row: Row) -> str:
    """The row's identity: 8 hex digits over everything that changes its images except scenes and count,
    so adding a scene or raising `images` keeps what is stored, and rows may move in the file."""
    identity = {
        "product": row.product,
        "photo": row.photo.digest if row.photo else "",
        "size": [row.width, row.height],
        "adapters": sorted([u.adapter_id, u.weight] for u in row.adapters),
        "seed": row.seed,
        "prompt": row.prompt,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]


def without_bad_rows(catalogue: Catalogue) -> Catalogue:
    """The good rows only (--skip-bad-rows): a row with a duplicate problem is dropped too."""
    bad = catalogue.bad_rows
    return Catalogue(catalogue.path, [r for r in catalogue.rows if r.number not in bad], catalogue.problems)
