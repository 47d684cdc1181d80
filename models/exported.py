"""Exported networks: a TorchScript or ONNX file and its ``pacsnode.yaml``, read into a
:class:`NetworkInfo`.

::

    <name>/model.ts        a module saved with torch.jit.save (torch.jit.script or trace)
    <name>/model.onnx      or an ONNX graph (run by onnxruntime), one of the two
    <name>/pacsnode.yaml   version, task, labels or classes, preprocessing, inference

The file says nothing about itself, so the spec says everything: ``version`` is
required, every segmentation label needs a ``name``, and a segmentation model needs
``inference.roi_size``. Nothing here loads torch or onnxruntime; :mod:`models.network`
does, once per worker process.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from models.base import LabelSpec
from models.spec import SPEC_FILE, ModelSpecError, NetworkInfo, read_spec

__all__ = ["ONNX_WEIGHTS", "TORCHSCRIPT_WEIGHTS", "is_exported_model", "read_exported_model"]

TORCHSCRIPT_WEIGHTS = "model.ts"
ONNX_WEIGHTS = "model.onnx"


def is_exported_model(path: Path) -> bool:
    """True for a folder holding a ``pacsnode.yaml`` and no bundle ``configs/``."""
    return (path / SPEC_FILE).is_file() and not (path / "configs").is_dir()


def _weights(path: Path, spec_path: Path) -> Path:
    """The folder's one network file, ``model.ts`` or ``model.onnx``."""
    found = [path / name for name in (TORCHSCRIPT_WEIGHTS, ONNX_WEIGHTS) if (path / name).is_file()]
    if not found:
        raise ModelSpecError(
            f"{path / TORCHSCRIPT_WEIGHTS} is missing (the TorchScript model {spec_path} "
            f"describes; or {ONNX_WEIGHTS} for an ONNX model)"
        )
    if len(found) > 1:
        raise ModelSpecError(
            f"{path} holds both {TORCHSCRIPT_WEIGHTS} and {ONNX_WEIGHTS}; keep the one "
            f"{spec_path} describes"
        )
    if found[0].name == ONNX_WEIGHTS and importlib.util.find_spec("onnxruntime") is None:
        raise ModelSpecError(f"{found[0]} needs the onnxruntime package (pip install onnxruntime)")
    return found[0]


def read_exported_model(path: Path) -> NetworkInfo:
    """Read and check a TorchScript or ONNX model folder without loading either runtime.

    Raises
    ------
    ModelSpecError
        If the network file is missing (or both kinds are there), onnxruntime is missing
        for an ONNX file, or the spec lacks what the file cannot say.
    """
    path = Path(path)
    spec_path = path / SPEC_FILE
    spec = read_spec(spec_path)
    weights = _weights(path, spec_path)
    kind = "ONNX" if weights.name == ONNX_WEIGHTS else "TorchScript"
    if spec.version is None:
        raise ModelSpecError(f"{spec_path}: field 'version' is needed for a {kind} model")
    labels: list[LabelSpec] = []
    if spec.task == "segmentation":
        if not spec.labels:
            raise ModelSpecError(f"{spec_path}: field 'labels' is needed for a segmentation model")
        if spec.inference.roi_size is None:
            raise ModelSpecError(
                f"{spec_path}: field 'inference.roi_size' is needed for a segmentation model"
            )
        for value, entry in sorted(spec.labels.items()):
            if not 1 <= value <= 255 or entry.name is None:
                raise ModelSpecError(
                    f"{spec_path}: labels.{value}: every label needs a value from 1 to 255 "
                    "(its output channel; 0 is background) and a name"
                )
            labels.append(
                LabelSpec(
                    value=value,
                    name=entry.name,
                    category=entry.category.to_code(),
                    property_type=entry.property_type.to_code(),
                    color_rgb=entry.color_rgb,
                )
            )
    return NetworkInfo(
        path=path,
        name=path.name,
        version=spec.version,
        description=spec.description or f"{kind} model {path.name} {spec.version}",
        spec=spec,
        labels=tuple(labels),
        classes=tuple(entry.to_class_spec() for entry in spec.classes),
        weights=weights,
        preprocessing=spec.preprocessing,
        roi_size=spec.inference.roi_size,
        overlap=spec.inference.overlap if spec.inference.overlap is not None else 0.25,
    )
