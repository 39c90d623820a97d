"""Average product adapters trained from the same photos with different seeds (a "soup"), offline.

    python -m training.soup products/my-mug runs/seed0/my-mug runs/seed1/my-mug runs/seed2/my-mug
    python -m training.soup products/my-mug runs/seed*/my-mug --rank 32 --default-scale 1.25

Runs of one recipe that differ only by seed fail in different scenes, and the held-out ones are where they
differ most (docs/TRAINING.md "Stop 32": the demo mug's handle in a scene it never saw read 0.66-0.91 over
nine runs). The mean of their weight deltas is steadier than any one of them (model soups, Wortsman et al.
2022). Exact by default: each LoRA module's ranks are stacked, with the up-projections divided by the number
of runs, so up @ down is the runs' mean delta, at the sum of their ranks. `--rank R` keeps each module's best
rank-R approximation of that mean (SVD) for a smaller file. Learned token embeddings are averaged. The first
run's manifest is kept, with `soup` recording the runs, and `--default-scale` replaces its scale.

Every run must come from `training.lora` (alpha folded into the up-projection, so any loader applies scale
1) on the same base model, with the same tokens and LoRA modules.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from training import TrainingError
from training.convert import ADAPTER_FILE, EMBEDDINGS_FILE


@dataclass
class SoupResult:
    out: Path
    runs: int
    modules: int
    rank: int  # the largest rank in the written adapter
    megabytes: float


# PEFT naming (what training.lora writes) and the older diffusers naming; both carry no alpha.
NAMINGS = ((".lora_A.", ".lora_B."), (".lora.down.", ".lora.up."))


def _pairs(weights: dict[str, torch.Tensor], folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`X.lora_A.weight` + `X.lora_B.weight` (or `X.lora.down/up.weight`) -> {down's key: (down, up)}."""
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in weights:
        naming = next((n for n in NAMINGS if n[0] in key or n[1] in key), None)
        if naming is None:
            raise TrainingError(f"{folder}: {key} is not a LoRA down/up weight (alpha or other keys cannot be mixed)")
        down, up = naming
        if down not in key:
            continue
        if key.replace(down, up) not in weights:
            raise TrainingError(f"{folder}: {key} has no up-projection beside it")
        pairs[key] = (weights[key].float(), weights[key.replace(down, up)].float())
    return pairs


def _config(run: Path) -> Any:
    summary = run / "training.json"
    return json.loads(summary.read_text()).get("config") if summary.is_file() else None


@dataclass
class Run:
    """One training run's product folder, read once."""

    folder: Path
    manifest: dict[str, Any]
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]  # down's key -> (down, up), float32
    dtype: torch.dtype  # the adapter's, kept in the soup
    learned: dict[str, torch.Tensor]  # token -> embedding; empty without learned tokens


def _read_run(folder: Path) -> Run:
    import yaml
    from safetensors.torch import load_file

    manifest_path = folder / "manifest.yaml"
    if not manifest_path.is_file():
        raise TrainingError(f"{folder}: no manifest.yaml (not a product folder)")
    manifest = yaml.safe_load(manifest_path.read_text()) or {}
    adapter = folder / str(manifest.get("adapter", ADAPTER_FILE))
    if not adapter.is_file():
        raise TrainingError(f"{folder}: its adapter {adapter.name} is missing")
    weights = load_file(adapter)
    embeddings = folder / str(manifest.get("embeddings", EMBEDDINGS_FILE))
    learned = load_file(embeddings) if manifest.get("embeddings") else {}
    dtype = next(iter(weights.values())).dtype if weights else torch.float32
    return Run(folder, manifest, _pairs(weights, folder), dtype, learned)


def _compress(down: torch.Tensor, up: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-`rank` factors of up @ down (a conv's kernel flattened), by SVD."""
    r = down.shape[0]
    if r <= rank:
        return down, up
    delta = up.reshape(up.shape[0], r) @ down.reshape(r, -1)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    keep = min(rank, s.numel())  # a small layer's delta has no more ranks than its narrower side
    root = s[:keep].sqrt()
    new_up = (u[:, :keep] * root).reshape(up.shape[0], keep, *up.shape[2:])
    new_down = (root[:, None] * vh[:keep]).reshape(keep, *down.shape[1:])
    return new_down, new_up


def soup(
    runs: list[Path], out: Path, rank: int | None = None, default_scale: float | None = None, overwrite: bool = False
) -> SoupResult:
    """Write the mean of `runs`' adapters to the product folder `out` (see the module docstring)."""
    import yaml
    from safetensors.torch import save_file

    from training.lora import publish

    if len(runs) < 2:
        raise TrainingError("give at least two runs to average")
    if rank is not None and rank < 1:
        raise TrainingError(f"--rank: must be at least 1, got {rank}")
    if out.exists() and not overwrite:
        raise TrainingError(f"{out} already exists; pass --overwrite to replace it")
    read = [_read_run(Path(r)) for r in runs]
    first = read[0]
    for run in read[1:]:
        for field in ("tokens", "base_model"):
            if run.manifest.get(field) != first.manifest.get(field):
                raise TrainingError(
                    f"{run.folder}: its {field} {run.manifest.get(field)!r} differs from {first.folder}'s"
                )
        if run.pairs.keys() != first.pairs.keys():
            missing = sorted(run.pairs.keys() ^ first.pairs.keys())[:3]
            raise TrainingError(
                f"{run.folder}: its LoRA modules differ from {first.folder}'s (e.g. {', '.join(missing)})"
            )
        for name, (down, up) in run.pairs.items():
            d0, u0 = first.pairs[name]
            if down.shape[1:] != d0.shape[1:] or up.shape[0] != u0.shape[0] or up.shape[2:] != u0.shape[2:]:
                raise TrainingError(
                    f"{run.folder}: {name} is {tuple(up.shape)}x{tuple(down.shape)}, not the first run's"
                )
    k = len(read)
    embeddings: dict[str, torch.Tensor] = {}
    if first.manifest.get("embeddings"):
        tokens = first.learned.keys()
        if any(run.learned.keys() != tokens for run in read):
            raise TrainingError("the runs' learned token embeddings differ in their tokens")
        dtype = next(iter(first.learned.values())).dtype
        embeddings = {t: (sum(run.learned[t].float() for run in read) / k).to(dtype) for t in tokens}
    merged: dict[str, torch.Tensor] = {}
    for name in first.pairs:
        # Stacked ranks: up @ down = sum_i (up_i / k) @ down_i, the mean delta, exactly.
        down = torch.cat([run.pairs[name][0] for run in read], 0)
        up = torch.cat([run.pairs[name][1] / k for run in read], 1)
        if rank is not None:
            down, up = _compress(down, up, rank)
        up_key = next(name.replace(d, u) for d, u in NAMINGS if d in name)
        merged[name] = down.to(first.dtype).contiguous()
        merged[up_key] = up.to(first.dtype).contiguous()

    manifest = dict(first.manifest)
    if default_scale is not None:
        manifest["default_scale"] = float(default_scale)
    manifest["soup"] = {"runs": [str(r) for r in runs], "rank": rank or "exact"}
    out.parent.mkdir(parents=True, exist_ok=True)
    # Assembled beside the target under a dot name (the catalog skips those) and renamed at the end, as
    # training.lora publishes: nothing half-written is ever a product.
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(merged, tmp / str(manifest.get("adapter", ADAPTER_FILE)))
        if embeddings:
            save_file(embeddings, tmp / str(manifest["embeddings"]))
        (tmp / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False, allow_unicode=True))
        # What each run was trained with, for the record (training.lora's training.json "config").
        configs = {str(r): _config(r) for r in runs}
        (tmp / "training.json").write_text(json.dumps({"soup": manifest["soup"], "runs": configs}, indent=2))
        publish(tmp, out, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    top = max(v.shape[0] for key, v in merged.items() if any(d in key for d, _ in NAMINGS))
    size = sum(v.numel() * v.element_size() for v in merged.values()) / 1e6
    return SoupResult(out, k, len(first.pairs), top, size)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="the product folder to write")
    p.add_argument("runs", type=Path, nargs="+", help="product folders written by training.lora (two or more)")
    p.add_argument("--rank", type=int, help="compress each module to this rank (SVD; default: exact, ranks summed)")
    p.add_argument("--default-scale", type=float, help="the soup's default scale (default: the first run's)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        result = soup(args.runs, args.out, args.rank, args.default_scale, args.overwrite)
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"{result.out}: the mean of {result.runs} runs, {result.modules} LoRA modules, rank {result.rank}, "
        f"{result.megabytes:.1f} MB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
