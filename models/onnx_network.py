"""ONNX models run by onnxruntime, behind the torch module interface
(:class:`OnnxNetwork`); imported only by a worker that runs one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

__all__ = ["OnnxNetwork"]


class OnnxNetwork(torch.nn.Module):
    """An ONNX graph run by onnxruntime behind the torch module interface, so the
    sliding window, batching and argmax are the same as for a torch network.

    onnxruntime runs on CUDA where its CUDA execution provider is installed and the
    worker has a GPU, else on the CPU; tensors cross to and from NumPy on the host.
    """

    def __init__(self, path: Path, device: torch.device) -> None:
        import onnxruntime

        super().__init__()
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in (
            onnxruntime.get_available_providers()
        ):
            providers.insert(0, "CUDAExecutionProvider")
        self.session = onnxruntime.InferenceSession(str(path), providers=providers)
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().float().cpu().numpy()
        (output, *_) = self.session.run(None, {self.input_name: array})
        return torch.from_numpy(np.asarray(output)).to(x.device)
