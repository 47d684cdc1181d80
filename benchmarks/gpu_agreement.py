"""ct-bone-demo's labels on the worker's device (fp32, then bf16 autocast) against the
CPU, on a 64x256x256 chest phantom: the GPU path must give the CPU's answer.

Run by ``scripts/gpu-check.sh`` on a machine with a GPU; on a CPU-only machine both sides
run on the CPU and agree trivially.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from models.network import BUNDLES_DIR, NetworkRunner, read_network
from tests.dicom_factory import chest_phantom, write_ct_series
from workers.series import load_series


def main() -> int:
    spacing = (2.0, 1.4, 1.4)
    with tempfile.TemporaryDirectory() as tmp:
        phantom = chest_phantom(shape=(64, 256, 256), spacing_mm=spacing)
        write_ct_series(phantom.hu, Path(tmp), spacing_mm=spacing)
        volume = load_series(sorted(Path(tmp).glob("*.dcm"))).volume
    info = read_network(BUNDLES_DIR / "ct-bone-demo")
    device_runner = NetworkRunner(info)
    cpu_runner = NetworkRunner(info)
    cpu_runner.device = torch.device("cpu")
    cpu_runner.net = cpu_runner.net.to("cpu")
    reference = cpu_runner.segment(volume)
    print(f"device {device_runner.device}, {device_runner.sw_batch_size} windows per pass")
    labels = device_runner.segment(volume)
    print(f"fp32 on {device_runner.device} vs CPU: {np.mean(labels == reference):.6f} equal")
    device_runner.autocast = device_runner.device.type == "cuda"
    labels = device_runner.segment(volume)
    print(f"bf16={device_runner.autocast} vs CPU fp32: {np.mean(labels == reference):.6f} equal")
    return 0


if __name__ == "__main__":
    sys.exit(main())
