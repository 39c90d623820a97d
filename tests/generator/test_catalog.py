"""Catalog unit tests: template selection per category and prompt composition."""

from __future__ import annotations

import pytest

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.generator.catalog import Catalog, TemplateCatalog, compose_prompt
from tests.helpers import ROOT


@pytest.fixture(scope="module")
def templates() -> TemplateCatalog:
    return TemplateCatalog.load(ROOT / "templates" / "catalog.yaml")


def test_replaced_system_scenes_are_shipped(templates):
    scenes = {t.id: t.scene for t in templates.templates}
    assert scenes["flowers"].startswith("eden, luxury cosmetics")
    assert scenes["fire"].endswith("action movie poster")
    assert (
        templates.defaults.prompt
        == "a detailed advertising realistic photo of {product} in the center, best quality, {scene}"
    )
    assert templates.defaults.negative_prompt.startswith("cheap, distorted")


def test_demo_category_gets_only_its_own_short_scenes(templates):
    demo = [t.id for t in templates.for_category("demo")]
    assert demo[0] == "demo-beach" and "beach" not in demo and "demo-custom" in demo
    shoes = [t.id for t in templates.for_category("shoes")]
    assert shoes == ["flowers", "beach", "dogs", "fire", "minimal", "custom"]
    assert len(templates.for_category("")) == len(templates.templates)


def test_compose_with_demo_template(tiny_world, templates):
    catalog = Catalog(tiny_world / "products", tiny_world / "adapters", ROOT / "templates" / "catalog.yaml")
    star = catalog.product("tiny-star")
    composed = compose_prompt(star, templates.get("demo-fire"), "", None, templates.defaults)
    assert composed.prompt == "a photo of <tiny-star> in front of a fire" and composed.negative_prompt == ""
    with pytest.raises(NotFound):
        catalog.product("ghost")
    with pytest.raises(InvalidArgument):
        catalog.product("bad/id")


def test_bad_manifests_are_skipped_not_fatal(tmp_path, tiny_world):
    import shutil

    products = tmp_path / "products"
    shutil.copytree(tiny_world / "products", products)
    (products / "broken").mkdir()
    (products / "broken" / "manifest.yaml").write_text("display_name: [unclosed")
    (products / "pickled").mkdir()
    (products / "pickled" / "manifest.yaml").write_text("display_name: P\nadapter: lora.bin\n")
    (products / "pickled" / "lora.bin").write_bytes(b"\x80\x04")
    catalog = Catalog(products, tmp_path / "none", ROOT / "templates" / "catalog.yaml")
    assert set(catalog.products) == {"tiny-star", "tiny-mug"}
    with pytest.raises(FailedPrecondition, match=r"lora\.bin is a pickle file; only \.safetensors"):
        catalog.product("pickled")
    with pytest.raises(FailedPrecondition, match="manifest is invalid"):
        catalog.product("broken")


def test_adapter_scope_decides_whether_a_style_stays_off_the_product(tmp_path, tiny_world):
    # manifest `scope`: "scene" (default) keeps a style/background off a stacked product (regional.py);
    # "image" lets it restyle the product too; anything else is an invalid manifest.
    import shutil

    import yaml

    adapters = tmp_path / "adapters"
    shutil.copytree(tiny_world / "adapters", adapters)
    (style,) = [p for p in adapters.iterdir() if (p / "manifest.yaml").exists()]
    manifest = yaml.safe_load((style / "manifest.yaml").read_text())
    for scope, name in (("image", "painted"), ("everywhere", "wrong")):
        shutil.copytree(style, adapters / name)
        (adapters / name / "manifest.yaml").write_text(yaml.safe_dump({**manifest, "scope": scope}))
    catalog = Catalog(tiny_world / "products", adapters, ROOT / "templates" / "catalog.yaml")
    default = catalog.adapter(style.name).spec(1.0)
    assert default.kind == "style" and default.scene_only and default.phrases == tuple(manifest["tokens"])
    assert not catalog.adapter("painted").spec(1.0).scene_only
    assert not catalog.product("tiny-star").spec(1.0).scene_only
    with pytest.raises(FailedPrecondition, match="manifest is invalid"):
        catalog.adapter("wrong")
