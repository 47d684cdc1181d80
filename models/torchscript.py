"""TorchScript models: a ``model.ts`` file and its ``pacsnode.yaml``, read into a
:class:`NetworkInfo`.

::

    <name>/model.ts        a module saved with torch.jit.save (torch.jit.script or trace)
    <name>/pacsnode.yaml   version, task, labels or classes, preprocessing, inference

The file says nothing about itself, so the spec says everything: ``version`` is
required, every segmentation label needs a ``name``, and a segmentation model needs
``inference.roi_size``. Nothing here loads torch; :mod:`models.network` does, once per
worker process.
"""

from __future__ import annotations

from pathlib import Path

from models.base import LabelSpec
from models.spec import SPEC_FILE, ModelSpecError, NetworkInfo, read_spec

__all__ = ["TORCHSCRIPT_WEIGHTS", "is_torchscript_model", "read_torchscript_model"]

TORCHSCRIPT_WEIGHTS = "model.ts"


def is_torchscript_model(path: Path) -> bool:
    """True for a folder holding a ``pacsnode.yaml`` and no bundle ``configs/``."""
    return (path / SPEC_FILE).is_file() and not (path / "configs").is_dir()


def read_torchscript_model(path: Path) -> NetworkInfo:
    """Read and check a TorchScript model folder without loading torch.

    Raises
    ------
    ModelSpecError
        If ``model.ts`` is missing or the spec lacks what the file cannot say.
    """
    path = Path(path)
    spec_path = path / SPEC_FILE
    spec = read_spec(spec_path)
    weights = path / TORCHSCRIPT_WEIGHTS
    if not weights.is_file():
        raise ModelSpecError(f"{weights} is missing (the TorchScript model {spec_path} describes)")
    if spec.version is None:
        raise ModelSpecError(f"{spec_path}: field 'version' is needed for a TorchScript model")
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
        description=spec.description or f"TorchScript model {path.name} {spec.version}",
        spec=spec,
        labels=tuple(labels),
        classes=tuple(entry.to_class_spec() for entry in spec.classes),
        weights=weights,
        preprocessing=spec.preprocessing,
        roi_size=spec.inference.roi_size,
        overlap=spec.inference.overlap if spec.inference.overlap is not None else 0.25,
    )
