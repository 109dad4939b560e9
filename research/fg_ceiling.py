"""How well can the annotated foreground be learnt at full resolution, and what would it be worth?
Figure: held-out foreground IoU 0.70-0.76 (0.72-0.78 at 2,000 steps); big.pt clipped to it 0.389 -> 0.400
(research/README.md).

    python research/fg_ceiling.py big,small ../shared/data/usiigaci/train set41,set42,set43,set44,set45 [--iters 1000]

`error_analysis.py` found the held-out AP lost in the foreground as a whole (the predicted one 12-21%
larger than the annotated one). This trains a small U-Net for foreground alone, at the fields' full
resolution (random 256 px crops of every other field, flips, quarter turns, contrast jitter; BCE +
Dice; AdamW, one-cycle), then prints its foreground IoU on training and held-out fields and the
model's held-out mask AP with its cells clipped to that foreground (and grown 3 px into it first).
About 20 minutes on 2 CPU cores at the defaults. Not part of the pipeline: a diagnostic.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from skimage.segmentation import expand_labels
from torch import nn

from livecell_ray.config import InferenceConfig
from livecell_ray.model import models
from livecell_ray.model.segment import Segmenter
from livecell_ray.plate.imaging import normalize, read_image
from livecell_ray.training import evaluate as ev


def _block(i: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(inplace=True),
                         nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """Four levels, ``c`` channels at the top: enough for edges at full resolution, small for a CPU."""

    def __init__(self, c: int = 12):
        super().__init__()
        self.e1, self.e2, self.e3, self.e4 = _block(1, c), _block(c, 2 * c), _block(2 * c, 4 * c), _block(4 * c, 8 * c)
        self.d3, self.d2, self.d1 = _block(12 * c, 4 * c), _block(6 * c, 2 * c), _block(3 * c, c)
        self.out = nn.Conv2d(c, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def up(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.cat([F.interpolate(a, size=b.shape[-2:], mode="bilinear", align_corners=False), b], 1)

        e1 = self.e1(x)
        e2 = self.e2(F.max_pool2d(e1, 2))
        e3 = self.e3(F.max_pool2d(e2, 2))
        e4 = self.e4(F.max_pool2d(e3, 2))
        return self.out(self.d1(up(self.d2(up(self.d3(up(e4, e3)), e2)), e1)))


def train_fg(images: dict[str, np.ndarray], fgs: dict[str, np.ndarray], iters: int, width: int,
             crop: int = 256, batch: int = 8, seed: int = 0) -> UNet:
    """The U-Net on random crops of the given fields (0-1 floats) and their foreground masks."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    names = sorted(images)
    net = UNet(width)
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=iters)
    t0 = time.time()
    for it in range(iters):
        xs, ys = [], []
        for _ in range(batch):
            n = names[rng.integers(len(names))]
            i = rng.integers(0, images[n].shape[0] - crop)
            j = rng.integers(0, images[n].shape[1] - crop)
            k = int(rng.integers(4))
            x = np.rot90(images[n][i:i + crop, j:j + crop], k)
            y = np.rot90(fgs[n][i:i + crop, j:j + crop], k)
            if rng.random() < 0.5:
                x, y = x[:, ::-1], y[:, ::-1]
            xs.append((x - 0.5) * rng.uniform(0.8, 1.25) + 0.5 + rng.uniform(-0.1, 0.1))
            ys.append(y)
        xb = torch.from_numpy(np.stack(xs)[:, None].astype(np.float32))
        yb = torch.from_numpy(np.stack(ys)[:, None].astype(np.float32))
        logits = net(xb)
        p = torch.sigmoid(logits)
        loss = F.binary_cross_entropy_with_logits(logits, yb) + 1 - (2 * (p * yb).sum() + 1) / (p.sum() + yb.sum() + 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if it % 100 == 0 or it == iters - 1:
            print(f"  iteration {it}: loss {loss.item():.3f}, {time.time() - t0:.0f} s", flush=True)
    return net.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", help="comma-separated: big,small")
    ap.add_argument("data")
    ap.add_argument("held_out")
    ap.add_argument("--iters", type=int, default=1000)
    ap.add_argument("--width", type=int, default=12)
    a = ap.parse_args()
    held = a.held_out.split(",")
    all_images = ev.load_mask_folder(a.data)
    pixels = {i.name: normalize(read_image(i.path)).astype(np.float32) / 255.0 for i in all_images}
    fgs = {i.name: (i.gt > 0) for i in all_images}
    train = [n for n in pixels if n not in held]
    net = train_fg({n: pixels[n] for n in train}, {n: fgs[n] for n in train}, a.iters, a.width)
    with torch.no_grad():
        prob = {n: torch.sigmoid(net(torch.from_numpy(pixels[n])[None, None]))[0, 0].numpy()
                for n in held + train[:: max(1, len(train) // 8)]}
    for n, p in prob.items():
        f, g = p > 0.5, fgs[n]
        print(f"{n} ({'held out' if n in held else 'trained on'}): foreground IoU {(f & g).sum() / (f | g).sum():.3f}, "
              f"predicted / true {f.sum() / g.sum():.3f}")
    images = [i for i in all_images if i.name in set(held)]
    for model in a.models.split(","):
        preds = ev.predict(images, Segmenter(models.resolve_map(model, True), InferenceConfig()))
        print(f"{model} held-out mask AP {ev.evaluate(images, preds).mask['AP']:.3f}")
        for grow in (0, 3):
            for t in (0.3, 0.5, 0.7):
                clipped = []
                for im, p in zip(images, preds):
                    lab = p.labels.astype(np.int32)
                    lab = expand_labels(lab, grow) if grow else lab
                    lab[prob[im.name] <= t] = 0
                    clipped.append(ev.Prediction(lab, p.scores))
                m = ev.evaluate(images, clipped).mask
                print(f"  clipped to the U-Net's foreground (p > {t}){f', grown {grow} px first' if grow else ''}: "
                      f"mask AP {m['AP']:.3f}, AP75 {m['AP75']:.3f}")

if __name__ == "__main__":
    main()
