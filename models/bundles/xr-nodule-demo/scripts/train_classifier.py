"""Train the xr-nodule-demo classifier: DEMONSTRATION ONLY, NOT FOR CLINICAL USE.

A small 2-D CNN learns whether a synthetic radiograph holds a round opacity ("nodule").
The images are drawn by :func:`synthetic_radiograph` (a body, two darker lung fields,
smooth structure, noise, detector-like value ranges and sizes); half get a soft round
opacity of 4 to 14 mm inside a lung field. Nothing here has seen a real radiograph: the
model exists to show how pacsnode runs a TorchScript classifier on CR/DX images and
reports its probability in an SR.

The network's input is prepared exactly as pacsnode's ``pacsnode.yaml`` asks
(``normalize: minmax``, then bilinear resize to ``input_size``), so training and
inference see the same thing. Run from the repository root (about 4 minutes on 2 CPU
cores)::

    python models/bundles/xr-nodule-demo/scripts/train_classifier.py

It writes ``model.ts`` beside ``pacsnode.yaml`` and prints the held-out accuracy.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

MODEL_DIR = Path(__file__).resolve().parents[1]
INPUT_SIZE = (256, 256)


def synthetic_radiograph(
    rng: np.random.Generator, *, nodule: bool, shape: tuple[int, int] | None = None
) -> npt.NDArray[np.uint16]:
    """A synthetic chest-radiograph-like image (MONOCHROME2 stored values, 12 bits).

    Parameters
    ----------
    rng
        Source of all randomness (size, anatomy, noise, opacity place and size).
    nodule
        Draw a round opacity inside one lung field.
    shape
        Rows and columns; random between 192 and 384 when not given.
    """
    if shape is None:
        side = int(rng.integers(192, 385))
        shape = (side, int(side * rng.uniform(0.85, 1.15)))
    rows, cols = shape
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    y, x = y / rows, x / cols  # 0..1
    body = ((x - 0.5) / rng.uniform(0.38, 0.47)) ** 2 + ((y - 0.55) / rng.uniform(0.5, 0.6)) ** 2
    image = np.where(body < 1.0, 0.75, 0.1).astype(np.float32)
    lungs = []
    for side_sign in (-1.0, 1.0):
        cx = 0.5 + side_sign * rng.uniform(0.15, 0.2)
        cy = rng.uniform(0.45, 0.52)
        ax, ay = rng.uniform(0.1, 0.14), rng.uniform(0.22, 0.3)
        lung = ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 < 1.0
        image[lung] = rng.uniform(0.3, 0.4)
        lungs.append((cx, cy, ax, ay))
    # Ribs-like horizontal bands and smooth structure, then blur and noise.
    bands = 0.05 * np.sin(2 * np.pi * y * rng.uniform(8, 14) + rng.uniform(0, 6.3))
    image += bands * (image < 0.5)
    structure = ndimage.gaussian_filter(rng.normal(0, 1, shape).astype(np.float32), rows / 30)
    image += 0.08 * structure / (np.abs(structure).max() + 1e-6)
    if nodule:
        cx, cy, ax, ay = lungs[int(rng.integers(0, 2))]
        angle, reach = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform(0, 0.6))
        ny, nx = cy + reach * ay * np.sin(angle), cx + reach * ax * np.cos(angle)
        radius = rng.uniform(0.02, 0.045)  # of the image width: ~8-18 mm on a 40 cm film
        distance = np.sqrt((x - nx) ** 2 + ((y - ny) * rows / cols) ** 2)
        image += rng.uniform(0.3, 0.45) * np.clip(1.5 - distance / radius, 0.0, 1.0)
    image = ndimage.gaussian_filter(image, 1.0)
    image += rng.normal(0, rng.uniform(0.005, 0.02), shape).astype(np.float32)
    scale, offset = rng.uniform(2500, 3900), rng.uniform(0, 150)
    stored: npt.NDArray[np.uint16] = np.clip(image * scale + offset, 0, 4095).astype(np.uint16)
    return stored


def network_input(image: npt.NDArray[np.generic]) -> torch.Tensor:
    """What pacsnode gives the network: min-max to [0, 1], bilinear to INPUT_SIZE."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32))[None, None]
    low, high = float(x.min()), float(x.max())
    x = (x - low) / (high - low) if high > low else x - low
    return F.interpolate(x, size=list(INPUT_SIZE), mode="bilinear", align_corners=False)


class NoduleNet(nn.Module):
    """Local contrast, five strided conv blocks, global max and average pooling, one logit.

    Max pooling lets one small bright spot decide, as a local finding should."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = [2, 8, 16, 32, 48, 64]
        for c_in, c_out in itertools.pairwise(channels):
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2 * channels[-1], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Local contrast first: what stands out from its 17-pixel neighbourhood.
        background = F.avg_pool2d(x, 17, stride=1, padding=8, count_include_pad=False)
        features = self.features(torch.cat([x, x - background], dim=1))
        pooled = torch.cat([features.amax(dim=(2, 3)), features.mean(dim=(2, 3))], dim=1)
        logit: torch.Tensor = self.head(pooled)
        return logit


def batch(rng: np.random.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    labels = rng.integers(0, 2, size)
    images = [network_input(synthetic_radiograph(rng, nodule=bool(n))) for n in labels]
    return torch.cat(images), torch.as_tensor(labels, dtype=torch.float32)[:, None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    net = NoduleNet()
    optimiser = torch.optim.AdamW(net.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, 3e-3, total_steps=args.steps)
    started = time.time()
    for step in range(args.steps):
        x, y = batch(rng, args.batch)
        loss = F.binary_cross_entropy_with_logits(net(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 50 == 0:
            print(
                f"step {step}: loss {loss.item():.3f} ({time.time() - started:.0f} s)", flush=True
            )
    net.eval()
    held_out = np.random.default_rng(args.seed + 1000)
    with torch.inference_mode():
        x, y = batch(held_out, 400)
        accuracy = float(((torch.sigmoid(net(x)) >= 0.5).float() == y).float().mean())
    print(f"held-out accuracy on 400 synthetic images: {accuracy:.3f}")
    torch.jit.save(torch.jit.script(net), str(MODEL_DIR / "model.ts"))
    print(f"wrote {MODEL_DIR / 'model.ts'} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
