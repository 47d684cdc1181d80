"""Train the ct-bone-demo bundle: a small 3-D UNet that segments bone on CT.

A DEMONSTRATION, not for clinical use. The labels are "HU >= 200, components of at least
0.5 mL", so the network learns what a threshold already does; the point is to exercise
pacsnode's MONAI-bundle path end to end with weights built here, not to beat the
threshold.

Training data, all generated or read here (no downloads):

- synthetic CT volumes: an elliptic body (fat to muscle), lungs, bone ellipsoids and
  cylinders (250-1800 HU), contrast-like soft blobs below 200 HU, random shapes and
  sizes, blur (partial volume) and Gaussian noise; the label is the clean image >= 200 HU;
- ``tests.dicom_factory.chest_phantom`` at random shapes and spacings, with noise;
- slices 0-69 of the real head CT ``tests.dicom_factory.cranium_hu`` (Debian package
  ``invesalius-examples``), labelled by the threshold; slices 70-107 are held out.

The network and its intensity window come from this bundle's ``configs/inference.json``
(clip HU to [-1000, 2000], scale to [0, 1]); the weights go to ``models/model.pt`` as a
state dict. Run from the repository root (2 CPU cores: about 7 minutes of training, by
the clock, plus one of data and evaluation)::

    python models/bundles/ct-bone-demo/scripts/train.py

Training stops on a time budget (``--minutes``), so the step count, and the weights,
depend on the machine. The held-out Dice is logged at the end; the shipped weights
(0.1.0: 2599 steps, batch 4, seed 0) gave 0.947 on cranium slices 70-107, 0.942 on
``chest_phantom((8, 64, 64), (5, 3, 3))`` and 0.880 (mean) on 8 new synthetic volumes.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from monai.bundle import ConfigParser
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from scipy import ndimage

BUNDLE = Path(__file__).resolve().parents[1]
REPO = BUNDLE.parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.dicom_factory import chest_phantom, cranium_hu

logger = logging.getLogger("ct-bone-demo.train")

HU_MIN, HU_MAX = -1000.0, 2000.0
BONE_MIN_HU = 200.0
BONE_MIN_COMPONENT_ML = 0.5
ROI = 64
#: Training crops; the UNet is fully convolutional, inference uses ROI.
PATCH = 48
CRANIUM_TRAIN_SLICES = 70

FloatArray = npt.NDArray[np.float32]
LabelArray = npt.NDArray[np.uint8]


def scale(hu: FloatArray) -> FloatArray:
    """The bundle's intensity window: clip to [HU_MIN, HU_MAX], scale to [0, 1]."""
    return np.asarray((np.clip(hu, HU_MIN, HU_MAX) - HU_MIN) / (HU_MAX - HU_MIN), np.float32)


def threshold_labels(hu: FloatArray, spacing_mm: tuple[float, float, float]) -> LabelArray:
    """Bone = HU >= 200, components of at least 0.5 mL."""
    mask = hu >= BONE_MIN_HU
    components, count = ndimage.label(mask)
    if count == 0:
        return mask.astype(np.uint8)
    sizes = np.bincount(components.ravel())
    keep = sizes >= BONE_MIN_COMPONENT_ML * 1000.0 / float(np.prod(spacing_mm))
    keep[0] = False
    return np.asarray(keep[components], dtype=np.uint8)


def _ellipsoid(
    shape: tuple[int, int, int], center: npt.NDArray[np.float64], radii: npt.NDArray[np.float64]
) -> npt.NDArray[np.bool_]:
    k, j, i = np.ogrid[0 : shape[0], 0 : shape[1], 0 : shape[2]]
    d = (
        ((k - center[0]) / radii[0]) ** 2
        + ((j - center[1]) / radii[1]) ** 2
        + ((i - center[2]) / radii[2]) ** 2
    )
    return np.asarray(d <= 1.0)


def synthetic_volume(rng: np.random.Generator) -> tuple[FloatArray, LabelArray]:
    """A random CT-like volume (HU, with blur and noise) and its bone label."""
    shape = (int(rng.integers(8, 72)), int(rng.integers(48, 129)), int(rng.integers(48, 129)))
    spacing = (float(rng.uniform(1.0, 5.0)), float(rng.uniform(0.6, 3.0)), 0.0)
    spacing = (spacing[0], spacing[1], spacing[1])
    n, rows, cols = shape
    big = 1e6
    clean = np.full(shape, -1000.0, dtype=np.float32)
    centre = np.array([n / 2, rows / 2, cols / 2]) + rng.normal(0, 4, 3)
    body_radii = np.array([big, rows * rng.uniform(0.25, 0.45), cols * rng.uniform(0.3, 0.47)])
    body = _ellipsoid(shape, centre, body_radii)
    clean[body] = rng.uniform(-120, 80)
    for _ in range(int(rng.integers(0, 3))):
        c = centre + np.array([0, rng.uniform(-0.2, 0.1) * rows, rng.uniform(-0.25, 0.25) * cols])
        r = np.array([big, rows * rng.uniform(0.08, 0.2), cols * rng.uniform(0.06, 0.14)])
        clean[_ellipsoid(shape, c, r) & body] = rng.uniform(-950, -700)
    for _ in range(int(rng.integers(0, 4))):  # soft, contrast-like blobs below the threshold
        c = centre + rng.uniform(-0.3, 0.3, 3) * np.array([n, rows, cols])
        r = rng.uniform(2, 10, 3)
        clean[_ellipsoid(shape, c, r) & body] = rng.uniform(60, 170)
    for _ in range(int(rng.integers(1, 6))):  # bone: ellipsoids or cylinders, some hollow
        c = centre + rng.uniform(-0.35, 0.35, 3) * np.array([n, rows, cols])
        r = rng.uniform(2.5, 14, 3)
        if rng.random() < 0.4:
            r[0] = big
        outer = _ellipsoid(shape, c, r)
        clean[outer] = rng.uniform(250, 1800)
        if rng.random() < 0.3 and min(r[1:]) > 5:
            clean[_ellipsoid(shape, c, r * 0.6)] = rng.uniform(20, 150)  # marrow
    label = threshold_labels(clean, spacing)
    blurred = ndimage.gaussian_filter(clean, sigma=float(rng.uniform(0.0, 1.0)))
    noisy = blurred + rng.normal(0, rng.uniform(0, 40), shape).astype(np.float32)
    return np.asarray(noisy, np.float32), label


def phantom_volume(rng: np.random.Generator) -> tuple[FloatArray, LabelArray]:
    """``chest_phantom`` at a random shape and spacing, with noise."""
    size = int(rng.integers(48, 129))
    phantom = chest_phantom(
        shape=(int(rng.integers(4, 48)), size, size),
        spacing_mm=(float(rng.uniform(1.0, 5.0)), 320.0 / size, 320.0 / size),
    )
    hu = phantom.hu.astype(np.float32)
    hu += rng.normal(0, rng.uniform(0, 30), hu.shape).astype(np.float32)
    return hu, phantom.spine.astype(np.uint8)


class Sample:
    """A scaled training image, its label and the indices of its bone voxels."""

    def __init__(self, image: FloatArray, label: LabelArray) -> None:
        self.image = image
        self.label = label
        self.bone = np.argwhere(label)


def random_patch(sample: Sample, rng: np.random.Generator) -> tuple[FloatArray, LabelArray]:
    """A PATCH^3 crop (padded with air, i.e. 0), centred on bone two times in three."""
    shape = sample.image.shape
    if len(sample.bone) and rng.random() < 0.67:
        centre = sample.bone[int(rng.integers(len(sample.bone)))]
    else:
        centre = np.array([int(rng.integers(s)) for s in shape])
    start = [
        int(np.clip(c - PATCH // 2, 0, max(0, s - PATCH)))
        for c, s in zip(centre, shape, strict=True)
    ]
    box = tuple(slice(b, b + PATCH) for b in start)
    image, label = sample.image[box], sample.label[box]
    pad = [(0, PATCH - s) for s in image.shape]
    return np.pad(image, pad, constant_values=0.0), np.pad(label, pad, constant_values=0)


def dice(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> float:
    """Dice of two binary masks (1.0 when both are empty)."""
    a, b = a.astype(bool), b.astype(bool)
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total


def predict(net: torch.nn.Module, image: FloatArray) -> LabelArray:
    """Argmax label map of a scaled image, as pacsnode's bundle loader computes it."""
    net.eval()
    with torch.no_grad():
        x = torch.from_numpy(image)[None, None]
        logits = torch.as_tensor(sliding_window_inference(x, (ROI, ROI, ROI), 4, net, overlap=0.25))
        return np.asarray(torch.argmax(logits, dim=1)[0].numpy(), dtype=np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=7.0, help="training time budget")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)

    config = ConfigParser()
    config.read_config(BUNDLE / "configs" / "inference.json")
    net: torch.nn.Module = config.get_parsed_content("network_def")

    cranium, cranium_spacing = cranium_hu()
    cranium_f = cranium.astype(np.float32)
    cranium_label = threshold_labels(cranium_f, cranium_spacing)
    pool = [Sample(scale(cranium_f[:CRANIUM_TRAIN_SLICES]), cranium_label[:CRANIUM_TRAIN_SLICES])]
    for index in range(64):
        hu, label = phantom_volume(rng) if index % 4 == 0 else synthetic_volume(rng)
        pool.append(Sample(scale(hu), label))
    logger.info("pool of %d training volumes ready", len(pool))

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    deadline = time.monotonic() + args.minutes * 60.0
    step = 0
    while time.monotonic() < deadline:
        net.train()
        # The cranium every fourth step; otherwise any volume of the pool.
        patches = [
            random_patch(pool[0 if rng.random() < 0.25 else int(rng.integers(len(pool)))], rng)
            for _ in range(args.batch)
        ]
        x = torch.from_numpy(np.stack([p[0] for p in patches]))[:, None]
        y = torch.from_numpy(np.stack([p[1] for p in patches]).astype(np.int64))[:, None]
        optimizer.zero_grad()
        loss = loss_fn(net(x), y)
        loss.backward()
        optimizer.step()
        step += 1
        if step % 100 == 0:
            logger.info("step %d loss %.4f", step, loss.item())
        if step % 200 == 0:  # refresh a quarter of the synthetic pool
            for index in rng.integers(1, len(pool), size=len(pool) // 4):
                hu, label = synthetic_volume(rng)
                pool[int(index)] = Sample(scale(hu), label)

    out = BUNDLE / "models" / "model.pt"
    torch.save(net.state_dict(), out)
    logger.info("%d steps; saved %s (%.2f MB)", step, out, out.stat().st_size / 1e6)

    held_out = cranium_f[CRANIUM_TRAIN_SLICES:]
    cranium_dice = dice(predict(net, scale(held_out)), cranium_label[CRANIUM_TRAIN_SLICES:])
    test_phantom = chest_phantom(shape=(8, 64, 64), spacing_mm=(5.0, 3.0, 3.0))
    phantom_dice = dice(predict(net, scale(test_phantom.hu.astype(np.float32))), test_phantom.spine)
    eval_rng = np.random.default_rng(12345)
    synthetic = [synthetic_volume(eval_rng) for _ in range(8)]
    synthetic_dice = float(np.mean([dice(predict(net, scale(h)), lab) for h, lab in synthetic]))
    logger.info(
        "held-out Dice: cranium slices %d-%d %.4f; chest_phantom(8, 64, 64) %.4f; "
        "8 new synthetic volumes (mean) %.4f",
        CRANIUM_TRAIN_SLICES,
        cranium.shape[0] - 1,
        cranium_dice,
        phantom_dice,
        synthetic_dice,
    )


if __name__ == "__main__":
    main()
