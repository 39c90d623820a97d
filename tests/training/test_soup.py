"""`python -m training.soup`: the mean of several training runs' adapters, exact or compressed, drawn by the
generator as the mean it claims to be, and bad soups refused."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.training.helpers import config, square
from training import TrainingError
from training.lora import train
from training.soup import NAMINGS, main, soup

ADAPTER, EMBEDDINGS = "pytorch_lora_weights.safetensors", "embeddings.safetensors"


@pytest.fixture(scope="module")
def runs(tiny_world, tmp_path_factory) -> SimpleNamespace:
    """Two short runs (seeds 0 and 1) of one product: learned token, UNet attention + conv and text-encoder LoRA."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    photos = tmp_path_factory.mktemp("photos")
    for i in range(3):
        square(8 + 9 * i, 12 + 5 * i).save(photos / f"shot{i}.png")
    root = tmp_path_factory.mktemp("runs")
    folders = []
    for seed in (0, 1):
        cfg = config(
            root / f"seed{seed}" / "red-square",
            tiny_world / "tiny-sd",
            photos,
            root / f"work{seed}",
            steps=6,
            seed=seed,
            rank=4,
            learn_token=True,
            init_word="square",
            train_text_encoder=True,
        )
        train(cfg)
        folders.append(cfg.out)
    torch.set_num_threads(threads)
    return SimpleNamespace(folders=folders, root=root, base=tiny_world / "tiny-sd")


def deltas(folder: Path) -> dict[str, torch.Tensor]:
    """up @ down per module (a conv's kernel flattened), in float64."""
    weights = load_file(folder / ADAPTER)
    out = {}
    for key, down in weights.items():
        for d, u in NAMINGS:
            if d in key:
                up = weights[key.replace(d, u)].double()
                out[key] = up.reshape(up.shape[0], -1) @ down.double().reshape(down.shape[0], -1)
    return out


def test_a_soup_is_the_mean_of_its_runs_deltas(runs, tmp_path):
    out = tmp_path / "products" / "red-square"
    result = soup(runs.folders, out, default_scale=1.25)
    assert (result.runs, result.rank) == (2, 8)  # ranks stacked: 4 + 4
    mine, a, b = deltas(out), deltas(runs.folders[0]), deltas(runs.folders[1])
    assert mine.keys() == a.keys() and any("conv1" in k for k in mine) and any("text_encoder" in k for k in mine)
    for key in mine:
        torch.testing.assert_close(mine[key], (a[key] + b[key]) / 2, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(a[key], b[key])  # the runs differ: the mean is not either of them
    learned = [load_file(f / EMBEDDINGS)["<red-square>"] for f in (out, *runs.folders)]
    torch.testing.assert_close(learned[0], (learned[1] + learned[2]) / 2)
    manifest = yaml.safe_load((out / "manifest.yaml").read_text())
    assert manifest["default_scale"] == 1.25 and manifest["tokens"] == ["<red-square>"]
    assert manifest["soup"] == {"runs": [str(f) for f in runs.folders], "rank": "exact"}
    assert [p.name for p in out.parent.iterdir()] == ["red-square"]  # no temp folder left


def test_a_compressed_soup_is_the_best_rank_r_approximation(runs, tmp_path):
    out = tmp_path / "r3"
    assert soup(runs.folders, out, rank=3).rank == 3
    mine, a, b = deltas(out), deltas(runs.folders[0]), deltas(runs.folders[1])
    for key in mine:
        mean = (a[key] + b[key]) / 2
        tail = torch.linalg.svdvals(mean)[3:]
        # Eckart-Young: the error of the best rank-3 approximation is the norm of the dropped singular values.
        error = torch.linalg.matrix_norm(mine[key] - mean).item()
        assert error == pytest.approx(tail.norm().item(), rel=1e-3, abs=1e-6)


def test_the_generator_draws_a_soup_of_one_run_twice_as_that_run(runs, tmp_path):
    from services.generator.catalog import scan_folder
    from services.generator.messages import RenderSettings
    from services.generator.pipeline import ProductPipeline

    # Stacked ranks double the rank; the loader must still apply scale 1 (alpha = rank), or the image moves.
    twice = tmp_path / "twice" / "red-square"
    soup([runs.folders[0], runs.folders[0]], twice)
    pipe = ProductPipeline(str(runs.base), "cpu")
    images = []
    for folder in (runs.folders[0].parent, twice.parent, runs.folders[1].parent):
        entry = scan_folder(folder, ("product",))["red-square"]
        s = RenderSettings("a photo of <red-square> on the beach", "", 4, 5.0, 32, 32, "", (entry.spec(1.0),))
        images.append(np.asarray(pipe(s, (5,))[0]).astype(int))
    assert np.abs(images[1] - images[0]).max() <= 1
    assert np.abs(images[2] - images[0]).max() > 8  # another run draws another image: the check can fail


def test_bad_soups_fail_clearly(runs, tiny_world, tmp_path, capsys):
    other = tiny_world / "products" / "tiny-star"  # another product: token <tiny-star>, older naming, no embeddings
    cases = [
        ([str(tmp_path / "a"), str(runs.folders[0])], "at least two runs"),
        ([str(tmp_path / "b"), str(runs.folders[0]), str(tmp_path)], "no manifest.yaml"),
        ([str(tmp_path / "c"), str(runs.folders[0]), str(other)], "its tokens ['<tiny-star>'] differs"),
        ([str(runs.folders[1]), *map(str, runs.folders)], "already exists; pass --overwrite"),
        ([str(tmp_path / "d"), *map(str, runs.folders), "--rank", "0"], "--rank: must be at least 1"),
    ]
    for argv, message in cases:
        assert main(argv) == 1, argv
        assert message in capsys.readouterr().err, argv
    assert not (tmp_path / "c").exists()
    with pytest.raises(TrainingError, match="differs"):
        soup([other, runs.folders[0]], tmp_path / "e")


def test_adapters_in_the_older_diffusers_naming_mix_too(tiny_world, tmp_path):
    star = tiny_world / "products" / "tiny-star"  # `lora.down` / `lora.up`, no learned tokens
    out = tmp_path / "tiny-star"
    assert soup([star, star], out, rank=2).rank == 2
    assert all(".lora.down." in k or ".lora.up." in k for k in load_file(out / ADAPTER))
    mine, theirs = deltas(out), deltas(star)
    for key in mine:
        s = torch.linalg.svdvals(theirs[key])
        error = torch.linalg.matrix_norm(mine[key] - theirs[key]).item()
        assert error == pytest.approx(s[2:].norm().item(), rel=1e-3, abs=1e-5)  # the rank-2 tail of the run itself
    assert not (out / EMBEDDINGS).exists()
