"""A small classifier of the demo world's renders: object colour, object shape and background.

It is a tiny CNN trained on ground-truth renders, with noise and blur augmentation so that it also reads
slightly soft generated images. It measures prompt obedience of the demo SD model.

    python -m demo.judge --out models/demo-sd/judge      # train (about 2 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from demo.world import BACKGROUNDS, COLOURS, SHAPES, all_triples, make_dataset

log = logging.getLogger("demo.judge")

HEADS: dict[str, tuple[str, ...]] = {"colour": tuple(COLOURS), "shape": SHAPES, "background": BACKGROUNDS}
CHANCE = {k: 1.0 / len(v) for k, v in HEADS.items()}
DEFAULT_PATH = Path(__file__).resolve().parent.parent / "models" / "demo-sd" / "judge"


class JudgeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
            )

        self.features = nn.Sequential(
            block(3, 32), nn.MaxPool2d(2), block(32, 64), nn.MaxPool2d(2), block(64, 96), nn.AdaptiveAvgPool2d(1)
        )
        self.heads = nn.ModuleDict({k: nn.Linear(96, len(v)) for k, v in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x).flatten(1)
        return {k: head(h) for k, head in self.heads.items()}


def to_input(images) -> torch.Tensor:
    """PIL images, uint8 arrays (N,H,W,3) or float tensors (N,3,H,W) in [0,1] -> (N,3,32,32) in [-1,1]."""
    if isinstance(images, torch.Tensor):
        x = images.float()
    else:
        if not isinstance(images, np.ndarray):
            images = np.stack([np.asarray(im.convert("RGB")) for im in images])
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-1] != 32 or x.shape[-2] != 32:
        x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    return x * 2 - 1


class Judge:
    """Predicts attribute names for images; `accuracy` compares them with expected names."""

    def __init__(self, net: JudgeNet) -> None:
        self.net = net.eval()

    @torch.no_grad()
    def predict(self, images) -> dict[str, list[str]]:
        x = to_input(images)
        out: dict[str, list[str]] = {k: [] for k in HEADS}
        for i in range(0, len(x), 256):
            logits = self.net(x[i : i + 256])
            for k, names in HEADS.items():
                out[k] += [names[j] for j in logits[k].argmax(1).tolist()]
        return out

    def accuracy(self, images, expected: dict[str, list[str]]) -> dict[str, float]:
        pred = self.predict(images)
        return {k: float(np.mean([p == e for p, e in zip(pred[k], expected[k], strict=True)])) for k in expected}


def load_judge(path: str | Path = DEFAULT_PATH) -> Judge:
    from safetensors.torch import load_file

    net = JudgeNet()
    net.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
    return Judge(net)


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    # Generated images are softer and noisier than renders; teach the judge to ignore that.
    n = x.shape[0]
    blur = torch.rand(n, 1, 1, 1, generator=g) < 0.5
    soft = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="bilinear", align_corners=False)
    x = torch.where(blur, soft, x)
    x = x + torch.randn(x.shape, generator=g) * torch.rand(n, 1, 1, 1, generator=g) * 0.08
    x = x * (1 + (torch.rand(n, 1, 1, 1, generator=g) - 0.5) * 0.1)
    return x.clamp(-1, 1)


def train_judge(out: Path, seed: int = 0, n_train: int = 24000, epochs: int = 4) -> dict[str, float]:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    train = make_dataset(n_train, seed=seed + 100, triples=all_triples(), workers=2)
    test = make_dataset(3000, seed=seed + 200, triples=all_triples(), workers=2)
    log.info("rendered %d + %d images in %.0fs", n_train, 3000, time.time() - t0)
    x = to_input(train.images)
    y = {k: torch.from_numpy(v) for k, v in train.labels().items()}
    net = JudgeNet()
    steps = epochs * (n_train // 128)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    step = 0
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(n_train, generator=g)
        for i in range(0, n_train - 127, 128):
            idx = perm[i : i + 128]
            logits = net(_augment(x[idx], g))
            loss = sum(F.cross_entropy(logits[k], y[k][idx]) for k in HEADS)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 100 == 0:
                log.info("epoch %d step %d/%d loss %.4f (%.0fs)", epoch, step, steps, loss.item(), time.time() - t0)
    judge = Judge(net)
    acc = judge.accuracy(test.images, {k: [HEADS[k][j] for j in v] for k, v in test.labels().items()})
    log.info("held-out render accuracy %s; chance %s", acc, CHANCE)
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / "model.safetensors"))
    return acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_PATH)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=24000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    train_judge(args.out, args.seed, args.n_train, args.epochs)


if __name__ == "__main__":
    main()
