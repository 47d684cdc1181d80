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
        graph_input = self.session.get_inputs()[0]
        self.input_name = graph_input.name
        batch = graph_input.shape[0] if graph_input.shape else None
        #: A graph exported with a fixed batch size takes exactly that many windows.
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().float().cpu().numpy()
        if self.fixed_batch is None:
            (output, *_) = self.session.run(None, {self.input_name: array})
            return torch.from_numpy(np.asarray(output)).to(x.device)
        outputs = []
        for start in range(0, len(array), self.fixed_batch):
            chunk = array[start : start + self.fixed_batch]
            short = self.fixed_batch - len(chunk)
            if short:  # the last windows: pad to the graph's batch, drop the padding after
                chunk = np.concatenate([chunk, np.zeros((short, *chunk.shape[1:]), chunk.dtype)])
            (output, *_) = self.session.run(None, {self.input_name: chunk})
            outputs.append(np.asarray(output)[: self.fixed_batch - short])
        return torch.from_numpy(np.concatenate(outputs)).to(x.device)
