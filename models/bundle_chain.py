"""A bundle's own chain: its ``inference.json`` preprocessing, inferer, postprocessing
and ``SupervisedEvaluator``, run by MONAI on the series pacsnode already holds in memory.

This is the faithful path for bundles whose transforms pacsnode's fast path does not
reproduce (:func:`models.bundle.check_chain`), or whose ``pacsnode.yaml`` asks for it
(``inference.chain: bundle``). Nothing of the chain is re-implemented: the bundle's
config is parsed by :class:`monai.bundle.ConfigParser` with these changes only:

- ``LoadImage(d)`` gets a reader that hands over the series being processed
  (:class:`VolumeReader`) instead of opening a file; everything else LoadImage does
  (dtype, metadata, channel handling) is MONAI's;
- the dataset is one item and the data loader runs in the worker process;
- ``network`` is the network pacsnode loaded (weights checked and digested);
- ``SaveImage(d)`` steps and the evaluator's handlers (checkpoint loading, logging,
  savers) are left out: pacsnode loads the weights and writes DICOM itself.

The series is given to LoadImage as MONAI's ITKReader reads a DICOM series: a
(column, row, slice) array with a RAS affine. The prediction is taken from the
evaluator's output after postprocessing (so after ``Invertd``) and must lie on that
same grid.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from models.base import InputKindValues, ModelError, Volume
from models.spec import ModelSpecError, NetworkInfo

if TYPE_CHECKING:
    import torch

__all__ = [
    "IN_MEMORY",
    "BundleChain",
    "VolumeReader",
    "build_problem",
    "chain_problems",
    "itk_layout",
    "load_transform_index",
]

#: The "file name" the one dataset item carries; :class:`VolumeReader` accepts only it.
IN_MEMORY = "pacsnode-in-memory-series"

#: Postprocessing steps that write files: pacsnode writes DICOM instead.
_WRITERS = frozenset({"SaveImage", "SaveImaged"})


def _name(transform: dict[str, Any]) -> str:
    return str(transform.get("_target_", "")).rsplit(".", 1)[-1]


def load_transform_index(inference: dict[str, Any]) -> int | None:
    """Position of the ``LoadImage(d)`` transform in ``preprocessing#transforms``."""
    transforms = (inference.get("preprocessing") or {}).get("transforms")
    if not isinstance(transforms, list):
        return None
    for index, transform in enumerate(transforms):
        if isinstance(transform, dict) and _name(transform) in ("LoadImaged", "LoadImage"):
            return index
    return None


def chain_problems(inference: dict[str, Any], inference_path: Path) -> str | None:
    """Why the bundle's own chain cannot run on an in-memory series, or None.

    Checked without importing MONAI: the structure pacsnode relies on. Whether every
    part builds is :func:`build_problem`'s question (``pacsnode check-config``).
    """
    for section in ("preprocessing", "postprocessing"):
        config = inference.get(section)
        transforms = config.get("transforms") if isinstance(config, dict) else None
        if not isinstance(transforms, list):
            return f"{inference_path}: {section}#transforms is not a list of transforms"
    load = load_transform_index(inference)
    if load is None:
        return (
            f"{inference_path}: preprocessing has no LoadImaged, so pacsnode cannot hand "
            "it the series"
        )
    loader = inference["preprocessing"]["transforms"][load]
    keys = loader.get("keys")
    if isinstance(keys, list) and len(keys) != 1:
        return (
            f"{inference_path}: preprocessing#transforms#{load} loads {keys}; pacsnode gives "
            "a bundle one image"
        )
    evaluator = inference.get("evaluator")
    if not isinstance(evaluator, dict) or _name(evaluator) != "SupervisedEvaluator":
        return (
            f"{inference_path}: field 'evaluator' is not a SupervisedEvaluator, which "
            "pacsnode needs to run the bundle's own chain"
        )
    if "inferer" not in inference:
        return f"{inference_path}: field 'inferer' is missing"
    return None


def itk_layout(
    volume: Volume, channels: int = 1, image: bool = False
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64]]:
    """The volume as MONAI's ITKReader gives a DICOM series: array (column, row, slice)
    and the RAS affine of those axes. A projection ``image`` (one slice, no slice axis)
    is (column, row) with a 3x3 affine. ``channels`` > 1 repeats the grey values in a
    last axis, as a grey image saved in colour would be read. Several series on one grid
    (a multi-series model's input) are (series, column, row, slice), as LoadImage
    stacks a list of files."""
    affine = volume.ras_affine[:, [2, 1, 0, 3]]
    if volume.voxels.ndim == 4:  # (channel, slice, row, column): several series
        array = np.ascontiguousarray(volume.voxels.transpose(0, 3, 2, 1), dtype=np.float32)
        return array, np.asarray(affine, dtype=np.float64)
    array = np.ascontiguousarray(volume.voxels.transpose(2, 1, 0), dtype=np.float32)
    if image:
        array = array[:, :, 0]
        affine = affine[np.ix_([0, 1, 3], [0, 1, 3])]
    if channels > 1:
        array = np.repeat(array[..., None], channels, axis=-1)
    return array, np.asarray(affine, dtype=np.float64)


class VolumeReader:
    """A MONAI ``ImageReader`` for the series being processed (set :attr:`volume`).

    Made a real subclass of :class:`monai.data.ImageReader` by :func:`_reader_class`
    so that this module imports without MONAI.
    """

    volume: Volume | None = None
    channels: int = 1
    image: bool = False

    def verify_suffix(self, filename: Sequence[str] | str) -> bool:
        return True

    def read(self, data: Sequence[str] | str, **kwargs: Any) -> Volume:
        names = [data] if isinstance(data, str) else list(data)
        if [Path(str(n)).name for n in names] != [IN_MEMORY] or self.volume is None:
            raise ModelError(f"pacsnode's series reader was asked for {data!r}")
        return self.volume

    def get_data(self, img: Volume) -> tuple[npt.NDArray[np.float32], dict[str, Any]]:
        array, affine = itk_layout(img, self.channels, self.image)
        channel_dim: float
        if img.voxels.ndim == 4:
            spatial, channel_dim = array.shape[1:], 0
        elif self.channels > 1:
            spatial, channel_dim = array.shape[:-1], -1
        else:
            spatial, channel_dim = array.shape, float("nan")
        return array, {
            "affine": affine.copy(),
            "original_affine": affine.copy(),
            "spatial_shape": np.asarray(spatial),
            "original_channel_dim": channel_dim,
            "space": "RAS",
            "spacing": np.sqrt((affine[:-1, :-1] ** 2).sum(axis=0)),
            "0008|0060": img.modality,
        }


def _reader_class() -> type:
    from monai.data import ImageReader

    return type("PacsnodeVolumeReader", (VolumeReader, ImageReader), {})


class BundleChain:
    """The bundle's own evaluator around a loaded network; one per model per worker."""

    def __init__(self, info: NetworkInfo, net: torch.nn.Module, device: torch.device) -> None:
        """Parse the bundle's chain with pacsnode's reader and network.

        Raises
        ------
        ModelSpecError
            If a part of the chain cannot be built (a transform that does not import,
            an argument its class does not take), naming it.
        """
        from monai.bundle import ConfigParser

        self.info = info
        inference_path = info.path / "configs" / "inference.json"
        inference = json.loads(inference_path.read_text(encoding="utf-8"))
        if (problem := chain_problems(inference, inference_path)) is not None:
            raise ModelSpecError(problem)
        self.reader = _reader_class()()
        self.reader.channels = info.input_channels
        self.reader.image = info.spec.input == InputKindValues.IMAGE
        config = inference  # read for this chain alone: changed in place
        load = load_transform_index(config)
        assert load is not None  # chain_problems checked it
        config["preprocessing"]["transforms"][load]["reader"] = "$__pacsnode_reader"
        post = config["postprocessing"]["transforms"]
        steps = [_name(t) if isinstance(t, dict) else "" for t in post]
        config["postprocessing"]["transforms"] = [
            t for t, name in zip(post, steps, strict=True) if name not in _WRITERS
        ]
        #: A classifier's outputs are probabilities already when its postprocessing says so.
        self.activated = bool({"Activations", "Activationsd"} & set(steps))
        config["bundle_root"] = str(info.path)
        config["device"] = "$__pacsnode_device"
        config["network"] = "$__pacsnode_network"
        config["evaluator"]["val_handlers"] = None
        config["evaluator"]["val_data_loader"] = "@dataloader"
        config["dataloader"] = {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 0,
        }
        parser = ConfigParser(
            config,
            globals={
                "__pacsnode_reader": self.reader,
                "__pacsnode_device": device,
                "__pacsnode_network": net,
            },
        )
        # A bundle's imports (``$import scripts.x``) are relative to its folder.
        root = str(info.path)
        added = root not in sys.path
        if added:
            sys.path.insert(0, root)
        try:
            self.image_key = _single_key(
                parser.get_parsed_content(f"preprocessing#transforms#{load}#keys")
            )
            parser["dataset"] = {
                "_target_": "Dataset",
                "data": [{self.image_key: IN_MEMORY}],
                "transform": "@preprocessing",
            }
            self.evaluator = parser.get_parsed_content("evaluator")
        except ModelSpecError:
            raise
        except Exception as e:
            raise ModelSpecError(
                f"{inference_path}: the bundle's chain cannot be built: {type(e).__name__}: {e}"
            ) from e
        finally:
            if added:
                sys.path.remove(root)
        self.lock = threading.Lock()

    def run(self, volume: Volume) -> Any:
        """The postprocessed ``pred`` of the bundle's evaluator for ``volume``."""
        with self.lock:
            self.reader.volume = volume
            try:
                self.evaluator.run()
            finally:
                self.reader.volume = None
            state = self.evaluator.state
            output = state.output
            # Keep no tensors of this series alive until the next job.
            state.output = state.batch = None
            if not isinstance(output, list) or len(output) != 1 or "pred" not in output[0]:
                raise ModelError(
                    f"{self.info.name}: the bundle's evaluator gave no 'pred' for the series"
                )
            return output[0]["pred"]

    def segment(self, volume: Volume) -> npt.NDArray[np.uint8]:
        """The bundle's label map, back on pacsnode's (slice, row, column) axes.

        Raises
        ------
        ModelError
            If the postprocessed prediction is not on the series' grid (no ``Invertd``)
            or holds overlapping or out-of-range labels.
        """
        import torch

        pred = torch.as_tensor(self.run(volume)).detach().float().cpu()
        expected = volume.voxels.shape[-3:][::-1]
        if pred.ndim != 4 or tuple(pred.shape[1:]) != expected:
            raise ModelError(
                f"{self.info.name}: the bundle's postprocessed prediction has shape "
                f"{tuple(pred.shape)}, not (channels, {', '.join(map(str, expected))}) on the "
                "series' grid; its postprocessing must end on the input grid (Invertd)"
            )
        if pred.shape[0] == 1:
            labels = pred[0].round()
        else:
            binary = bool(((pred == 0) | (pred == 1)).all())
            if binary and bool((pred.sum(dim=0) > 1).any()):
                raise ModelError(
                    f"{self.info.name}: the bundle's {pred.shape[0]} output channels overlap; "
                    "pacsnode writes one label per voxel"
                )
            labels = pred.argmax(dim=0).float()
        found = {int(v) for v in torch.unique(labels).tolist()}
        unknown = sorted(found - {0} - {label.value for label in self.info.labels})
        if unknown:
            raise ModelError(
                f"{self.info.name}: the bundle's output holds label value(s) {unknown}, "
                f"which {self.info.path / 'pacsnode.yaml'} does not declare"
            )
        return np.ascontiguousarray(labels.permute(2, 1, 0).numpy().astype(np.uint8))

    def classify(self, volume: Volume) -> tuple[float, ...]:
        """One value per class: the bundle's postprocessed output, or the spec's
        activation of it when the postprocessing has no ``Activations``."""
        import torch

        scores = torch.as_tensor(self.run(volume)).detach().float().cpu().reshape(-1)
        if scores.numel() != len(self.info.classes):
            raise ModelError(
                f"{self.info.name} returned {scores.numel()} outputs; {self.info.path} "
                f"declares {len(self.info.classes)} classes"
            )
        if not self.activated:
            if self.info.spec.activation == "softmax":
                scores = torch.softmax(scores, dim=0)
            else:
                scores = torch.sigmoid(scores)
        return tuple(float(p) for p in scores)


def build_problem(info: NetworkInfo) -> str | None:
    """Why the bundle's own chain cannot be built here, or None: every transform, the
    inferer and the evaluator are made by MONAI as a worker would (a ``_target_`` that
    does not import, an argument its class does not take), around a stand-in network
    so that no weights are loaded. For ``pacsnode check-config``."""
    import torch

    try:
        BundleChain(info, torch.nn.Identity(), torch.device("cpu"))
    except ModelSpecError as e:
        return str(e)
    return None


def _single_key(keys: Any) -> str:
    if isinstance(keys, str):
        return keys
    if isinstance(keys, list | tuple) and len(keys) == 1:
        return str(keys[0])
    raise ModelSpecError(f"LoadImaged keys {keys!r}: pacsnode gives a bundle one image")
