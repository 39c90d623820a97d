"""Products, style/background adapters and scene templates, and how a prompt is composed.

Products and adapters are folders with a `manifest.yaml` beside their `.safetensors`. The
folders are rescanned on every listing and before every request, so a newly trained product
appears without a restart.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.ids import ID_PATTERN, is_valid_id  # noqa: F401  (ID_PATTERN: training imports it from here)
from services.generator.messages import AdapterSpec, Shadow
from services.generator.options import adapter_rank

log = logging.getLogger(__name__)

MANIFEST = "manifest.yaml"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class Manifest(BaseModel):
    """What a product or adapter folder declares about itself."""

    model_config = ConfigDict(extra="ignore")

    display_name: str
    kind: Literal["product", "style", "background"] = "product"
    category: str = ""
    tokens: list[str] = Field(default_factory=list)
    # Text standing for the product in prompts; defaults to the tokens joined.
    prompt_phrase: str = ""
    adapter: str = "pytorch_lora_weights.safetensors"
    # Learned token embeddings (textual inversion / pivotal tuning), if any.
    embeddings: str | None = None
    default_scale: float = 1.0
    # Products: the classifier-free guidance the adapter was validated at (demo.make_products chooses it with the
    # scale), used in LoRA mode when a request gives none, over the template's. An adapter trained on a few photos
    # can be over-driven at a scene template's guidance (the product drawn too large, its colours cast; FIDELITY.md).
    # None: the template's.
    guidance_scale: float | None = Field(None, gt=0, le=50)
    # Style/background adapters: "scene" keeps them off a stacked product (services/generator/regional.py),
    # "image" lets them repaint the product too (a painting style that should restyle everything).
    scope: Literal["scene", "image"] = "scene"
    description: str = ""
    base_model: str = ""


@dataclass(frozen=True)
class Entry:
    """A product or adapter found on disk."""

    id: str
    manifest: Manifest
    folder: Path

    @property
    def adapter_path(self) -> Path:
        return self.folder / self.manifest.adapter

    @property
    def embeddings_path(self) -> Path | None:
        return self.folder / self.manifest.embeddings if self.manifest.embeddings else None

    @property
    def phrase(self) -> str:
        return self.manifest.prompt_phrase or "".join(self.manifest.tokens) or self.manifest.display_name

    @property
    def version(self) -> str:
        # Changes when the adapter file is replaced, so worker caches never serve stale weights.
        stat = self.adapter_path.stat()
        return f"{self.id}@{stat.st_mtime_ns}-{stat.st_size}"

    def spec(self, weight: float) -> AdapterSpec:
        """What a worker needs to load and apply this adapter at `weight`."""
        return AdapterSpec(
            key=self.version,
            path=str(self.adapter_path),
            weight=float(weight),
            embeddings=str(self.embeddings_path) if self.embeddings_path else None,
            tokens=tuple(self.manifest.tokens) if self.embeddings_path else (),
            kind=self.manifest.kind,
            phrases=tuple(self.manifest.tokens) if self.manifest.kind != "product" else (),
            scene_only=self.manifest.kind != "product" and self.manifest.scope == "scene",
        )


def scan_folder(
    root: Path, kinds: tuple[str, ...], problems: dict[str, str] | None = None, max_rank: int = 0
) -> dict[str, Entry]:
    """Entries of `kinds` under `root`; folders that cannot be served go to `problems` with the reason.

    `max_rank` (> 0): the rank of the compiled/hot-swap LoRA slots; an adapter above it cannot be served.
    """
    entries: dict[str, Entry] = {}
    problems = {} if problems is None else problems
    if not root.is_dir():
        return entries
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        path = folder / MANIFEST
        if not path.is_file() or not is_valid_id(folder.name):
            continue
        try:
            manifest = Manifest.model_validate(yaml.safe_load(path.read_text()) or {})
        except (yaml.YAMLError, ValidationError, OSError) as exc:
            problems[folder.name] = f"its manifest is invalid: {str(exc).splitlines()[0]}"
            log.warning("skipping %s: bad manifest: %s", folder, exc)
            continue
        if manifest.kind not in kinds:
            continue
        if manifest.adapter.endswith(PICKLE_SUFFIXES):
            problems[folder.name] = f"its adapter {manifest.adapter} is a pickle file; only .safetensors are accepted"
        elif not (folder / manifest.adapter).is_file():
            problems[folder.name] = f"its adapter file {manifest.adapter} is missing"
        elif max_rank and (rank := _rank(folder / manifest.adapter)) > max_rank:
            problems[folder.name] = (
                f"its LoRA rank {rank} is above the rank {max_rank} of the compiled LoRA slots "
                "(--hotswap-rank; restart the generator to serve it)"
            )
        if folder.name in problems:
            log.warning("skipping %s: %s", folder, problems[folder.name])
            continue
        entries[folder.name] = Entry(folder.name, manifest, folder)
    return entries


_RANKS: dict[tuple[str, int, int], int] = {}


def _rank(path: Path) -> int:
    """An adapter file's LoRA rank from its header, cached by (path, mtime, size): catalogs rescan often."""
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _RANKS:
        try:
            _RANKS[key] = adapter_rank(path)
        except (OSError, ValueError):
            _RANKS[key] = 0  # unreadable headers are reported when the adapter is loaded
    return _RANKS[key]


class TemplateShadow(BaseModel):
    """The contact shadow placement mode draws by default (services/generator/placement.py, `shadow_map`)."""

    model_config = ConfigDict(extra="forbid")

    strength: float = Field(0.5, ge=0, le=1)
    softness: float = Field(0.5, ge=0, le=1)
    offset_x: float = Field(0.0, ge=-1, le=1)
    offset_y: float = Field(0.0, ge=-1, le=1)

    def spec(self) -> Shadow | None:
        return Shadow(self.strength, self.softness, self.offset_x, self.offset_y) if self.strength > 0 else None


class TemplatePlacement(BaseModel):
    """Where placement mode puts the product by default (fractions of the frame), the scene's surface and the
    product's shadow on it."""

    model_config = ConfigDict(extra="forbid")

    center_x: float = Field(0.5, ge=0, le=1)
    center_y: float = Field(0.5, ge=0, le=1)
    height: float = Field(0.6, gt=0, le=1)
    # The scene's surface (a beach's sand, a studio floor, a table) as a fraction of the frame's height: a default
    # placement stands the product on it (its bottom on the line) instead of at center_y. None: no surface.
    ground: float | None = Field(None, gt=0, le=1)
    # The default contact shadow; None (scenes without a surface): none.
    shadow: TemplateShadow | None = None
    # A background adapter stacked (at its default weight) whenever placement mode runs in this scene, its
    # phrase added to the scene prompt: the scene with nothing in it, for a base model that draws an object
    # in every scene (the demo model: docs/FIDELITY.md, "Composite"). None: the request's adapters only.
    backdrop: str | None = None
    # Share of the denoising steps that draw the scene before the product's latents are held (a 4-channel UNet's
    # latent-blend inpainting; placement.join_step): 0, from the first step (the scene composes around the
    # product); 1, never (the scene is drawn whole, the product composited over it: nothing of the product's
    # colours leaks into the scene).
    scene_first: float = Field(0.0, ge=0, le=1)

    def box(self) -> dict[str, float]:
        """The placement proper (centre and height), as `placement.ProductBox` and the protobuf take it."""
        return {"center_x": self.center_x, "center_y": self.center_y, "height": self.height}


class Template(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    name: str
    scene: str = ""
    prompt: str = ""
    negative_prompt: str | None = None
    # Placement mode: the prompt outside the product's mask, with `{scene}` (the product is already there, so
    # the words that would draw it are left out: no second product beside it). Empty: "{scene}".
    scene_prompt: str = ""
    categories: list[str] = Field(default_factory=lambda: ["*"])
    free_text: bool = False
    # Per-template generation defaults (e.g. for small demo models).
    steps: int | None = None
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None
    # Placement mode: the default placement, or None where the template does not suit it.
    placement: TemplatePlacement | None = None

    def fits(self, category: str) -> bool:
        return "*" in self.categories or not category or category in self.categories


class TemplateCatalog(BaseModel):
    defaults: Template = Field(default_factory=lambda: Template(id="defaults", name="defaults"))
    templates: list[Template]
    # Categories served only by templates that name them (e.g. a small model with a short text encoder).
    exclusive_categories: list[str] = Field(default_factory=list)

    @classmethod
    def load(cls, path: str | Path) -> TemplateCatalog:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        defaults = Template(id="defaults", name="defaults", **(raw.get("defaults") or {}))
        templates = []
        for item in raw.get("templates") or []:
            merged = {
                "prompt": defaults.prompt,
                "scene_prompt": defaults.scene_prompt,
                "negative_prompt": defaults.negative_prompt,
                "placement": defaults.placement,
                **item,
            }
            templates.append(Template.model_validate(merged))
        return cls(defaults=defaults, templates=templates, exclusive_categories=raw.get("exclusive_categories") or [])

    def get(self, template_id: str) -> Template:
        for t in self.templates:
            if t.id == template_id:
                return t
        raise NotFound("template", template_id, f"known: {', '.join(t.id for t in self.templates)}")

    def suits(self, template: Template, category: str) -> bool:
        """Whether `template` is one of the scenes tested for `category` (what ListTemplates offers it)."""
        return template in self.for_category(category)

    def for_category(self, category: str) -> list[Template]:
        if not category:
            return list(self.templates)
        if category in self.exclusive_categories:
            return [t for t in self.templates if category in t.categories]
        return [
            t for t in self.templates if t.fits(category) and not set(t.categories) & set(self.exclusive_categories)
        ]


@dataclass(frozen=True)
class ComposedPrompt:
    prompt: str
    negative_prompt: str


# What stands for the product in prompts in placement mode without a product adapter.
PLACEMENT_PHRASE = "the product"


def compose_prompt(
    product: Entry | None,
    template: Template | None,
    user_text: str,
    negative: str | None,
    defaults: Template,
    extra_tokens: list[str] | None = None,
) -> ComposedPrompt:
    """The final prompt: template pattern + product phrase + scene (+ the user's text).

    - template with a scene: its scene, then the user's text appended;
    - free-text template ("custom"): the user's text is the scene;
    - no template: the user's text is the prompt; `{product}` marks the product, else it leads.
    """
    phrase = product.phrase if product is not None else PLACEMENT_PHRASE
    user_text = user_text.strip()
    if template is not None:
        scene = user_text if template.free_text else ", ".join(s for s in (template.scene, user_text) if s)
        pattern = template.prompt or defaults.prompt or "{product}, {scene}"
        prompt = pattern.replace("{product}", phrase).replace("{scene}", scene)
        default_negative = template.negative_prompt or ""
    else:
        prompt = user_text.replace("{product}", phrase) if "{product}" in user_text else f"{phrase}, {user_text}"
        default_negative = defaults.negative_prompt or ""
    return ComposedPrompt(with_phrases(prompt, extra_tokens), default_negative if negative is None else negative)


def default_guidance(product: Entry | None, template: Template | None, placement: bool, fallback: float) -> float:
    """The guidance a request that names none runs at: the product's own, what its adapter was validated at
    (LoRA mode only: a placement request draws the scene, not the product), else the template's, else `fallback`."""
    if product is not None and product.manifest.guidance_scale and not placement:
        return product.manifest.guidance_scale
    return template.guidance_scale if template is not None and template.guidance_scale else fallback


def with_phrases(prompt: str, phrases: list[str] | None) -> str:
    """`prompt`, then each stacked adapter's phrase it does not hold yet; empty comma runs folded."""
    for phrase in phrases or []:
        if phrase not in prompt:
            prompt = f"{prompt}, {phrase}"
    return re.sub(r"\s*,\s*(,\s*)+", ", ", prompt).strip(" ,")


def compose_scene_prompt(template: Template | None, user_text: str, extra_tokens: list[str] | None = None) -> str:
    """Placement mode's prompt outside the product: the template's scene (and the user's text) without the words
    that stand for the product, which is already in the picture; then the stacked adapters' phrases (a style's
    "at night", the backdrop's "empty"), as `compose_prompt` adds them."""
    user_text = user_text.strip()
    if template is None:
        scene = user_text.replace("{product}", "")
        pattern = "{scene}"
    else:
        scene = user_text if template.free_text else ", ".join(s for s in (template.scene, user_text) if s)
        pattern = template.scene_prompt or "{scene}"
    return with_phrases(re.sub(r"\s+", " ", pattern.replace("{scene}", scene)), extra_tokens)


class Catalog:
    """Products and adapters on disk plus the template file; cheap to rescan.

    Lookups read the last scan: a caller serving a request calls `refresh` once first (planning.py does), so a
    product or style adapter added on disk is served by the next request that names it, whatever kind it is.
    """

    def __init__(
        self, products_dir: str | Path, adapters_dir: str | Path, templates_file: str | Path, max_rank: int = 0
    ):
        self.max_rank = max_rank
        self.products_dir = Path(products_dir)
        self.adapters_dir = Path(adapters_dir)
        self.templates_file = Path(templates_file)
        self.templates = TemplateCatalog.load(self.templates_file)
        self.refresh()

    def refresh(self) -> None:
        self.problems: dict[str, str] = {}
        self.products = scan_folder(self.products_dir, ("product",), self.problems, self.max_rank)
        self.adapters = scan_folder(self.adapters_dir, ("style", "background"), self.problems, self.max_rank)

    def entries(self) -> list[Entry]:
        """Every servable product and adapter."""
        return list(self.products.values()) + list(self.adapters.values())

    def limit_rank(self, max_rank: int) -> None:
        """From now on, adapters above `max_rank` (the LoRA slots' rank) are problems, not entries."""
        self.max_rank = max_rank
        self.refresh()

    def product(self, product_id: str) -> Entry:
        if not product_id:
            raise InvalidArgument("product_id", "is required")
        if not is_valid_id(product_id):
            raise InvalidArgument("product_id", f"{product_id[:80]!r} is not a valid id")
        if product_id in self.problems and product_id not in self.products:
            raise FailedPrecondition(f"product {product_id!r} cannot be served: {self.problems[product_id]}")
        if product_id not in self.products:
            raise NotFound("product", product_id, "see ListProducts")
        return self.products[product_id]

    def adapter(self, adapter_id: str, field: str = "adapters") -> Entry:
        if not adapter_id or not is_valid_id(adapter_id):
            raise InvalidArgument(f"{field}.adapter_id", f"{adapter_id[:80]!r} is not a valid id")
        if adapter_id in self.problems and adapter_id not in self.adapters:
            raise FailedPrecondition(f"adapter {adapter_id!r} cannot be served: {self.problems[adapter_id]}")
        if adapter_id not in self.adapters:
            raise NotFound("adapter", adapter_id, "see ListAdapters")
        return self.adapters[adapter_id]

    def template(self, template_id: str) -> Template:
        return self.templates.get(template_id)
