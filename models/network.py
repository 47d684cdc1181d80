"""Network models: the MONAI bundles and TorchScript files in ``models/bundles/``, run
the same way on a GPU or a CPU.

Each folder under ``models/bundles/`` becomes one registered model named after the
folder (:func:`discover_network_models`): a Model Zoo bundle (:mod:`models.bundle`) or
a TorchScript or ONNX file with its spec (:mod:`models.exported`). A broken folder is still
registered; its ``missing_requirements()`` says what is wrong, so ``pacsnode
check-config`` reports it before anything is received.

How a volume runs (:class:`NetworkRunner`): the voxels are copied to the device once;
reorientation, resampling and intensity scaling happen there with torch; segmentation
runs MONAI's sliding window with batches of 16 windows on a GPU (4 on a CPU, unless the
spec says otherwise) under bf16 autocast where the spec allows; the logits are stitched
on the device, or in host memory when the device runs out of memory; the argmax and the
way back to the volume's grid run where the logits are, and only the uint8 label map
comes back. A classifier's outputs become probabilities by softmax or sigmoid. On a
CPU, torch uses the threads ``pacsnode worker`` sets: the process's cores over its
concurrency.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import numpy.typing as npt
from nibabel import orientations

from models.base import ClassificationModel, InputKindValues, ModelError, SegmentationModel, Volume
from models.bundle import METADATA_FILE, is_bundle, read_bundle
from models.exported import is_exported_model, read_exported_model
from models.spec import ModelSpecError, NetworkInfo

if TYPE_CHECKING:
    import torch

__all__ = [
    "BUNDLES_DIR",
    "CPU_SW_BATCH_SIZE",
    "GPU_SW_BATCH_SIZE",
    "NetworkClassificationModel",
    "NetworkRunner",
    "NetworkSegmentationModel",
    "argmax_channels",
    "discover_network_models",
    "forget_network_models",
    "network_model_class",
    "read_network",
    "window_batch_size",
]

logger = logging.getLogger(__name__)

#: Where network models live; every sub-folder is one model.
BUNDLES_DIR = Path(__file__).resolve().parent / "bundles"
#: Sliding-window batch when the spec gives none: enough windows per forward pass to
#: keep a GPU busy; on a CPU more windows per pass gain little.
GPU_SW_BATCH_SIZE = 16
CPU_SW_BATCH_SIZE = 4

_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def read_network(path: Path) -> NetworkInfo:
    """Read a model folder: a Model Zoo bundle or a TorchScript file with its spec.

    Raises
    ------
    ModelSpecError
        If the folder is neither, or what it holds is incomplete or wrong.
    """
    path = Path(path)
    try:
        if is_bundle(path):
            return read_bundle(path)
        if is_exported_model(path):
            return read_exported_model(path)
    except ModelSpecError:
        raise
    except Exception as e:  # a broken folder must fail this model alone, with the reason
        raise ModelSpecError(f"{path} cannot be read: {type(e).__name__}: {e}") from e
    raise ModelSpecError(
        f"{path} is neither a MONAI bundle (configs/metadata.json) nor an exported model "
        "(model.ts or model.onnx with pacsnode.yaml)"
    )


def window_batch_size(info: NetworkInfo, device_type: str) -> int:
    """Sliding-window batch on this kind of device: the spec's, else the bundle's own
    (at least :data:`GPU_SW_BATCH_SIZE` on a GPU), else the default for the device."""
    explicit = info.spec.inference.sw_batch_size
    if explicit is not None:
        return explicit
    if device_type == "cuda":
        return max(GPU_SW_BATCH_SIZE, info.default_sw_batch_size or 0)
    return info.default_sw_batch_size or CPU_SW_BATCH_SIZE


def _apply_orientation(tensor: torch.Tensor, ornt: npt.NDArray[np.float64]) -> torch.Tensor:
    """nibabel's ``apply_orientation`` for the last three axes of a torch tensor."""
    first = tensor.ndim - 3
    flips = [first + axis for axis in range(3) if ornt[axis, 1] < 0]
    if flips:
        tensor = tensor.flip(flips)
    order = [int(axis) for axis in np.argsort(ornt[:, 0])]
    return tensor.permute(*range(first), *(first + axis for axis in order))


def resample_axis(x: torch.Tensor, axis: int, positions: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of ``x`` along ``axis`` at fractional indices ``positions``;
    positions past either end take the edge value (MONAI's border padding)."""
    import torch

    last = x.shape[axis] - 1
    where = positions.to(x.device, torch.float64).clamp(0, last)
    low = where.floor().long().clamp(0, last)
    high = (low + 1).clamp(max=last)
    shape = [1] * x.ndim
    shape[axis] = -1
    weight = (where - low).to(x.dtype).reshape(shape)
    return x.index_select(axis, low) * (1 - weight) + x.index_select(axis, high) * weight


def spacing_resample(
    x: torch.Tensor, spacing: Sequence[float], target: Sequence[float]
) -> torch.Tensor:
    """Resample the spatial axes of ``x`` (N, C, *spatial) from voxel ``spacing`` to
    ``target`` as MONAI's ``Spacing(d)`` (bilinear, border) does for an axis-aligned
    grid: ``round((n - 1) * s / t) + 1`` voxels, the first at the centre of voxel 0."""
    import torch

    for axis, (s, t) in enumerate(zip(spacing, target, strict=True)):
        n = x.shape[2 + axis]
        count = round((n - 1) * s / t) + 1
        x = resample_axis(x, 2 + axis, torch.arange(count, dtype=torch.float64) * (t / s))
    return x


def spacing_inverse(
    x: torch.Tensor, spacing: Sequence[float], target: Sequence[float], shape: Sequence[int]
) -> torch.Tensor:
    """Back from :func:`spacing_resample`'s grid to the original ``shape``, as MONAI's
    inversion of ``Spacing`` (``Invertd``) does."""
    import torch

    for axis, (s, t) in enumerate(zip(spacing, target, strict=True)):
        x = resample_axis(x, 2 + axis, torch.arange(shape[axis], dtype=torch.float64) * (s / t))
    return x


def argmax_channels(logits: torch.Tensor) -> torch.Tensor:
    """``torch.argmax(logits, dim=0)`` as uint8, for (channels, *spatial) logits.

    One pass per channel over contiguous memory instead of a reduction across the
    strided channel axis, which takes torch about a second on a 2 x 64 x 512 x 512 CPU
    tensor. Ties go to the lower channel, as with ``torch.argmax``.
    """
    import torch

    best = logits[0].clone()
    labels = torch.zeros(best.shape, dtype=torch.uint8, device=logits.device)
    for channel in range(1, logits.shape[0]):
        higher = logits[channel] > best
        best = torch.where(higher, logits[channel], best)
        labels[higher] = channel
    return labels


@dataclass(frozen=True)
class _Grid:
    """Where a network's output goes back to: the volume's spatial shape and voxel
    spacing after reorientation, and the orientation transform back to its axes (None
    when the array order is kept)."""

    shape: tuple[int, ...]
    back: npt.NDArray[np.float64] | None
    spacing: tuple[float, ...]


class _StageClock:
    """Seconds between marks, for a job's timings; on a GPU each mark waits for the
    device, so that a stage's time is its own and not its predecessor's queue."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, stage: str) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[stage] = now - self._last
        self._last = now


class NetworkRunner:
    """A loaded network and the steps around it; one per model per worker process."""

    def __init__(self, info: NetworkInfo) -> None:
        """Load the network once, on CUDA if available, else on the CPU.

        Raises
        ------
        ModelSpecError
            If the weights do not fit the bundle's ``network_def``.
        """
        import torch

        self.info = info
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.net = self._load().to(self.device).eval()
        self.autocast = info.spec.inference.precision == "bf16" and self.device.type == "cuda"
        self.sw_batch_size = window_batch_size(info, self.device.type)
        self.chain = None
        if info.chain == "bundle":
            from models.bundle_chain import BundleChain

            self.chain = BundleChain(info, self.net, self.device)
        # BatchNorm and friends are stateless in eval(), but keep one job at a time per model.
        self.lock = threading.Lock()
        #: The parts of the last call (preprocess, network, postprocess), in seconds.
        self.last_seconds: dict[str, float] = {}
        logger.info(
            "%s %s: %s on %s%s, %s",
            info.name,
            info.version,
            info.weights,
            self.device,
            " (bf16)" if self.autocast else "",
            f"the bundle's own chain ({info.fast_path_refusal})"
            if self.chain is not None
            else f"{self.sw_batch_size} windows per pass",
        )

    def _load(self) -> torch.nn.Module:
        import torch

        info = self.info
        if info.model_format == "onnx":
            from models.onnx_network import OnnxNetwork

            return OnnxNetwork(info.weights, self.device)
        if info.state_dict_network is None:
            # Plain torch.jit.load: monai.data.load_net_with_metadata insists on the
            # metadata.json extra file that ckpt_export adds and a plain jit.save lacks.
            module: torch.nn.Module = torch.jit.load(str(info.weights), map_location=self.device)
            return module
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_meta(info.path / METADATA_FILE)
        parser.read_config(info.state_dict_network)
        network_def = parser["network_def"]
        if isinstance(network_def, dict) and network_def.get("pretrained") not in (None, False):
            # Pretrained backbone weights (e.g. ImageNet) would be downloaded only to be
            # replaced by the state dict below; on a hospital network the download fails.
            parser["network_def#pretrained"] = False
        net: torch.nn.Module = parser.get_parsed_content("network_def")
        state = torch.load(info.weights, map_location=self.device, weights_only=True)
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]  # a training checkpoint {"model": ..., "optimizer": ...}
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise ModelSpecError(
                f"{info.weights} does not fit network_def of {info.state_dict_network}: {e}"
            ) from e
        return net

    # --- preprocessing, on the device --------------------------------------------------

    def to_network_input(self, volume: Volume) -> tuple[torch.Tensor, _Grid]:
        """The network's input, (1, 1, *spatial) on the device, and the grid the results
        go back to (the volume's, after reorientation, before resampling).

        A one-slice volume given to an ``image`` model becomes (1, 1, rows, columns).

        Raises
        ------
        ModelError
            If the volume holds non-finite values or has the wrong number of dimensions.
        """
        import torch
        import torch.nn.functional as F

        info = self.info
        pre = info.preprocessing
        image_input = info.spec.input == InputKindValues.IMAGE
        voxels = volume.voxels
        dimensions = 4 if info.spec.inputs else 3  # several series: (channel, k, j, i)
        if voxels.ndim != dimensions or (image_input and voxels.shape[0] != 1):
            wanted = "one image (1, rows, columns)" if image_input else f"{dimensions}-D voxels"
            raise ModelError(f"{info.name} needs {wanted}; found shape {voxels.shape}.")
        x = torch.from_numpy(np.ascontiguousarray(voxels, dtype=np.float32)).to(self.device)
        if not bool(torch.isfinite(x).all()):
            raise ModelError(f"{info.name}: the volume holds non-finite values.")
        if image_input:
            x = x[0]
        spacing = volume.spacing_mm
        back = None
        if pre.axcodes is not None:
            current = orientations.io_orientation(volume.ras_affine)
            target = orientations.axcodes2ornt(tuple(pre.axcodes), labels=_RAS_LABELS)
            to_net = orientations.ornt_transform(current, target)
            x = _apply_orientation(x, to_net)
            net_spacing = [0.0, 0.0, 0.0]
            for axis, (new_axis, _) in enumerate(to_net):
                net_spacing[int(new_axis)] = volume.spacing_mm[axis]
            spacing = (net_spacing[0], net_spacing[1], net_spacing[2])
            back = orientations.ornt_transform(target, current)
        x = x[None] if dimensions == 4 else x[None, None]
        grid = _Grid(tuple(x.shape[2:]), back, tuple(spacing))
        if pre.spacing_mm is not None:
            x = spacing_resample(x, spacing, pre.spacing_mm)
        if pre.intensity is not None:
            w = pre.intensity
            if w.clip:
                x = x.clamp(w.a_min, w.a_max)
            x = (x - w.a_min) * ((w.b_max - w.b_min) / (w.a_max - w.a_min)) + w.b_min
        if pre.normalize == "zscore":
            std = float(x.std())
            x = (x - x.mean()) / (std if std > 0 else 1.0)
        elif pre.normalize == "minmax":
            low, high = float(x.min()), float(x.max())
            x = (x - low) / (high - low) if high > low else x - low
        if pre.input_size is not None:
            mode = "bilinear" if image_input else "trilinear"
            x = F.interpolate(x, size=list(pre.input_size), mode=mode, align_corners=False)
        return x.contiguous(), grid

    # --- segmentation ------------------------------------------------------------------

    def sliding_window(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for the whole input: windows on the device, stitched on the device, or
        in host memory when the device runs out of memory."""
        import torch
        from monai.inferers import sliding_window_inference

        info = self.info
        assert info.roi_size is not None  # checked by the readers for segmentation models
        cpu = torch.device("cpu")
        stitch_devices = [self.device] if self.device == cpu else [self.device, cpu]
        for attempt, stitch_device in enumerate(stitch_devices):
            try:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                    logits = sliding_window_inference(
                        x,
                        info.roi_size,
                        self.sw_batch_size,
                        self.net,
                        overlap=info.overlap,
                        mode=info.window_mode,
                        sigma_scale=info.sigma_scale,
                        padding_mode=info.padding_mode,
                        sw_device=self.device,
                        device=stitch_device,
                    )
                return torch.as_tensor(logits)
            except torch.OutOfMemoryError:
                if attempt == len(stitch_devices) - 1:
                    raise
                logger.warning(
                    "%s: %s ran out of memory stitching a %s volume; stitching in host memory",
                    info.name,
                    self.device,
                    tuple(x.shape[2:]),
                )
                torch.cuda.empty_cache()
        raise AssertionError("unreachable")

    def segment(self, volume: Volume) -> npt.NDArray[np.uint8]:
        """uint8 label map on the volume's grid: channel ``c`` of the output is value ``c``.

        Raises
        ------
        ModelError
            If the network has too few or too many output channels for its labels.
        """
        import torch

        if self.chain is not None:
            return self.chain.segment(volume)
        with self.lock, torch.inference_mode():
            clock = _StageClock(self.device)
            x, grid = self.to_network_input(volume)
            clock.mark("preprocess")
            logits = self.sliding_window(x)
            del x
            clock.mark("network")
            channels = int(logits.shape[1])
            highest = max((label.value for label in self.info.labels), default=0)
            if not highest < channels <= 256:
                raise ModelError(
                    f"{self.info.name} returned {channels} output channels; its labels up to "
                    f"{highest} need at least {highest + 1} (channel 0 is background) and "
                    "at most 256"
                )
            try:
                labels = self._labels_on_grid(logits, grid)
            except torch.OutOfMemoryError:
                # Resampling C channels back to the grid needs C volumes of float32.
                logger.warning(
                    "%s: out of memory after stitching; finishing on the host", self.info.name
                )
                torch.cuda.empty_cache()
                labels = self._labels_on_grid(logits.cpu(), grid)
            result = np.ascontiguousarray(labels.cpu().numpy(), dtype=np.uint8)
            clock.mark("postprocess")
            self.last_seconds = clock.seconds
            return result

    def _labels_on_grid(self, logits: torch.Tensor, grid: _Grid) -> torch.Tensor:
        """Resample the logits to the volume's (reoriented) grid, argmax, orient back."""
        target = self.info.preprocessing.spacing_mm
        if target is not None:
            logits = spacing_inverse(logits.float(), grid.spacing, target, grid.shape)
        labels = argmax_channels(logits[0])
        if grid.back is not None:
            labels = _apply_orientation(labels, grid.back)
        return labels

    # --- classification ----------------------------------------------------------------

    def classify(self, volume: Volume) -> tuple[float, ...]:
        """One probability per class, by the spec's activation."""
        import torch

        info = self.info
        if self.chain is not None:
            return self.chain.classify(volume)
        with self.lock, torch.inference_mode():
            clock = _StageClock(self.device)
            x, _ = self.to_network_input(volume)
            clock.mark("preprocess")
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                output = self.net(x)
            clock.mark("network")
            scores = torch.as_tensor(output).float().reshape(-1)
            if scores.numel() != len(info.classes):
                raise RuntimeError(
                    f"{info.name} returned {scores.numel()} outputs; {info.path} declares "
                    f"{len(info.classes)} classes"
                )
            if info.spec.activation == "softmax":
                probabilities = torch.softmax(scores, dim=0)
            else:
                probabilities = torch.sigmoid(scores)
            result = tuple(float(p) for p in probabilities.cpu())
            clock.mark("postprocess")
            self.last_seconds = clock.seconds
            return result


class _NetworkModel:
    """What both kinds of network model share: the folder and the runner."""

    model_dir: ClassVar[Path]
    weights_path: ClassVar[Path | None] = None
    _runner: NetworkRunner

    @classmethod
    def weights_files(cls) -> tuple[Path, ...]:
        return (cls.weights_path,) if cls.weights_path is not None else ()

    @classmethod
    def fingerprint(cls) -> str:
        """SHA-256 over every file of the folder (name and content)."""
        digest = hashlib.sha256()
        for path in sorted(p for p in cls.model_dir.rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(cls.model_dir)).encode())
            try:
                with path.open("rb") as fh:
                    digest.update(hashlib.file_digest(fh, "sha256").digest())
            except OSError as e:
                digest.update(str(e).encode())
        return digest.hexdigest()

    @classmethod
    def missing_requirements(cls) -> str | None:
        """The first problem :func:`read_network` finds in this folder, or None."""
        try:
            read_network(cls.model_dir)
        except ModelSpecError as e:
            return str(e)
        return None

    @classmethod
    def runtime_problem(cls) -> str | None:
        """What :meth:`missing_requirements` cannot see without MONAI: for a bundle that
        runs its own chain, whether that chain builds (``pacsnode check-config``)."""
        try:
            info = read_network(cls.model_dir)
        except ModelSpecError as e:
            return str(e)
        if info.chain != "bundle":
            return None
        from models.bundle_chain import build_problem

        return build_problem(info)

    def __init__(self) -> None:
        self._runner = NetworkRunner(read_network(self.model_dir))

    @property
    def runner(self) -> NetworkRunner:
        return self._runner

    def last_stage_seconds(self) -> dict[str, float]:
        return dict(self._runner.last_seconds)


class NetworkSegmentationModel(_NetworkModel, SegmentationModel):
    """A segmentation network; :func:`network_model_class` makes one subclass per folder."""

    def predict(self, volume: Volume) -> npt.NDArray[np.uint8]:
        """Label map with ``volume.voxels.shape`` (see :meth:`NetworkRunner.segment`)."""
        labels = self._runner.segment(volume)
        logger.info(
            "%s: %s",
            self.name,
            ", ".join(
                f"{spec.name} {float(np.count_nonzero(labels == spec.value)) * volume.voxel_volume_ml:.1f} mL"
                for spec in self.labels
            ),
        )
        return labels


class NetworkClassificationModel(_NetworkModel, ClassificationModel):
    """A classification network; :func:`network_model_class` makes one subclass per folder."""

    def predict(self, volume: Volume) -> tuple[float, ...]:
        """One probability per class (see :meth:`NetworkRunner.classify`)."""
        probabilities = self._runner.classify(volume)
        logger.info(
            "%s: %s",
            self.name,
            ", ".join(
                f"{c.name} {p:.3f}" for c, p in zip(self.classes, probabilities, strict=True)
            ),
        )
        return probabilities


def network_model_class(path: Path) -> type[NetworkSegmentationModel | NetworkClassificationModel]:
    """A model class for the folder at ``path``, named after the folder.

    The class is made even when the folder is broken (so ``pacsnode check-config`` can
    report it through ``missing_requirements``); creating an instance then raises.
    """
    path = Path(path).resolve()
    class_name = "Network_" + "".join(c if c.isalnum() else "_" for c in path.name)
    attributes: dict[str, Any] = {
        "model_dir": path,
        "name": path.name,
        "__module__": __name__,
        "__qualname__": class_name,
    }
    base: type[NetworkSegmentationModel | NetworkClassificationModel] = NetworkSegmentationModel
    try:
        info = read_network(path)
    except ModelSpecError as e:
        logger.warning("model folder %s cannot be used: %s", path.name, e)
        attributes.update(version="unknown", labels=(), description=f"broken model: {e}")
    else:
        spec = info.spec
        attributes.update(
            # "bundle (own chain)" where MONAI runs the bundle's transforms (pacsnode models)
            model_format=info.model_format + (" (own chain)" if info.chain == "bundle" else ""),
            weights_path=info.weights,
            version=info.version,
            queue=spec.queue,
            accepts=spec.accepts.to_accepts(),
            input_kind=spec.input,
            description=info.description,
        )
        if spec.inputs:
            attributes.update(
                inputs={name: dict(entry.match) for name, entry in spec.inputs.items()},
                reference_input=spec.reference,
            )
        if info.task == "classification":
            base = NetworkClassificationModel
            attributes.update(classes=info.classes, threshold=spec.threshold)
        else:
            attributes.update(labels=info.labels)
    return type(class_name, (base,), attributes)


_CLASSES: dict[Path, type[NetworkSegmentationModel | NetworkClassificationModel]] = {}


def forget_network_models() -> None:
    """Make :func:`discover_network_models` read every folder again (models reloaded)."""
    _CLASSES.clear()


def discover_network_models(
    folder: Path = BUNDLES_DIR,
) -> list[type[NetworkSegmentationModel | NetworkClassificationModel]]:
    """One class per model folder in ``folder`` (a bundle, or a folder with a
    ``pacsnode.yaml``), made once per process and path."""
    try:
        folders = sorted(p.resolve() for p in folder.iterdir() if p.is_dir())
    except OSError as e:
        logger.error("models folder %s cannot be listed: %s", folder, e)
        return []
    classes = []
    for path in folders:
        if not (is_bundle(path) or is_exported_model(path)):
            continue
        if path not in _CLASSES:
            _CLASSES[path] = network_model_class(path)
        classes.append(_CLASSES[path])
    return classes
